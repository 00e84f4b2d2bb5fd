"""ControlNet for generation: load one, prepare its control image, per-step scales.

    cn = sdjax.controlnet.load_controlnet("path/to/control_v11p_sd15_canny")   # folder or original file
    hint = prepare_control_image("photo.png", 512, 512, preprocessor="canny",
                                 low_threshold=100, high_threshold=200, save_path="hint.png")
    scales = controlnet_step_scales(num_steps, 1.0, 0.0, 1.0)           # (num_steps,) host-side
    down, mid = cn(latents_nhwc, t, context, hint[None], scales[i])      # residuals for the UNet
    eps = pipe.unet(latents_nhwc, t, context, down_residuals=down, mid_residual=mid)

Canny is implemented here in numpy (no OpenCV), following `cv2.Canny` (the detector the
Canny ControlNets were trained with): 3x3 Sobel on 0..255 values, L1 magnitude, the
strongest colour channel per pixel, OpenCV's non-maximum-suppression tie rule, double
threshold and 8-connected hysteresis. cv2.Canny does not blur; `sigma > 0` adds a Gaussian
blur first (Canny 1986's smoothing step) for noisy photos.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from sdjax.models.kernels import Kernels
from sdjax.pipeline import Component, _check_dtype, jitted

__all__ = ["ControlNet", "load_controlnet", "canny", "prepare_control_image", "controlnet_keep",
           "controlnet_step_scales", "scale_at", "PREPROCESSORS"]

PREPROCESSORS = ("canny", "none")


class ControlNet(Component):
    """A ControlNetModel as a component (see `sdjax.pipeline`): `graphdef`, `state`, `config`
    (ControlNetConfig), and `apply(state, latents_nhwc, timesteps, context, cond_image_nhwc,
    conditioning_scale, guess_mode=False) -> (down residuals list, mid residual)`, jitted
    with `guess_mode` static and `conditioning_scale` traced."""

    def __init__(self, model, config, source=None, kernels=None):
        super().__init__(model, config, source, kernels)
        self.apply = jitted(self.graphdef, "__call__", ("guess_mode",))

    @property
    def num_down_residuals(self) -> int:
        return self.config.num_down_residuals

    @property
    def image_downscale(self) -> int:
        """Control-image pixels per latent pixel (8 for SD ControlNets)."""
        return self.config.image_downscale

    def __call__(self, latents_nhwc, timesteps, context, cond_image_nhwc, conditioning_scale=1.0, *,
                 guess_mode: bool = False):
        """latents (B, h, w, C), timesteps scalar or (B,), context (B, L, D), control image
        (B, 8h, 8w, 3) in [0, 1] -> (down residuals, mid residual), NHWC, for the UNet's
        `down_residuals` / `mid_residual`."""
        return self.apply(self.state, latents_nhwc, timesteps, context, cond_image_nhwc,
                          jnp.asarray(conditioning_scale, jnp.float32), guess_mode=guess_mode)


def load_controlnet(path: str | os.PathLike, dtype: Any = "float32", *, config: Any = None,
                    variant: str | None = None,
                    sharding: Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None = None,
                    kernels: Kernels | None = None) -> ControlNet:
    """A diffusers ControlNet folder (config.json + weights) or an original-format file -> ControlNet.

    dtype: "float32" or "bfloat16" ("float16" accepted), parameters and compute. config: a
    config dict / config.json / folder overriding the folder's config or, for an original
    file, the config read from its shapes (see `sdjax.weights.controlnet_files.infer_config`:
    heads follow SD's rule; the "shuffle" ControlNet needs `global_pool_conditions: true`).
    variant: e.g. "fp16". kernels: the attention / conv implementations
    (`sdjax.models.kernels.Kernels`; None: "auto" on the default backend). Raises CheckpointError / ConfigError naming the file and problem.
    """
    from sdjax.weights.controlnet_files import load_controlnet_model

    model, cfg = load_controlnet_model(path, _check_dtype(dtype), config=config, variant=variant,
                                       sharding=sharding)
    return ControlNet(model, cfg, Path(path), kernels)


# ------------------------------------------------------------------------------------ step scales


def controlnet_keep(num_steps: int, guidance_start: float = 0.0, guidance_end: float = 1.0) -> np.ndarray:
    """(num_steps,) float32 of 1.0 where the ControlNet acts, else 0.0: diffusers' rule

        keep[i] = 1 - (i / num_steps < start or (i + 1) / num_steps > end)

    num_steps: the steps actually run (after img2img's strength cut, as diffusers' `len(timesteps)`).
    """
    if not 0.0 <= guidance_start < guidance_end <= 1.0:
        raise ValueError(f"control guidance start={guidance_start} / end={guidance_end}: need "
                         "0 <= start < end <= 1 (as diffusers checks)")
    return np.array([1.0 - float(i / num_steps < guidance_start or (i + 1) / num_steps > guidance_end)
                     for i in range(num_steps)], np.float32)


def controlnet_step_scales(num_steps: int, conditioning_scale: float | Sequence[float] = 1.0,
                           guidance_start: float | Sequence[float] = 0.0,
                           guidance_end: float | Sequence[float] = 1.0) -> np.ndarray:
    """Per-step conditioning scales: `conditioning_scale * controlnet_keep(...)`, host-side.

    Scalars -> (num_steps,). For several ControlNets pass lists (scalars are repeated, as
    diffusers' MultiControlNet does) -> (num_steps, n_controlnets); column j scales ControlNet j.
    """
    args = (conditioning_scale, guidance_start, guidance_end)
    lists = [a for a in args if isinstance(a, (list, tuple))]
    if not lists:
        return np.float32(conditioning_scale) * controlnet_keep(num_steps, guidance_start, guidance_end)
    n = len(lists[0])
    if any(len(a) != n for a in lists):
        raise ValueError(f"conditioning_scale, guidance_start and guidance_end must list one value per "
                         f"ControlNet; got lengths {[len(a) for a in lists]}")
    scale, start, end = ([a] * n if not isinstance(a, (list, tuple)) else list(a) for a in args)
    return np.stack([np.float32(s) * controlnet_keep(num_steps, a, b) for s, a, b in zip(scale, start, end)],
                    axis=1)


def scale_at(level: jax.Array, levels: jax.Array, step_scales: jax.Array) -> jax.Array:
    """The per-step scale in force for a network evaluation at noise level `level` (traced).

    levels: the sampler's decreasing schedule, (steps + 1,) sigmas ending in 0 (or the
    matching UNet timesteps, if the caller sees timesteps: any decreasing map of sigma works).
    Step i runs from levels[i] down to levels[i + 1]; an evaluation at a level in
    (levels[i + 1], levels[i]] -- its start, or a Heun/DPM2 midpoint -- belongs to step i.
    step_scales: (steps,) or (steps, n_controlnets), from `controlnet_step_scales`. For
    img2img starting at step `start`, compute them for the `steps - start` steps run (as
    diffusers does) and left-pad with `start` zero rows.
    level may be a scalar or any array of equal values (e.g. the (2B,) timesteps); returns
    step_scales[i] (scalar or (n_controlnets,)), float32.
    """
    level = jnp.max(jnp.asarray(level, jnp.float32))
    steps = step_scales.shape[0]
    i = jnp.sum(jnp.asarray(levels, jnp.float32)[1:steps] >= level)
    return jnp.asarray(step_scales, jnp.float32)[jnp.clip(i, 0, steps - 1)]


# ------------------------------------------------------------------------------------ Canny


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W, C), radius ceil(3 sigma), replicated borders."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    p = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="edge")
    x = sum(k[i] * p[i:i + x.shape[0]] for i in range(2 * r + 1))
    p = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * p[:, i:i + x.shape[1]] for i in range(2 * r + 1))


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (d/dx, d/dy) of (H, W, C), replicated borders (OpenCV's Canny)."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]

    def s(dy, dx):
        return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    return gx, gy


def canny(image: np.ndarray, low_threshold: float = 100.0, high_threshold: float = 200.0, *,
          sigma: float = 0.0, l2_gradient: bool = False) -> np.ndarray:
    """Canny edges of an (H, W) or (H, W, C) image with values in 0..255 -> (H, W) bool.

    Thresholds are in OpenCV's units (Sobel magnitude of 0..255 pixels, |gx| + |gy| unless
    `l2_gradient`): A1111's defaults are 100 / 200. A pixel is an edge if it is a local
    maximum along its gradient, above `low_threshold`, and 8-connected through such pixels
    to one above `high_threshold`. Colour images use, per pixel, the channel with the
    largest gradient (as cv2.Canny does). sigma > 0 blurs first (cv2.Canny does not).
    """
    from scipy import ndimage  # scipy comes with jax

    if low_threshold > high_threshold:
        low_threshold, high_threshold = high_threshold, low_threshold  # OpenCV swaps them too
    x = np.asarray(image, np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3:
        raise ValueError(f"canny expects an (H, W) or (H, W, C) image, got shape {x.shape}")
    if sigma > 0:
        x = _gaussian_blur(x, sigma)
    gx, gy = _sobel(x)
    mag = np.sqrt(gx * gx + gy * gy) if l2_gradient else np.abs(gx) + np.abs(gy)
    pick = np.argmax(mag, axis=-1)[..., None]
    gx, gy, mag = (np.take_along_axis(a, pick, axis=-1)[..., 0] for a in (gx, gy, mag))

    # Non-maximum suppression with OpenCV's sectors and tie rule (strictly greater than the
    # neighbour before, at least the one after), so a step edge comes out one pixel thick.
    h, w = mag.shape
    m = np.pad(mag, 1)  # zeros outside, as OpenCV

    def nb(dy, dx):
        return m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    ax, ay = np.abs(gx), np.abs(gy)
    tg22 = math.tan(math.radians(22.5))
    horizontal = ay < ax * tg22
    vertical = ay > ax / tg22  # tan(67.5) = 1 / tan(22.5)
    s = np.where(gx * gy < 0, -1, 1)
    diag = np.where(s < 0, (mag > nb(-1, 1)) & (mag > nb(1, -1)), (mag > nb(-1, -1)) & (mag > nb(1, 1)))
    peak = np.where(horizontal, (mag > nb(0, -1)) & (mag >= nb(0, 1)),
                    np.where(vertical, (mag > nb(-1, 0)) & (mag >= nb(1, 0)), diag))
    candidate = peak & (mag > low_threshold)
    strong = candidate & (mag > high_threshold)

    labels, _ = ndimage.label(candidate, structure=np.ones((3, 3), bool))
    keep = np.unique(labels[strong])
    return np.isin(labels, keep[keep > 0])


# ------------------------------------------------------------------------------------ control image


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError("a control image array must be uint8 (H, W, 3) or (H, W) in 0..255; "
                         f"got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def prepare_control_image(image: Any, width: int, height: int, *, preprocessor: str = "canny",
                          low_threshold: float = 100.0, high_threshold: float = 200.0, sigma: float = 0.0,
                          save_path: str | os.PathLike | None = None) -> np.ndarray:
    """An image (path, PIL image or uint8 array) -> the ControlNet's input, (height, width, 3)
    float32 in [0, 1] (add the batch axis yourself: `hint[None]`).

    The image is converted to RGB and resized to the output size (width, height) with
    Lanczos, as diffusers' control-image processor does; then preprocessed at that size, so
    edges stay one pixel thin:
      "canny": `canny(image, low_threshold, high_threshold, sigma=sigma)`, white edges on
               black in all three channels;
      "none":  the resized image as is (an already-made edge map, depth map, pose...).
    save_path: also write the result as a PNG there (for inspection).
    """
    if preprocessor not in PREPROCESSORS:
        raise ValueError(f"control preprocessor {preprocessor!r} is not supported; choose one of {PREPROCESSORS}")
    pil = _to_pil(image)
    if pil.size != (width, height):
        pil = pil.resize((int(width), int(height)), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(pil, np.uint8)
    if preprocessor == "canny":
        edges = canny(pixels, low_threshold, high_threshold, sigma=sigma)
        pixels = np.repeat((edges * np.uint8(255))[..., None], 3, axis=-1).astype(np.uint8)
    if save_path is not None:
        from sdjax.images import save_png

        save_png(Image.fromarray(pixels), save_path)
    return pixels.astype(np.float32) / 255.0
