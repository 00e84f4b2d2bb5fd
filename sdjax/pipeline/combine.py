"""Several `Request`s as one batch, and the batch's result split back per request.

A server that gathers the requests arriving together runs them as one compiled call when they
share everything but their prompts, seeds and image counts: `batch_key(pipe, request)` says
which requests may share (None: run alone), `merge(requests)` makes the one batch (each image
keeps its own seed through `Request.seeds`), `split(result, sizes)` cuts the result back.
Every image equals the same request generated alone, because sdjax's images depend only on
their own seed (`sdjax.pipeline.core.initial_noise`) and never on the batch.

What must be equal for two requests to share a batch: every field except prompt,
negative_prompt, seed(s), subseed(s) and batch_size (so size, steps, sampler, schedule, CFG
scale, strength, init image and mask, clip skip, knobs), the LoRA tags in the prompts (one
set of merged weights per batch), and the number of 75-token chunks (prompts of a batch are
padded to the same chunk count, which would change a shorter prompt's conditioning).
ControlNet units, explicit noise, explicit sigmas and textual-inversion embeddings run alone.

`bucket` and `pad` round a batch up to a power of two (repeating its last image), so a server
compiles a few batch shapes rather than one per mix of requests. `slice_request` with
`host_range(n, index, count)` is image range `index` of `count` near-equal ranges: on
many hosts each runs its slice of a merged batch, and the images are gathered back in order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Hashable, Sequence

import numpy as np

from sdjax import prompts
from sdjax.pipeline.generator import GenerationResult
from sdjax.pipeline.inpaint import to_pil_mask, to_pil_rgb
from sdjax.pipeline.request import Limits, Request

# Fields that differ between the requests of one batch.
PER_IMAGE = ("prompt", "negative_prompt", "seed", "seeds", "subseed", "subseeds", "batch_size", "extra_params")
# Fields whose presence makes a request run alone.
ALONE = ("controlnets", "noise", "sigmas", "embeddings", "embeddings_dir")


def _listed(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _image_digest(image: Any, mask: bool = False) -> str | None:
    if image is None:
        return None
    pil = to_pil_mask(image) if mask else to_pil_rgb(image)
    return hashlib.sha256(np.asarray(pil).tobytes() + repr((pil.size, pil.mode)).encode()).hexdigest()


def _limits(request: Request, n: int) -> Limits:
    """The request's limits, with room for a batch of n: each request was checked against its own
    batch-size limit; the merged batch is the server's, bounded by its own --max-batch."""
    limits = request.limits or Limits()
    return dataclasses.replace(limits, max_batch_size=max(limits.max_batch_size, n))


def seeds_of(request: Request) -> tuple[list[int], list[int] | None]:
    """Each image's seed and variation seed (None without one)."""
    n = int(request.batch_size)
    seeds = list(request.seeds) if request.seeds is not None else [int(request.seed) + i for i in range(n)]
    if request.subseed is None:
        return seeds, None
    subseeds = list(request.subseeds) if request.subseeds is not None else [int(request.subseed) + i for i in range(n)]
    return seeds, subseeds


def batch_key(pipe, request: Request) -> Hashable | None:
    """What a request must share with others to run in one batch with them; None: run alone."""
    for name in ALONE:
        value = getattr(request, name)
        if value is not None and not (isinstance(value, (list, tuple)) and not value):
            return None
    n = int(request.batch_size)
    texts = _listed(request.prompt, n) + _listed(request.negative_prompt, n)
    tags = tuple(sorted({tag for t in texts for tag in prompts.extract_lora_tags(t).loras}))
    chunks = max(prompts.tokenize_prompt(pipe.tokenizer, prompts.extract_lora_tags(t).prompt).n_chunks for t in texts)
    rest = []
    for f in dataclasses.fields(Request):
        if f.name in PER_IMAGE or f.name in ALONE:
            continue
        value = getattr(request, f.name)
        if f.name in ("init_image", "mask"):
            value = _image_digest(value, mask=f.name == "mask")
        elif isinstance(value, dict):
            value = tuple(sorted(value.items()))
        elif isinstance(value, list):
            value = tuple(value)
        rest.append((f.name, value))
    return (tuple(rest), tags, chunks, request.subseed is None)


def merge(requests: Sequence[Request]) -> Request:
    """One Request making every image of `requests` in order (their `batch_key`s must be equal)."""
    if len(requests) == 1:
        return requests[0]
    prompt, negative, seeds, subseeds = [], [], [], []
    for r in requests:
        n = int(r.batch_size)
        prompt += _listed(r.prompt, n)
        negative += _listed(r.negative_prompt, n)
        s, sub = seeds_of(r)
        seeds += s
        subseeds += sub or []
    first = requests[0]
    return dataclasses.replace(first, prompt=prompt, negative_prompt=negative, seed=0, seeds=seeds,
                               batch_size=len(seeds), limits=_limits(first, len(seeds)),
                               subseed=None if first.subseed is None else 0,
                               subseeds=subseeds if first.subseed is not None else None)


def slice_request(request: Request, start: int, stop: int) -> Request:
    """The images [start, stop) of `request` as a Request of their own (same seeds)."""
    n = int(request.batch_size)
    seeds, subseeds = seeds_of(request)
    return dataclasses.replace(
        request, prompt=_listed(request.prompt, n)[start:stop], negative_prompt=_listed(request.negative_prompt, n)[start:stop],
        seed=0, seeds=seeds[start:stop], batch_size=stop - start,
        subseed=None if subseeds is None else 0, subseeds=None if subseeds is None else subseeds[start:stop])


def bucket(n: int, most: int) -> int:
    """The batch size to run n images at: the next power of two, at most max(n, most). A few
    sizes mean a few compiled functions, whatever mix of requests arrives."""
    return min(1 << max(n - 1, 0).bit_length(), max(n, most))


def pad(request: Request, n: int) -> Request:
    """`request` grown to n images by repeating its last image (same prompt and seed); the extra
    images are dropped from the result (`split` takes only what each request asked for)."""
    have = int(request.batch_size)
    if n <= have:
        return request
    seeds, subseeds = seeds_of(request)
    prompt, negative = _listed(request.prompt, have), _listed(request.negative_prompt, have)
    extra = n - have
    return dataclasses.replace(
        request, prompt=prompt + prompt[-1:] * extra, negative_prompt=negative + negative[-1:] * extra, seed=0,
        seeds=seeds + seeds[-1:] * extra, batch_size=n, limits=_limits(request, n),
        subseed=None if subseeds is None else 0,
        subseeds=None if subseeds is None else subseeds + subseeds[-1:] * extra)


def host_range(n: int, index: int, count: int) -> tuple[int, int]:
    """Image range [start, stop) of host `index` among `count` for a batch of n (near-equal shares)."""
    share, extra = divmod(n, count)
    start = index * share + min(index, extra)
    return start, start + share + (index < extra)


def split(result: GenerationResult, sizes: Sequence[int]) -> list[GenerationResult]:
    """Cut a merged batch's result back into one result per request of `sizes` images."""
    out, at = [], 0
    for n in sizes:
        out.append(GenerationResult(result.images[at:at + n], result.latents[at:at + n],
                                    result.infotexts[at:at + n], result.seeds[at:at + n]))
        at += n
    return out


__all__ = ["batch_key", "bucket", "host_range", "merge", "pad", "seeds_of", "slice_request", "split"]
