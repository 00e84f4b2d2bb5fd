"""ControlNet units in generation: host preparation and the residuals hook of the jitted sampler.

    unit = ControlNetUnit(model="control_sd15_canny", image="photo.png", scale=1.0, start=0.0,
                          end=1.0, preprocessor="canny", low_threshold=100, high_threshold=200)
    result = pipe.generate("a house", controlnets=[unit], sampler="euler")

Rules (diffusers' StableDiffusionControlNet(Img2Img/Inpaint)Pipeline):
- the control image is resized to the output size (Lanczos) and preprocessed there
  (`sdjax.controlnet.prepare_control_image`), values in [0, 1];
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

import contextlib
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.controlnet import (
    ControlNet,
    controlnet_step_scales,
    load_controlnet,
    prepare_control_image,
    scale_at,
)
from sdjax.models.controlnet import sum_residuals


@dataclasses.dataclass
class ControlNetUnit:
    """One ControlNet for `Pipeline.generate(..., controlnets=[...])`.

    model: a loaded `sdjax.controlnet.ControlNet` or a path (diffusers folder or original
      `control_*.safetensors/.pth` file; loaded in the pipeline's dtype and cached on it).
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
    """static: ((graphdef, guess_mode), ...) for `generation.Spec.controlnets`; inputs: the
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


def _load(pipe, model) -> ControlNet:
    if isinstance(model, ControlNet):
        return model
    path = Path(model)
    cache = getattr(pipe, "_sdjax_controlnet_cache", None)
    if cache is None:
        cache = pipe._sdjax_controlnet_cache = {}
    key = (str(path.resolve()), str(pipe.dtype), getattr(pipe, "kernels", None))
    if key not in cache:
        cache[key] = load_controlnet(path, pipe.dtype, kernels=getattr(pipe, "kernels", None))
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


def prepare(pipe, units: Sequence[ControlNetUnit], width: int, height: int, steps: int, start: int,
            batch: int) -> PreparedControl:
    """Load the units' models, prepare their images at (width, height), and build the traced
    (steps, n) scale table: diffusers' rule over the `steps - start` steps run, left-padded
    with `start` zero rows (img2img). Raises ValueError for bad fractions / preprocessors."""
    static, states, images, infotext = [], [], [], {}
    for i, unit in enumerate(units):
        if not isinstance(unit, ControlNetUnit):
            raise TypeError(f"controlnets[{i}] must be a ControlNetUnit, not {type(unit).__name__}")
        net = _load(pipe, unit.model)
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


_RECORDERS: list[Callable] = []


def _record(t, scales):
    for fn in list(_RECORDERS):
        fn(float(t), np.asarray(scales))


@contextlib.contextmanager
def record_scales(fn: Callable[[float, np.ndarray], None]) -> Iterator[None]:
    """While active, functions built with `Spec(record_control=True)` call `fn(t, scales)` on
    the host for every ControlNet evaluation: the UNet timestep and the (n_units,) scales used."""
    _RECORDERS.append(fn)
    try:
        yield
    finally:
        _RECORDERS.remove(fn)


def residuals_hook(static: tuple, control: dict, levels: jax.Array, record: bool = False) -> Callable:
    """`hook(x_scaled (2B,h,w,4), t (2B,), context (2B,L,D)) -> {down_residuals, mid_residual}`
    for `generation.guided_denoiser`. levels: the UNet timesteps of the sigma schedule, (steps+1,),
    to find the step of an evaluation (`scale_at`)."""

    def hook(x_scaled, t, context):
        b = x_scaled.shape[0] // 2
        scales = scale_at(t, levels, control["scales"])
        if record:
            jax.debug.callback(_record, t[0], scales)
        outputs = []
        for j, (graphdef, guess) in enumerate(static):
            net = nnx.merge(graphdef, control["states"][j])
            image = jnp.broadcast_to(control["images"][j], (b,) + control["images"][j].shape[1:])
            if guess:  # cond half only (our CFG batch is [cond, uncond]); uncond gets zeros
                down, mid = net(x_scaled[:b], t[:b], context[:b], image, scales[j], guess_mode=True)
                down = [jnp.concatenate([r, jnp.zeros_like(r)], axis=0) for r in down]
                mid = jnp.concatenate([mid, jnp.zeros_like(mid)], axis=0)
            else:
                down, mid = net(x_scaled, t, context, jnp.concatenate([image, image], axis=0), scales[j])
            outputs.append((down, mid))
        down, mid = sum_residuals(outputs)
        return {"down_residuals": down, "mid_residual": mid}

    return hook


__all__ = ["ControlNetUnit", "PreparedControl", "prepare", "residuals_hook", "record_scales", "unit_infotext"]
