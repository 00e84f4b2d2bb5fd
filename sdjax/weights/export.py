"""Writing weights back to the files other tools read: a diffusers folder (safetensors).

The text encoder is written in the transformers v4 layout (`text_model.` prefix),
the layout of every published SD checkpoint, which transformers v4 and v5,
diffusers, A1111 and ComfyUI all read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from sdjax.weights.mapping import export_state

# Weight file name of each component in a diffusers folder.
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "controlnet": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}

MODEL_INDEX_CLASSES = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
}


def text_encoder_v4_names(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """sdjax CLIP names -> transformers v4 names (the layout of real checkpoints); a
    CLIPTextModelWithProjection's `text_projection` stays outside `text_model.`."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
            for k, v in flat.items()}


def save_component(out_dir: str | Path, name: str, flat: Mapping[str, np.ndarray], config: dict,
                   *, dtype: str | None = None, variant: str | None = None) -> Path:
    """Write `<out_dir>/<name>/config.json` and its safetensors file; returns the folder.

    flat: torch-named arrays in torch layouts (`sdjax.weights.mapping.export_state`).
    dtype: "float16" / "float32" / "bfloat16" to cast floating tensors, or None to keep.
    """
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    if name in ("text_encoder", "text_encoder_2"):
        flat = text_encoder_v4_names(flat)
    tensors = {}
    for k, v in flat.items():
        v = np.ascontiguousarray(np.asarray(v))
        if dtype is not None and (v.dtype.kind == "f" or v.dtype == ml_dtypes.bfloat16):
            v = v.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
        tensors[k] = v
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    target = folder / (WEIGHT_FILES.get(name, "diffusion_pytorch_model") + suffix)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        save_file(tensors, str(tmp_path), metadata={"format": "pt"})
        os.chmod(tmp_path, 0o644)  # NamedTemporaryFile creates 0600; weights are ordinary files
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)
    _write_json(folder / "config.json", config)
    return folder


def save_model_index(out_dir: str | Path, components: list[str], *,
                     scheduler_class: str = "EulerDiscreteScheduler", extra: dict | None = None) -> None:
    """Write model_index.json naming each component's library and class."""
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0"}
    for c in components:
        if c == "scheduler":
            index[c] = ["diffusers", scheduler_class]
        else:
            index[c] = MODEL_INDEX_CLASSES[c]
    index.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                  "requires_safety_checker": False})
    index.update(extra or {})
    _write_json(Path(out_dir) / "model_index.json", index)


def save_sdxl_model_index(out_dir: str | Path, *, refiner: bool = False, inpainting: bool = False,
                          scheduler_class: str = "EulerDiscreteScheduler", template: Mapping | None = None) -> None:
    """Write an SDXL model_index.json: the base (both encoders), inpainting or the refiner (text_encoder_2
    only, aesthetic-score time ids). `force_zeros_for_empty_prompt` / `requires_aesthetics_score` come
    from `template` (another SDXL model_index dict) when it has them, else diffusers' defaults."""
    template = template or {}
    components = ["unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"]
    cls = "StableDiffusionXLImg2ImgPipeline" if refiner else \
        "StableDiffusionXLInpaintPipeline" if inpainting else "StableDiffusionXLPipeline"
    flags = {"force_zeros_for_empty_prompt": template.get("force_zeros_for_empty_prompt", not refiner),
             "add_watermarker": None}
    if refiner:
        flags.update(text_encoder=[None, None], tokenizer=[None, None],
                     requires_aesthetics_score=template.get("requires_aesthetics_score", True))
    else:
        components += ["text_encoder", "tokenizer"]
    index = {"_class_name": cls, "_diffusers_version": "0.30.0", **flags}
    for c in sorted(components):
        index[c] = ["diffusers", scheduler_class] if c == "scheduler" else MODEL_INDEX_CLASSES[c]
    _write_json(Path(out_dir) / "model_index.json", index)


def save_scheduler(out_dir: str | Path, scheduler_config: dict) -> None:
    folder = Path(out_dir) / "scheduler"
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "scheduler_config.json", scheduler_config)


def copy_tokenizer(src_dir: str | Path, out_dir: str | Path, name: str = "tokenizer") -> None:
    """Copy a CLIPTokenizer folder (vocab.json, merges.txt, its JSON files) into `<out_dir>/<name>`."""
    dst = Path(out_dir) / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_pipeline(pipe, out_dir: str | Path, *, dtype: str | None = None, unet_state=None,
                  text_encoder_state=None, vae_state=None) -> Path:
    """Write a loaded pipeline (optionally with replacement component states) as a diffusers folder.

    Configs, tokenizer and scheduler config are copied from the folder the pipeline was
    loaded from (`pipe.model_dir`). dtype: cast floating weights ("float16" for a small
    release), or None to keep the stored dtype. An SDXL pipeline also writes text_encoder_2 and
    tokenizer_2, and keeps its model_index.json (the refiner has no text_encoder / tokenizer).
    """
    from flax import nnx


    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(pipe.model_dir)
    states = {"unet": unet_state, "text_encoder": text_encoder_state, "vae": vae_state}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        component = getattr(pipe, name, None)
        if component is None:
            continue  # SD has no text_encoder_2, the SDXL refiner no text_encoder
        state = states.get(name) if states.get(name) is not None else component.state
        flat = export_state(nnx.merge(component.graphdef, state))
        config = json.loads((src / name / "config.json").read_text())
        save_component(out_dir, name, flat, config, dtype=dtype)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            copy_tokenizer(src / name, out_dir, name)
    save_scheduler(out_dir, dict(pipe.scheduler_config))
    index = json.loads((src / "model_index.json").read_text())
    if getattr(pipe, "family", "sd") != "sd":
        _write_json(out_dir / "model_index.json", index)
        return out_dir
    save_model_index(out_dir, ["unet", "text_encoder", "vae", "tokenizer", "scheduler"],
                     scheduler_class=index.get("scheduler", [None, "EulerDiscreteScheduler"])[1])
    return out_dir
