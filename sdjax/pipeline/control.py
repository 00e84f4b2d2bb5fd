"""ControlNet in generation: load one, prepare its control image, per-step scales, units.

The residuals hook inside the compiled sampler is `sdjax.pipeline.core.residuals_hook`;
Canny edges are `sdjax.pipeline.canny`.

    unit = ControlNetUnit(model="control_sd15_canny", image="photo.png", scale=1.0, start=0.0,
                          end=1.0, preprocessor="canny", low_threshold=100, high_threshold=200)
    result = pipe.generate("a house", controlnets=[unit], sampler="euler")

Rules (diffusers' StableDiffusionControlNet(Img2Img/Inpaint)Pipeline):
- the control image is resized to the output size (Lanczos) and preprocessed there
  (`prepare_control_image`), values in [0, 1];
- per-step scale = scale if start <= i / n and (i + 1) / n <= end else 0, for the n steps
  actually run (img2img counts only those; the skipped leading steps get zero rows);
- the network sees the same scaled latents, timestep and context as the UNet (the 4 latent
  channels, before a 9-channel inpainting UNet's extra channels); our CFG batch is
  [cond, uncond], so the image is repeated to 2B;
- guess mode (or a `global_pool_conditions` ControlNet): the ControlNet runs on the cond
  half only, with diffusers' logspace weights, and the uncond half gets zero residuals;
- several units: each with its own state, image and scale column; residuals are summed.
The per-step scales are a traced (steps, n_units) input, so scale, start and end never
recompile; the ControlNet weights are traced states, the graphs are static.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from sdjax.errors import TaskError
from sdjax.images import save_png
from sdjax.models.kernels import Kernels
from sdjax.pipeline.canny import canny
from sdjax.pipeline.components import Component, check_dtype, jitted
from sdjax.pipeline.core import record_scales, scale_at  # noqa: F401  (part of this module's API)
from sdjax.weights.controlnet_files import load_controlnet_model

PREPROCESSORS = ("canny", "none")


class ControlNet(Component):
    """A ControlNetModel as a component (see `sdjax.pipeline.components`): `graphdef`, `state`, `config`
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
                 guess_mode: bool = False, text_embeds=None, time_ids=None):
        """latents (B, h, w, C), timesteps scalar or (B,), context (B, L, D), control image
        (B, 8h, 8w, 3) in [0, 1] -> (down residuals, mid residual), NHWC, for the UNet's
        `down_residuals` / `mid_residual`. SDXL ControlNets also take `text_embeds` (B, P) and
        `time_ids` (B, n), as the SDXL UNet."""
        sdxl = {} if text_embeds is None and time_ids is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.apply(self.state, latents_nhwc, timesteps, context, cond_image_nhwc,
                          jnp.asarray(conditioning_scale, jnp.float32), guess_mode=guess_mode, **sdxl)


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
    model, cfg = load_controlnet_model(path, check_dtype(dtype), config=config, variant=variant,
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
        save_png(Image.fromarray(pixels), save_path)
    return pixels.astype(np.float32) / 255.0


# ------------------------------------------------------------------------------------ units




@dataclasses.dataclass
class ControlNetUnit:
    """One ControlNet for `Pipeline.generate(..., controlnets=[...])`.

    model: a loaded `ControlNet` or a path (diffusers folder or original
      `control_*.safetensors/.pth` file; loaded in the pipeline's dtype and cached by its Generator).
    image: path, PIL image or uint8 (H, W, 3) array; resized to the output size.
    scale: conditioning scale; start, end: fractions of the steps run in [0, 1], start < end.
    preprocessor: "none" (image used as is: depth, pose, scribble maps...) or "canny"
      (low_threshold, high_threshold on 0..255 gradients). guess_mode: diffusers' guess mode.
    save_path: also write the preprocessed control image there (PNG).
    """

    model: Any
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "none"
    low_threshold: float = 100.0
    high_threshold: float = 200.0
    guess_mode: bool = False
    save_path: str | os.PathLike | None = None


@dataclasses.dataclass
class PreparedControl:
    """static: ((graphdef, guess_mode), ...) for `core.Spec.controlnets`; inputs: the
    traced {"states", "images" (1, H, W, 3) each, "scales" (steps, n)} (no batch axis: the
    hook broadcasts the image to the batch it sees); infotext params."""

    static: tuple
    inputs: dict
    infotext: dict[str, str]


def _model_hash(path: Path) -> str:
    """sd-webui-controlnet shows models as `name [hash]`, hash = A1111's old model hash
    (SHA-256 of 64 KiB at offset 1 MiB, 8 hex digits) of the weight file."""
    if path.is_dir():
        files = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin"))
        if not files:
            return "00000000"
        path = files[0]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]


