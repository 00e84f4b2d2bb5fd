"""AUTOMATIC1111 API JSON <-> sdjax: a txt2img / img2img payload as a `Request`, a result as
A1111's response, and A1111's lists (samplers, schedulers, models, LoRAs, PNG info).

Shapes follow A1111's `modules/api/models.py` (StableDiffusionTxt2ImgProcessingAPI,
StableDiffusionImg2ImgProcessingAPI, TextToImageResponse, SamplerItem, SchedulerItem,
SDModelItem, PNGInfoResponse). Everything here is a pure function of the payload and the
`Context` (folders, limits), so every process of a many-host server builds the same Request
from the same payload. Values are checked once, by the `Request` constructor; what is an
A1111 field sdjax lacks (hires fix, tiling, scripts) is refused with a message naming it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import inspect
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdjax import sampling
from sdjax.errors import RequestError, SdjaxError
from sdjax.images import INFOTEXT_KEY
from sdjax.metadata import parse_infotext
from sdjax.pipeline.control import ControlNetUnit
from sdjax.pipeline.generator import GenerationResult
from sdjax.pipeline.request import SEED_MAX, Limits, Request
from sdjax.sampling import samplers as sampler_fns
from sdjax.sampling.names import DEFAULT_SCHEDULE, SAMPLERS, SCHEDULES

FILL_MODES = ("fill", "original", "latent noise", "latent nothing")  # A1111 inpainting_fill 0..3
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
MODEL_SUFFIXES = (".safetensors", ".ckpt")
# A1111 fields sdjax does not implement: refused when set to anything but their "off" value.
UNSUPPORTED = {"enable_hr": False, "tiling": False, "script_name": None}


@dataclasses.dataclass(frozen=True)
class Context:
    """What turns a payload into a Request besides the payload: LoRA and ControlNet folders, limits."""

    lora_dir: Path | None = None
    controlnet_dir: Path | None = None
    limits: Limits = Limits()


def _field(payload: dict, name: str, kind, default):
    value = payload.get(name, default)
    if value is None:
        return default
    if kind is bool:
        if isinstance(value, (bool, int)) and value in (0, 1):
            return bool(value)
        raise RequestError(f"{name} must be true or false, got {value!r}")
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RequestError(f"{name} must be a {kind.__name__}, got {value!r}")
    return value


def decode_image(data: Any, name: str) -> Image.Image:
    """A base64 image (optionally a data: URL) as a PIL image; RequestError naming `name` else."""
    if not isinstance(data, str):
        raise RequestError(f"{name} must be a base64-encoded image, got {type(data).__name__}")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=False)))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
        raise RequestError(f"{name} is not a base64-encoded image ({e})") from None
    return image


def encode_png(image: Image.Image, infotext: str | None) -> str:
    """PNG with A1111's `parameters` text chunk, base64."""
    info = None
    if infotext is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(INFOTEXT_KEY, infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def resize(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's resize modes: 0 just resize, 1 crop and resize (cover, centre crop), 2 resize and
    fill (fit, edges stretched into the border), 3 latent upscale (a plain resize here)."""
    if image.size == (width, height):
        return image
    if mode in (0, 3):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio = width / height
    src = image.width / image.height
    cover = (mode == 1) == (src > ratio)
    w = width if not cover else round(height * src)
    h = height if cover else round(width / src)
    if mode == 2:
        w, h = (width, max(1, round(width / src))) if src > ratio else (max(1, round(height * src)), height)
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    if mode == 1:
        left, top = (w - width) // 2, (h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    a = np.asarray(resized)
    pad_y, pad_x = height - h, width - w
    widths = ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2)) + ((0, 0),) * (a.ndim - 2)
    return Image.fromarray(np.pad(a, widths, mode="edge"))


def resolve_seeds(payload: dict) -> dict:
    """The payload with seed -1 (and subseed -1 when used) replaced by a random seed, so it can be
    sent to every process and answered with the seeds actually used."""
    out = dict(payload)
    seed = _field(out, "seed", int, -1)
    if seed == -1:
        out["seed"] = random.randrange(SEED_MAX - 10**6)
    if _field(out, "subseed_strength", float, 0.0) > 0 and _field(out, "subseed", int, -1) == -1:
        out["subseed"] = random.randrange(SEED_MAX - 10**6)
    return out


def _knobs(payload: dict, sampler_id: str) -> dict:
    """A1111's eta / s_* fields, for the samplers that take them (A1111 ignores them elsewhere)."""
    valid = inspect.signature(sampler_fns.SAMPLERS[sampler_id]).parameters
    knobs = {}
    # A1111 writes Eta only when it is not the sampler's default; so does the Request then.
    if "eta" in valid and payload.get("eta") is not None and _field(payload, "eta", float, 1.0) != valid["eta"].default:
        knobs["eta"] = _field(payload, "eta", float, 1.0)
    if "s_noise" in valid and payload.get("s_noise") not in (None, 1, 1.0):
        knobs["s_noise"] = _field(payload, "s_noise", float, 1.0)
    if "s_churn" in valid and _field(payload, "s_churn", float, 0.0) > 0:
        knobs["s_churn"] = _field(payload, "s_churn", float, 0.0)
        knobs["s_tmin"] = _field(payload, "s_tmin", float, 0.0)
        tmax = _field(payload, "s_tmax", float, 0.0)
        knobs["s_tmax"] = tmax if tmax > 0 else float(np.finfo(np.float32).max)  # A1111: 0 = no upper bound
    return knobs


def _controlnets(payload: dict, ctx: Context) -> list[ControlNetUnit]:
    """`alwayson_scripts.ControlNet.args` (the sd-webui-controlnet extension) as sdjax units."""
    scripts = payload.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise RequestError("alwayson_scripts must be an object")
    unknown = sorted(k for k in scripts if k.lower() != "controlnet")
    if unknown:
        raise RequestError(f"alwayson_scripts {unknown} are not available in sdjax (only ControlNet)")
    args = next((v for k, v in scripts.items() if k.lower() == "controlnet"), {}) or {}
    args = args.get("args", []) if isinstance(args, dict) else args
    units = []
    for i, a in enumerate(args):
        where = f"alwayson_scripts.ControlNet.args[{i}]"
        if not isinstance(a, dict):
            raise RequestError(f"{where} must be an object")
        if not a.get("enabled", True):
            continue
        model = a.get("model")
        if not isinstance(model, str) or not model or model == "None":
            raise RequestError(f"{where}.model: name a ControlNet model")
        path = _find_controlnet(model, ctx.controlnet_dir, where)
        image = a.get("image", a.get("input_image"))
        if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...}
            image = image.get("image")
        if image is None:
            raise RequestError(f"{where}.image: a control image is needed")
        module = str(a.get("module", "none")).lower()
        if module not in ("none", "canny"):
            raise RequestError(f"{where}.module {module!r}: sdjax has the 'canny' and 'none' preprocessors")
        mode = a.get("control_mode", 0)
        units.append(ControlNetUnit(
            model=str(path), image=decode_image(image, f"{where}.image").convert("RGB"),
            scale=_field(a, "weight", float, 1.0), start=_field(a, "guidance_start", float, 0.0),
            end=_field(a, "guidance_end", float, 1.0), preprocessor=module,
            low_threshold=_field(a, "threshold_a", float, 100.0), high_threshold=_field(a, "threshold_b", float, 200.0),
            guess_mode=mode in (2, "ControlNet is more important")))
    return units


def _find_controlnet(name: str, folder: Path | None, where: str) -> Path:
    stem = name.split(" [")[0]  # "control_canny [abcd1234]"
    if folder is not None:
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if p.name == stem or p.stem == stem:
                return p
    raise RequestError(f"{where}.model {name!r} is not in the ControlNet folder {folder} (--controlnet-dir)")


def to_request(payload: dict, task: str, ctx: Context) -> tuple[Request, dict]:
    """(Request, notes) for an A1111 txt2img / img2img payload whose seeds are resolved
    (`resolve_seeds`). notes: what the response echoes (batch sizes, ...). Raises SdjaxError
    (RequestError, UnknownNameError, ...) naming the field for any bad value."""
    if not isinstance(payload, dict):
        raise RequestError("the request body must be a JSON object")
    for name, off in UNSUPPORTED.items():
        if payload.get(name, off) not in (off, None, False, ""):
            raise RequestError(f"{name} is not implemented by sdjax serve; leave it unset")
    sampler = _field(payload, "sampler_name", str, "") or _field(payload, "sampler_index", str, "") or "Euler a"
    schedule = _field(payload, "scheduler", str, "") or "Automatic"
    sampler_id, schedule_id = sampling.resolve(sampler, schedule)
    n_iter = _field(payload, "n_iter", int, 1)
    if n_iter < 1:
        raise RequestError(f"n_iter must be at least 1, got {n_iter}")
    batch = _field(payload, "batch_size", int, 1) * n_iter  # A1111: all_seeds = seed + i over every image
    overrides = payload.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise RequestError("override_settings must be an object")
    clip_skip = _field(overrides, "CLIP_stop_at_last_layers", int, 1)
    width, height = _field(payload, "width", int, 512), _field(payload, "height", int, 512)
    subseed_strength = _field(payload, "subseed_strength", float, 0.0)
    kw: dict[str, Any] = dict(
        negative_prompt=_field(payload, "negative_prompt", str, ""), steps=_field(payload, "steps", int, 20),
        sampler=sampler_id, schedule=schedule_id, cfg_scale=_field(payload, "cfg_scale", float, 7.0),
        seed=_field(payload, "seed", int, 0), width=width, height=height, batch_size=batch, clip_skip=clip_skip,
        knobs=_knobs(payload, sampler_id), lora_dir=ctx.lora_dir, limits=ctx.limits)
    if subseed_strength > 0:
        kw.update(subseed=_field(payload, "subseed", int, 0), subseed_strength=subseed_strength)
    if task == "img2img":
        images = payload.get("init_images")
        if not isinstance(images, list) or not images:
            raise RequestError("init_images must be a list with one base64 image")
        mode = _field(payload, "resize_mode", int, 0)
        if mode not in range(4):
            raise RequestError(f"resize_mode must be 0..3 ({', '.join(RESIZE_MODES)}), got {mode}")
        _ = Request("", width=width, height=height, limits=ctx.limits)  # size checked before resizing
        init = resize(decode_image(images[0], "init_images[0]").convert("RGB"), width, height, mode)
        kw.update(init_image=init, strength=_field(payload, "denoising_strength", float, 0.75))
        if payload.get("mask") is not None:
            mask = resize(decode_image(payload["mask"], "mask").convert("L"), width, height, mode)
            if _field(payload, "inpainting_mask_invert", int, 0):
                mask = Image.eval(mask, lambda v: 255 - v)
            fill = _field(payload, "inpainting_fill", int, 1)
            if fill not in range(4):
                raise RequestError(f"inpainting_fill must be 0..3 ({', '.join(FILL_MODES)}), got {fill}")
            kw.update(mask=mask, mask_blur=_field(payload, "mask_blur", float, 4.0), inpainting_fill=FILL_MODES[fill],
                      inpaint_full_res=_field(payload, "inpaint_full_res", bool, False),
                      inpaint_full_res_padding=_field(payload, "inpaint_full_res_padding", int, 32))
    units = _controlnets(payload, ctx)
    if units:
        kw["controlnets"] = units
    request = Request(_field(payload, "prompt", str, ""), **kw)
    return request, {"sampler": sampler_id, "schedule": schedule_id}


def response(payload: dict, result: GenerationResult | None, request: Request, model_name: str,
             model_hash: str | None, interrupted: bool = False) -> dict:
    """TextToImageResponse / ImageToImageResponse: base64 PNGs with their parameters chunk, the
    request echoed in `parameters`, and `info` as A1111's JSON string."""
    n = int(request.batch_size)
    prompts = list(request.prompt) if isinstance(request.prompt, (list, tuple)) else [request.prompt] * n
    negatives = [request.negative_prompt] * n if isinstance(request.negative_prompt, str) else list(request.negative_prompt)
    seeds = [int(request.seed) + i for i in range(n)]
    subseeds = [int(request.subseed) + i for i in range(n)] if request.subseed is not None else [-1] * n
    sampler_label, schedule_label = sampling.display_names(request.sampler, request.schedule)
    info = {
        "prompt": prompts[0] if prompts else "", "all_prompts": prompts,
        "negative_prompt": negatives[0] if negatives else "", "all_negative_prompts": negatives,
        "seed": seeds[0], "all_seeds": seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
        "subseed_strength": request.subseed_strength, "width": request.width, "height": request.height,
        "sampler_name": sampler_label, "scheduler": schedule_label, "cfg_scale": request.cfg_scale,
        "steps": request.steps, "batch_size": payload.get("batch_size", 1), "n_iter": payload.get("n_iter", 1),
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model_name,
        "sd_model_hash": model_hash, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": request.strength if request.init_image is not None else None,
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [] if result is None else list(result.infotexts), "styles": [], "job_timestamp": "",
        "clip_skip": request.clip_skip, "is_using_inpainting_conditioning": False, "interrupted": interrupted,
    }
    images = [] if result is None else [encode_png(im, t) for im, t in zip(result.images, result.infotexts)]
    echo = {k: v for k, v in payload.items() if k not in ("init_images", "mask", "alwayson_scripts")}
    return {"images": images, "parameters": echo, "info": json.dumps(info)}


def samplers() -> list[dict]:
    """SamplerItem list: name (A1111's label), aliases, options."""
    return [{"name": sampling.display_names(s, DEFAULT_SCHEDULE[s])[0], "aliases": [s], "options": {}}
            for s in SAMPLERS]


def schedulers() -> list[dict]:
    """SchedulerItem list, "automatic" first as in A1111."""
    items = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]
    for s in SCHEDULES:
        items.append({"name": s, "label": sampling.display_names("euler", s)[1], "aliases": None,
                      "default_rho": 7.0 if s == "karras" else -1, "need_inner_model": False})
    return items


