"""SDXL's host-side conditioning: two text encoders, pooled embeddings, time ids, refiner hand-over.

SDXL (Podell et al. 2023) conditions its UNet on
- a context of the penultimate hidden states of both text encoders (CLIP ViT-L 768 wide and
  OpenCLIP ViT-bigG 1280 wide, without their final layer norms), concatenated: 2048 wide; the
  refiner has only bigG: 1280 wide;
- the pooled embedding: bigG's eos-pooled output through its `text_projection` (1280);
- "time ids", sinusoidally embedded in the UNet: the base takes original size (h, w), crop
  top-left (top, left), target size (h, w); the refiner original size, crop and an aesthetic score.
Defaults are diffusers' (and A1111's): original = target = the image size, crop (0, 0); the
refiner's aesthetic score 6.0 (negative 2.5). An empty negative prompt is all zeros (context and
pooled) when model_index.json says `force_zeros_for_empty_prompt` (the base; not the refiner).

Prompts are chunked and weighted as for SD 1.x (`sdjax.prompts`, A1111 emphasis per encoder);
the pooled embedding is the first chunk's.

Refiner hand-over ("ensemble of experts", diffusers' `denoising_end` / `denoising_start`,
A1111's "Refiner switch at" f): the base runs the steps whose timestep is >= round(1000 * (1 - f)),
the refiner the rest, in one compiled function (`sdjax.pipeline.core`).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import prompts, sampling
from sdjax.errors import TaskError

# diffusers' StableDiffusionXLImg2ImgPipeline defaults (the refiner's aesthetic-score time ids).
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


@functools.lru_cache(maxsize=16)
def penultimate_fn(graphdef) -> Callable:
    """jit(fn(state, ids (n, 77) int32) -> (penultimate hidden states (n, 77, D) float32,
    text_embeds (n, P) float32 or None)): what SDXL takes from each text encoder."""

    def encode(state, ids):
        out = nnx.merge(graphdef, state)(ids, output_hidden_states=True)
        pooled = None if out.text_embeds is None else out.text_embeds.astype(jnp.float32)
        return out.hidden_states[-2].astype(jnp.float32), pooled

    return jax.jit(encode)


def _encoders(pipe, nets=None) -> list[tuple]:
    """(tokenizer, graphdef, state) of each encoder, in context order; `nets`
    (`sdjax.pipeline.networks.AppliedNetworks`) replaces tokenizers and states (embeddings, LoRAs)."""
    pairs = [(pipe.tokenizer, pipe.text_encoder, nets and (nets.tokenizer, nets.te_state)),
             (pipe.tokenizer_2, pipe.text_encoder_2, nets and (nets.tokenizer_2, nets.te2_state))]
    return [(tok, te.graphdef, te.state) if given is None else (given[0], te.graphdef, given[1])
            for tok, te, given in pairs if te is not None]


def encode_prompts(pipe, prompts_: Sequence[str], negatives: Sequence[str], clip_skip: int = 1, nets=None):
    """SDXL prompt encoding for a batch: (cond, uncond) float32 (B, n * 77, context width) and
    (pooled, uncond_pooled) float32 (B, P). See the module docstring. `nets`: tokenizers and
    text-encoder states to use instead of the pipeline's (`sdjax.pipeline.networks.apply_networks`)."""
    if clip_skip != 1:
        raise TaskError(f"clip_skip={clip_skip}: SDXL always uses the penultimate layer of its text encoders "
                        "(clip skip is an SD 1.x / 2.x setting); leave it at 1")
    texts = list(dict.fromkeys([prompts.extract_lora_tags(t).prompt for t in list(prompts_) + list(negatives)]))
    per_encoder = []
    for tok, graphdef, state in _encoders(pipe, nets):
        empty = prompts.tokenize_prompt(tok, "")
        tokens = {t: prompts.tokenize_prompt(tok, t) for t in texts}
        per_encoder.append((graphdef, state, empty, tokens))
    n = max(t.n_chunks for _, _, _, tokens in per_encoder for t in tokens.values())
    encoded: dict[str, tuple] = {}
    for text in texts:
        hidden, pooled = [], None
        for graphdef, state, empty, tokens in per_encoder:
            widest = prompts.PromptTokens(np.repeat(empty.ids, n, 0), np.repeat(empty.weights, n, 0))
            t, _ = prompts.pad_to_same_chunks(tokens[text], widest, empty)
            fn, box = penultimate_fn(graphdef), {}

            def encode_fn(ids, clip_skip, fn=fn, state=state, box=box):
                h, p = fn(state, ids)
                box["pooled"] = p
                return h

            hidden.append(prompts.encode_prompt(encode_fn, t))
            if box["pooled"] is not None:
                pooled = box["pooled"][:1]  # the first chunk's, as A1111
        encoded[text] = (jnp.concatenate(hidden, axis=-1), pooled)
    key = lambda t: prompts.extract_lora_tags(t).prompt  # noqa: E731
    cond = jnp.concatenate([encoded[key(t)][0] for t in prompts_], axis=0)
    pooled = jnp.concatenate([encoded[key(t)][1] for t in prompts_], axis=0)
    unconds, upooled = [], []
    for t in negatives:
        c, p = encoded[key(t)]
        if key(t) == "" and pipe.force_zeros_for_empty_prompt:
            c, p = jnp.zeros_like(c), jnp.zeros_like(p)
        unconds.append(c)
        upooled.append(p)
    return cond, jnp.concatenate(unconds, axis=0), pooled, jnp.concatenate(upooled, axis=0)


