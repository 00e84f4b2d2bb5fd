"""Hires fix, as A1111's txt2img with "Hires. fix" (`StableDiffusionProcessingTxt2Img`, enable_hr).

A first pass at the request's size; its result upscaled -- in latent space (A1111's "Latent"
upscalers: torch `interpolate` modes, reproduced here as resampling matrices) or in pixels (the
decoded image resized with PIL, then encoded again); then a second pass, img2img from those
latents at `denoising_strength` with its own steps (0 = the first pass's), sampler and prompts.
Target size as A1111's `calculate_target_resolution`: `scale` times the size, or `resize_x` /
`resize_y` (one of them 0 = keep the aspect ratio; both = cover, then crop the latents evenly).
Prompt-editing steps in the second pass count on from the first pass (`sdjax.prompts.scheduling`).
The infotext is the first pass's with A1111's keys: "Denoising strength", "Hires upscale" or
"Hires resize", "Hires steps" (when not 0), "Hires upscaler", "Hires sampler" / "Hires prompt" /
"Hires negative prompt" (when they differ).
Each pass is one compiled function of its shapes (`sdjax.pipeline.core`); nothing here is traced.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax import sampling
from sdjax.errors import TaskError
from sdjax.pipeline import core
from sdjax.pipeline.request import LATENT_UPSCALERS, PIXEL_UPSCALERS, HiresFix, Request

__all__ = ["HiresFix", "LATENT_UPSCALERS", "PIXEL_UPSCALERS", "resize_matrix", "target_size", "upscale_latents"]


def target_size(width: int, height: int, hr: HiresFix) -> tuple[int, int, int, int]:
    """A1111's (upscale_to_x, upscale_to_y, truncate_x, truncate_y): the size the first pass is
    upscaled to, in pixels, and the latent columns / rows cropped off after (resize to both)."""
    rx, ry = int(hr.resize_x), int(hr.resize_y)
    if rx == 0 and ry == 0:
        return int(width * hr.scale), int(height * hr.scale), 0, 0
    if ry == 0:
        return rx, rx * height // width, 0, 0
    if rx == 0:
        return ry * width // height, ry, 0, 0
    if width / height < rx / ry:
        up_x, up_y = rx, rx * height // width
    else:
        up_x, up_y = ry * width // height, ry
    return up_x, up_y, (up_x - rx) // 8, (up_y - ry) // 8


def _aa_filter(mode: str):
    if mode == "bilinear":
        return 2, lambda x: max(0.0, 1.0 - abs(x))
    a = -0.5  # torch's antialiased bicubic uses PIL's a = -0.5

    def cubic(x):
        x = abs(x)
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        if x < 2.0:
            return (((x - 5.0) * x + 8.0) * x - 4.0) * a
        return 0.0

    return 4, cubic


def resize_matrix(n_in: int, n_out: int, mode: str, antialias: bool = False) -> np.ndarray:
    """float64 (n_out, n_in): torch.nn.functional.interpolate along one axis (align_corners=False)
    for mode "nearest", "nearest-exact", "bilinear", "bicubic" (A = -0.75, border replicated), and
    the antialiased bilinear / bicubic (torch's separable `_aa` kernels)."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for o in range(n_out):
        if mode in ("nearest", "nearest-exact"):
            src = math.floor((o + (0.5 if mode == "nearest-exact" else 0.0)) * scale)
            m[o, min(src, n_in - 1)] = 1.0
        elif antialias:
            size, f = _aa_filter(mode)
            support = size / 2 * scale if scale >= 1.0 else size / 2
            center = scale * (o + 0.5)
            inv = 1.0 / scale if scale >= 1.0 else 1.0
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            w = np.asarray([f((j - center + 0.5) * inv) for j in range(lo, hi)])
            m[o, lo:hi] = w / w.sum()
        elif mode == "bilinear":
            src = max(scale * (o + 0.5) - 0.5, 0.0)
            i0 = int(src)
            i1 = i0 + (1 if i0 < n_in - 1 else 0)
            frac = src - i0
            m[o, i0] += 1.0 - frac
            m[o, i1] += frac
        elif mode == "bicubic":
            src = scale * (o + 0.5) - 0.5
            i0 = math.floor(src)
            t = src - i0
            a = -0.75
            near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
            far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
            for k, w in zip(range(i0 - 1, i0 + 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
                m[o, min(max(k, 0), n_in - 1)] += w
        else:
            raise ValueError(f"unknown interpolation mode {mode!r}")
    return m


def upscale_latents(latents: np.ndarray, height: int, width: int, upscaler: str) -> np.ndarray:
    """latents (B, h, w, C) -> float32 (B, height, width, C) with an A1111 "Latent ..." upscaler."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    _, h, w, _ = latents.shape
    mh, mw = resize_matrix(h, height, mode, antialias), resize_matrix(w, width, mode, antialias)
    return np.einsum("Hh,bhwc,Ww->bHWc", mh, np.asarray(latents, np.float64), mw).astype(np.float32)


def infotext_params(request: Request) -> dict:
    """The hires keys A1111 adds to the first pass's infotext."""
    hr = request.hires
    params: dict = {"Denoising strength": hr.denoising_strength}
    if hr.resize_x == 0 and hr.resize_y == 0:
        params["Hires upscale"] = int(hr.scale) if float(hr.scale).is_integer() else hr.scale  # "2", "1.5"
    else:
        params["Hires resize"] = (hr.resize_x, hr.resize_y)
    if hr.steps:
        params["Hires steps"] = hr.steps
    params["Hires upscaler"] = hr.upscaler
    if hr.sampler is not None:
        hr_id, schedule_id = sampling.resolve(hr.sampler, request.schedule)
        if hr_id != sampling.resolve(request.sampler, request.schedule)[0]:
            params["Hires sampler"] = sampling.display_names(hr_id, schedule_id)[0]
    for key, value, main in (("Hires prompt", hr.prompt, request.prompt),
                             ("Hires negative prompt", hr.negative_prompt, request.negative_prompt)):
        if value and value != main:
            params[key] = value
    return params


def generate(pipe, request: Request, run_first: Callable, run_second: Callable):
    """Both passes for `request` (which has `hires`). run_first(request, extra_params) and
    run_second(request, init_latents (B, h, w, C) scaled, first_pass_steps) -> GenerationResult
    (`Generator`). Returns the second pass's images and latents with the first pass's infotexts
    (A1111 writes the first pass's size, steps and sampler, plus the hires keys)."""
    r, hr = request, request.hires
    if r.init_image is not None:
        raise TaskError("hires fix is for txt2img: drop init_image, or drop hires (use img2img at the size you want)")
    if r.controlnets:
        raise TaskError("hires fix with ControlNet is not supported yet; drop one of them")
    if r.sigmas is not None:
        raise TaskError("hires fix needs a named schedule for both passes, not explicit sigmas")
    first = run_first(dataclasses.replace(r, hires=None), infotext_params(r))
    _, h, w, _ = first.latents.shape
    up_x, up_y, trunc_x, trunc_y = target_size(w * 8, h * 8, hr)
    lh, lw = up_y // 8, up_x // 8
    if lh - trunc_y < 1 or lw - trunc_x < 1:
        raise TaskError(f"the hires fix target {up_x}x{up_y} is smaller than one latent pixel; raise the scale")
    if hr.upscaler in LATENT_UPSCALERS:
        init = upscale_latents(first.latents, lh, lw, hr.upscaler)
    else:  # A1111: decode (the first pass's images), resize in pixels, encode again
        resample = getattr(Image.Resampling, PIXEL_UPSCALERS[hr.upscaler])
        pixels = np.stack([np.asarray(im.resize((lw * 8, lh * 8), resample), np.float32) / 127.5 - 1.0
                           for im in first.images])
        encode = core.vae_encode_fn(pipe.vae.graphdef, pipe.vae.scaling_factor)
        init = np.asarray(encode(pipe.vae.state, jnp.asarray(pixels)))
    # A1111 crops the latents to [t // 2 : n - (t + 1) // 2] along each axis.
    init = init[:, trunc_y // 2:lh - (trunc_y + 1) // 2, trunc_x // 2:lw - (trunc_x + 1) // 2]
    second_request = dataclasses.replace(
        r, hires=None, noise=None, width=init.shape[2] * 8, height=init.shape[1] * 8, steps=hr.steps or r.steps,
        sampler=hr.sampler or r.sampler, strength=hr.denoising_strength, prompt=hr.prompt or r.prompt,
        negative_prompt=hr.negative_prompt or r.negative_prompt)
    second = run_second(second_request, init, r.steps)
    return dataclasses.replace(second, infotexts=first.infotexts)
