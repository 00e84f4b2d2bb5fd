"""Live previews: the current denoised latents -> a small image, every N sampler steps.

Two methods, as A1111's "Live preview method":
- "cheap" (A1111 "Approx cheap", `modules/sd_vae_approx.cheap_approximation`): a fixed linear
  map of the 4 latent channels to RGB, per latent pixel (so the preview is H/8 x W/8), one
  4x3 matrix for SD 1.x / 2.x and one for SDXL; rgb = clip(latents @ M * 0.5 + 0.5, 0, 1).
  Pure numpy on the host: nothing is compiled.
- "taesd": the TAESD / TAESDXL decoder (`sdjax.models.taesd`, weights from `--taesd`), a full
  size image at ~1% of the VAE's cost; its own small jitted function, compiled once per shape.

How previews reach the host: the sampler's per-step host callback (`core.Spec(progress=True)`)
already passes each step's x0 prediction; `core.preview_hook` hands it to a `Previewer`. The
sampler's compiled function is the same with or without previews, whatever N or the method
(tests/test_preview.py counts compilations). `current_image` is the plain function a server's
progress endpoint can call on the latest latents.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from PIL import Image

from sdjax.errors import UsageError
from sdjax.images import make_grid, save_png

METHODS = ("cheap", "taesd")

# A1111 sd_vae_approx.cheap_approximation: rows are the latent channels, columns R, G, B.
CHEAP_SD = np.array([[0.298, 0.207, 0.208],
                     [0.187, 0.286, 0.173],
                     [-0.158, 0.189, 0.264],
                     [-0.184, -0.271, -0.473]], np.float32)
CHEAP_SDXL = np.array([[0.3448, 0.4168, 0.4395],
                       [-0.1953, -0.0290, 0.0250],
                       [0.1074, 0.0886, -0.0163],
                       [-0.3730, -0.2499, -0.2088]], np.float32)
SDXL_SCALING_FACTOR = 0.13025  # the SDXL VAE's; SD 1.x / 2.x use 0.18215


def family(scaling_factor: float) -> str:
    """"sdxl" for the SDXL VAE's scaling factor, else "sd" (which cheap matrix applies)."""
    return "sdxl" if abs(float(scaling_factor) - SDXL_SCALING_FACTOR) < 1e-6 else "sd"


def cheap_approximation(latents: np.ndarray, model_family: str = "sd") -> np.ndarray:
    """A1111's "Approx cheap": latents (B, h, w, 4) scaled -> RGB (B, h, w, 3) float32 in [0, 1]."""
    latents = np.asarray(latents, np.float32)
    if latents.shape[-1] != 4:
        raise UsageError(f"the cheap preview needs 4 latent channels, got {latents.shape[-1]}; use --preview-method taesd")
    coeffs = CHEAP_SDXL if model_family == "sdxl" else CHEAP_SD
    return np.clip(np.einsum("...c,cr->...r", latents, coeffs) * 0.5 + 0.5, 0.0, 1.0)


@functools.lru_cache(maxsize=4)
def _taesd_fn(graphdef) -> Callable:
    def decode(state, latents):
        return nnx.merge(graphdef, state)(latents)

    return jax.jit(decode)


def taesd_decode(decoder, latents: np.ndarray) -> np.ndarray:
    """TAESD: latents (B, h, w, C) scaled -> RGB (B, 8h, 8w, 3) float32 in [0, 1]."""
    graphdef, state = nnx.split(decoder)
    images = np.asarray(_taesd_fn(graphdef)(state, np.asarray(latents, np.float32)), np.float32)
    return np.clip(images * 0.5 + 0.5, 0.0, 1.0)


def current_image(latents: np.ndarray, method: str = "cheap", *, taesd: Any = None,
                  model_family: str = "sd") -> Image.Image:
    """The preview of latents (B, h, w, C) scaled (e.g. the last x0 prediction) as one PIL RGB
    image: the image itself for B = 1, a grid (`sdjax.images.make_grid`) for more.
    method: "cheap" or "taesd" (needs `taesd`, a `TAESDDecoder`)."""
    if method not in METHODS:
        raise UsageError(f"unknown preview method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "taesd":
        if taesd is None:
            raise UsageError("the taesd preview needs TAESD decoder weights: pass --taesd PATH")
        rgb = taesd_decode(taesd, latents)
    else:
        rgb = cheap_approximation(latents, model_family)
    pil = [Image.fromarray(np.rint(im * 255.0).astype(np.uint8)) for im in rgb]
    return pil[0] if len(pil) == 1 else make_grid(pil)


class Previewer:
    """A `preview` hook for `Generator.generate`: writes `<folder>/<name>-stepNNN.png`
    (step numbers from 1, atomically) after every `every`-th step and the last one, and
    calls `on_write(path)` for each.

    steps: the run's step count (its last step is always written); name: the file name stem
    (e.g. the image's seed); the preview of a batch is its grid."""

    def __init__(self, folder: str | os.PathLike, every: int, *, method: str = "cheap", taesd: Any = None,
                 model_family: str = "sd", on_write: Callable[[Path], None] | None = None):
        if every < 1:
            raise UsageError(f"--preview-every must be at least 1, got {every}")
        if method not in METHODS:
            raise UsageError(f"unknown preview method {method!r}; choose one of {', '.join(METHODS)}")
        if method == "taesd" and taesd is None:
            raise UsageError("--preview-method taesd needs the decoder weights: pass --taesd PATH")
        self.folder, self.every, self.method, self.taesd = Path(folder), int(every), method, taesd
        self.model_family, self.on_write = model_family, on_write
        self.name, self.steps = "preview", None
        self.written: list[Path] = []

    def start(self, name: str, steps: int | None = None) -> "Previewer":
        """Name the next run's files and give its step count; returns self (the hook)."""
        self.name, self.steps = name, steps
        return self

    def __call__(self, i: int, x0_pred: np.ndarray) -> None:
        step = i + 1
        if step % self.every and step != self.steps:
            return
        image = current_image(x0_pred, self.method, taesd=self.taesd, model_family=self.model_family)
        path = save_png(image, self.folder / f"{self.name}-step{step:03d}.png")
        self.written.append(path)
        if self.on_write is not None:
            self.on_write(path)


__all__ = ["CHEAP_SD", "CHEAP_SDXL", "METHODS", "Previewer", "cheap_approximation", "current_image", "family",
           "taesd_decode"]