def time_ids(family: str, width: int, height: int, *, original_size=None, crops_coords_top_left=None,
             target_size=None, aesthetic_score: float = AESTHETIC_SCORE) -> np.ndarray:
    """The time ids of one image, float32: base (6,) = original (h, w) + crop (top, left) + target
    (h, w); refiner (5,) = original (h, w) + crop (top, left) + aesthetic score. Sizes default to
    (height, width), the crop to (0, 0)."""
    original = tuple(original_size or (height, width))
    crop = tuple(crops_coords_top_left or (0, 0))
    if family == "sdxl-refiner":
        return np.asarray(original + crop + (aesthetic_score,), np.float32)
    return np.asarray(original + crop + tuple(target_size or (height, width)), np.float32)


def check_time_ids(pipe, ids: np.ndarray) -> None:
    """The UNet's add_embedding input width must be pooled width + len(ids) * addition_time_embed_dim."""
    cfg = pipe.unet.config
    pooled = pipe.text_encoder_2.config.projection_dim
    want = (cfg.projection_class_embeddings_input_dim - pooled) / cfg.addition_time_embed_dim
    if want != len(ids):
        raise TaskError(f"{pipe.model_dir}: the UNet's add_embedding takes {want:g} time ids but this {pipe.family} "
                        f"pipeline makes {len(ids)} (a base UNet in a refiner folder or the reverse?)")


def conditioning(pipe, r, width: int, height: int, b: int, *, negative: bool = False) -> jax.Array:
    """(B, n) float32 time ids of a request (`Request` fields original_size, ... and their negative_ forms).

    The negative forms default to the positive values, except that the negative crop is (0, 0)
    once a negative original or target size is given (diffusers' defaults)."""
    crop = r.crops_coords_top_left
    if negative:
        if r.negative_original_size is not None or r.negative_target_size is not None:
            crop = (0, 0)
        crop = r.negative_crops_coords_top_left if r.negative_crops_coords_top_left is not None else crop
    pick = (lambda name: getattr(r, "negative_" + name) if negative and getattr(r, "negative_" + name) is not None
            else getattr(r, name))
    score = r.negative_aesthetic_score if negative else r.aesthetic_score
    ids = time_ids(pipe.family, width, height, original_size=pick("original_size"), crops_coords_top_left=crop,
                   target_size=pick("target_size"), aesthetic_score=score)
    check_time_ids(pipe, ids)
    return jnp.broadcast_to(jnp.asarray(ids), (b, len(ids)))


def switch_index(model: sampling.DiscreteModel, sigmas: np.ndarray, switch_at: float) -> int:
    """How many steps of the schedule the base runs before the refiner takes over: the steps whose
    timestep t is >= round(T - f * T) (diffusers' `denoising_end` = f; T = num_train_timesteps)."""
    steps = len(sigmas) - 1
    t = np.asarray(model.sigma_to_t(jnp.asarray(sigmas[:steps], jnp.float32)), np.float64)
    cutoff = int(round(model.num_train_timesteps - switch_at * model.num_train_timesteps))
    return int(np.sum(t >= cutoff - 1e-3))


def request_fields(pipe, discrete_model: sampling.DiscreteModel, fields: dict, r, prompt_list, negative_list,
                   width: int, height: int, b: int, sigmas: np.ndarray, nets):
    """A request's SDXL traced inputs into `fields` (the generation function's arguments), the
    refiner's too; returns the refiner UNet's graphdef (static) or None. `r`: the validated
    `sdjax.pipeline.request.Request`; `nets`: the base's `networks.AppliedNetworks` (LoRA-merged /
    embedding-grown text encoders, prompts with embedding names expanded; the refiner gets neither)."""
    for text in list(prompt_list) + list(negative_list):
        if len(prompts.split_and(text)) > 1 or len(prompts.prompt_schedule(text, len(sigmas) - 1)) > 1:
            raise TaskError(f"prompt editing ([a:b:when], [a|b]) and AND are not supported for SDXL yet "
                            f"(SD 1.x / 2.x only); write the prompt without them: {text!r}")
    fields["cond"], fields["uncond"], fields["pooled"], fields["uncond_pooled"] = encode_prompts(
        pipe, nets.prompts, nets.negatives, r.clip_skip, nets=nets)
    fields["time_ids"] = conditioning(pipe, r, width, height, b)
    fields["uncond_time_ids"] = conditioning(pipe, r, width, height, b, negative=True)
    refiner = r.refiner
    if refiner is None:
        return None
    if getattr(refiner, "family", "sd") == "sd":
        raise TaskError(f"refiner {getattr(refiner, 'model_dir', refiner)!r} is not an SDXL model (a loaded "
                        "SDXL refiner Pipeline, e.g. stable-diffusion-xl-refiner-1.0)")
    if refiner.unet.config.in_channels != refiner.vae.config.latent_channels \
            or refiner.vae.config.latent_channels != pipe.vae.config.latent_channels:
        raise TaskError("the refiner must be a plain (4-channel) SDXL UNet sharing the base's latent space")
    k = switch_index(discrete_model, sigmas, float(r.refiner_switch_at))
    fields["switch_sigma"] = jnp.float32(sigmas[k])
    fields["refiner_state"] = refiner.unet.state
    (fields["refiner_cond"], fields["refiner_uncond"], fields["refiner_pooled"],
     fields["refiner_uncond_pooled"]) = encode_prompts(refiner, prompt_list, negative_list, r.clip_skip)
    fields["refiner_time_ids"] = conditioning(refiner, r, width, height, b)
    fields["refiner_uncond_time_ids"] = conditioning(refiner, r, width, height, b, negative=True)
    return refiner.unet.graphdef


__all__ = ["AESTHETIC_SCORE", "NEGATIVE_AESTHETIC_SCORE", "conditioning", "encode_prompts", "penultimate_fn",
           "request_fields", "switch_index", "time_ids"]