def _load(model, dtype, kernels, cache: dict) -> ControlNet:
    """A ControlNet as given, or loaded from its path once per (path, dtype, kernels) into `cache`."""
    if isinstance(model, ControlNet):
        return model
    path = Path(model)
    key = (str(path.resolve()), str(dtype), kernels)
    if key not in cache:
        cache[key] = load_controlnet(path, dtype, kernels=kernels)
    return cache[key]


def _number(x: float) -> str:
    return str(int(x)) if float(x) == int(x) else str(float(x))


def unit_infotext(unit: ControlNetUnit, net: ControlNet, width: int, height: int) -> str:
    """The `ControlNet i` value sd-webui-controlnet writes: `Module: canny, Model: name [hash],
    Weight: 1, ...` (fields it would not show, like thresholds of "none", are left out)."""
    source = Path(net.source) if net.source is not None else None
    name = "unknown"
    if source is not None:
        name = f"{source.stem if source.is_file() else source.name} [{_model_hash(source)}]"
    fields = {"Module": unit.preprocessor, "Model": name.replace(",", "").replace(":", ""),
              "Weight": _number(unit.scale), "Resize Mode": "Just Resize",
              "Processor Res": str(min(width, height))}
    if unit.preprocessor == "canny":
        fields.update({"Threshold A": _number(unit.low_threshold), "Threshold B": _number(unit.high_threshold)})
    fields.update({"Guidance Start": _number(unit.start), "Guidance End": _number(unit.end),
                   "Pixel Perfect": "False",
                   "Control Mode": "ControlNet is more important" if unit.guess_mode else "Balanced"})
    return ", ".join(f"{k}: {v}" for k, v in fields.items())


def prepare(units: Sequence[ControlNetUnit], width: int, height: int, steps: int, start: int, *,
            dtype, kernels: Kernels | None, cache: dict, unet_config=None) -> PreparedControl:
    """Load the units' models, prepare their images at (width, height), and build the traced
    (steps, n) scale table (models loaded from paths are kept in `cache`): diffusers' rule over the `steps - start` steps run, left-padded
    with `start` zero rows (img2img). Raises ValueError for bad fractions / preprocessors, and
    TaskError for a ControlNet made for another kind of UNet than `unet_config` (`UNetConfig`:
    SD 1.x / 2.x vs SDXL, context width)."""
    static, states, images, infotext = [], [], [], {}
    for i, unit in enumerate(units):
        if not isinstance(unit, ControlNetUnit):
            raise TypeError(f"controlnets[{i}] must be a ControlNetUnit, not {type(unit).__name__}")
        net = _load(unit.model, dtype, kernels, cache)
        if unet_config is not None:
            ours = (net.config.unet.addition_embed_type, net.config.unet.cross_attention_dim[0])
            theirs = (unet_config.addition_embed_type, unet_config.cross_attention_dim[0])
            if ours != theirs:
                kind = lambda v: f"{'an SDXL' if v[0] == 'text_time' else 'an SD 1.x / 2.x'} UNet (context {v[1]})"  # noqa: E731
                raise TaskError(f"ControlNet {unit.model}: made for {kind(ours)}, but this model is {kind(theirs)}")
        hint = prepare_control_image(unit.image, width, height, preprocessor=unit.preprocessor,
                                     low_threshold=unit.low_threshold, high_threshold=unit.high_threshold,
                                     save_path=unit.save_path)
        guess = bool(unit.guess_mode or net.config.global_pool_conditions)
        static.append((net.graphdef, guess))
        states.append(net.state)
        images.append(jnp.asarray(hint)[None])  # (1, H, W, 3): shared by the batch, so never sharded
        infotext[f"ControlNet {i}"] = unit_infotext(unit, net, width, height)
    run = steps - start
    table = controlnet_step_scales(run, [float(u.scale) for u in units], [float(u.start) for u in units],
                                   [float(u.end) for u in units])
    table = np.concatenate([np.zeros((start, len(units)), np.float32), table], axis=0)
    return PreparedControl(tuple(static), {"states": states, "images": images, "scales": jnp.asarray(table)},
                           infotext)


__all__ = ["ControlNet", "ControlNetUnit", "PREPROCESSORS", "PreparedControl", "canny", "controlnet_keep",
           "controlnet_step_scales", "load_controlnet", "prepare", "prepare_control_image", "record_scales",
           "scale_at", "unit_infotext"]