def model_item(path: Path, short_hash: str | None = None) -> dict:
    """SDModelItem of a checkpoint file or diffusers folder."""
    name = path.stem if path.is_file() else path.name
    title = f"{name} [{short_hash}]" if short_hash else name
    return {"title": title, "model_name": name, "hash": short_hash, "sha256": None, "filename": str(path),
            "config": None}


def list_models(folder: Path | None) -> list[Path]:
    """Checkpoints in `folder`: .safetensors / .ckpt files and diffusers folders (model_index.json)."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if (p.is_file() and p.suffix.lower() in MODEL_SUFFIXES) or (p / "model_index.json").is_file())


def list_loras(folder: Path | None) -> list[dict]:
    """A1111's /loras items: name, alias, path, metadata."""
    if folder is None or not folder.is_dir():
        return []
    return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}}
            for p in sorted(folder.iterdir()) if p.suffix.lower() in (".safetensors", ".pt", ".ckpt")]


def png_info(payload: dict) -> dict:
    """PNGInfoResponse of {"image": base64}: info (the parameters text), items (other text
    chunks), parameters (the text read into A1111's keys)."""
    if not isinstance(payload, dict):
        raise RequestError("the request body must be a JSON object")
    image = decode_image(payload.get("image"), "image")
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    text = items.pop(INFOTEXT_KEY, None)
    return {"info": text or "", "items": items, "parameters": parse_infotext(text) if text else {}}


def error_body(e: SdjaxError | Exception) -> dict:
    """A1111's HTTPException body shape: error, detail, body, errors."""
    return {"error": type(e).__name__, "detail": str(e), "body": "", "errors": str(e)}


__all__ = ["Context", "FILL_MODES", "RESIZE_MODES", "decode_image", "encode_png", "error_body", "list_loras",
           "list_models", "model_item", "png_info", "resize", "resolve_seeds", "response", "samplers",
           "schedulers", "to_request"]
