"""diffusers-format checkpoint folders -> sdjax models with their weights.

A folder as written by `StableDiffusionPipeline.save_pretrained`:
    model_index.json              component name -> [library, class]
    unet/config.json + diffusion_pytorch_model[.fp16].safetensors | .bin | sharded index
    vae/config.json  + diffusion_pytorch_model...
    text_encoder/config.json + model.safetensors | pytorch_model.bin | sharded index
    tokenizer/  scheduler/scheduler_config.json   (safety_checker/, feature_extractor/: ignored)
SDXL adds text_encoder_2/ (CLIPTextModelWithProjection) and tokenizer_2/; the SDXL refiner
has only those two (text_encoder and tokenizer are null in its model_index.json).

Each model is built abstractly with `nnx.eval_shape` (no random init, no
memory), and each tensor goes from the file straight to its final dtype and
placement through `sdjax.weights.mapping.load_state`. Torch is never imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.errors import CheckpointError, ConfigError
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.weights import names
from sdjax.weights.files import read_component_weights
from sdjax.weights.mapping import load_state

# Components a Stable Diffusion 1.x/2.x folder must have, with the classes sdjax reads.
EXPECTED = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": None,  # any diffusers scheduler: only its config is read
}
# Listed by real checkpoints but not needed for generation.
IGNORED = ("safety_checker", "feature_extractor", "image_encoder")
# SDXL's second text encoder and tokenizer (the refiner has only these two).
SDXL_EXPECTED = {
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
FAMILIES = ("sd", "sdxl", "sdxl-refiner")
# Components sdjax does not support yet; loading without them would give wrong images.
UNSUPPORTED = {"controlnet": "a ControlNet pipeline folder", "prior": "a prior pipeline",
               "text_encoder_3": "Stable Diffusion 3 (three text encoders)",
               "transformer": "a transformer (DiT) pipeline such as SD3 or Flux"}


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def model_family(index: dict) -> str:
    """"sd" (1.x / 2.x), "sdxl" (two text encoders) or "sdxl-refiner" (only text_encoder_2) from a
    validated model_index.json dict (`read_model_index`)."""
    if not _present(index, "text_encoder_2"):
        return "sd"
    return "sdxl" if _present(index, "text_encoder") else "sdxl-refiner"


def _what_is_expected() -> str:
    return ("a diffusers checkpoint folder: model_index.json next to the folders "
            "unet/, vae/, text_encoder/, tokenizer/ and scheduler/")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from `path`; `CheckpointError` naming the file if missing or malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """Validate `model_index.json` of a diffusers folder and return it.

    Raises `CheckpointError` if the folder is not a diffusers checkpoint, a required
    component (unet, vae, text_encoder, tokenizer, scheduler; for SDXL also text_encoder_2
    and tokenizer_2; the SDXL refiner has no text_encoder / tokenizer) is absent or has a
    class sdjax does not read, or the folder holds an unsupported component (SD3's
    text_encoder_3, ...). Absent or null optional components are fine.
    """
    folder = Path(folder)
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file; load_pipeline expects {_what_is_expected()}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist; expected {_what_is_expected()}")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
        raise CheckpointError(f"{folder} is not a diffusers checkpoint: no model_index.json. Expected "
                              f"{_what_is_expected()}; the folder holds: {present}")
    index = read_json(index_path)
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue  # metadata, or flags such as `requires_safety_checker`
        if name in UNSUPPORTED and entry[-1] is not None:
            raise CheckpointError(f"{index_path}: component {name!r} ({entry[-1]}) means "
                                  f"{UNSUPPORTED[name]}, which sdjax does not support yet")
    expected = dict(EXPECTED)
    family = model_family(index)
    if family != "sd":
        expected.update(SDXL_EXPECTED)
    if family == "sdxl-refiner":
        del expected["text_encoder"], expected["tokenizer"]
    if family == "sd" and _present(index, "tokenizer_2"):
        raise CheckpointError(f"{index_path}: tokenizer_2 without text_encoder_2; an SDXL folder has both")
    for name, classes in expected.items():
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise CheckpointError(f"{index_path}: no {name!r} component; expected {_what_is_expected()}")
        if classes is not None and entry[1] not in classes:
            raise CheckpointError(f"{index_path}: {name} is a {entry[0]}.{entry[1]}; sdjax reads "
                                  f"{' or '.join(classes)}")
        if not (folder / name).is_dir():
            raise CheckpointError(f"{folder}: model_index.json lists {name!r} but the folder {name}/ is missing")
    return index


def _table_entry(kind: str):
    # Imported on use: loading one component must not import models it does not need.
    if kind == "unet":
        return UNetConfig, UNet2DConditionModel, names.unet
    if kind == "vae":
        return VAEConfig, AutoencoderKL, names.vae
    if kind == "text_encoder":
        return CLIPTextConfig, CLIPTextModel, names.clip_text
    if kind == "text_encoder_2":
        return CLIPTextConfig, CLIPTextModelWithProjection, names.clip_text
    raise ValueError(f"unknown component kind {kind!r}; expected unet, vae, text_encoder or text_encoder_2")


def read_config(kind: str, folder: str | os.PathLike):
    """`<folder>/config.json` -> the model's config dataclass; `ConfigError` names the file."""
    config_cls, _, _ = _table_entry(kind)
    path = Path(folder) / "config.json"
    raw = read_json(path)
    try:
        return config_cls.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _shape_only_rngs() -> nnx.Rngs:
    """`nnx.Rngs` for building models under `nnx.eval_shape`, with host (numpy) counters.

    Why: each `rngs.params()` under tracing stores a traced counter, and flax then probes
    that tracer's `.sharding`, whose error message walks the whole jaxpr, so building the
    SD 1.5 UNet abstractly takes 17 s (quadratic in the parameter count). A numpy counter
    stays concrete (2 s). The keys' values are irrelevant: only shapes survive eval_shape.
    """
    rngs = nnx.Rngs(0)
    for _, node in nnx.iter_graph(rngs):
        if isinstance(node, nnx.RngCount) and hasattr(node, "set_raw_value"):
            node.set_raw_value(np.zeros(np.shape(node.get_raw_value()), np.uint32))
    return rngs


def abstract_model(model_cls: type, config: Any, dtype: Any = jnp.float32, param_dtype: Any = None) -> nnx.Module:
    """`model_cls(config, ...)` with `jax.ShapeDtypeStruct` leaves: no memory, no random init.

    dtype: compute dtype; param_dtype: parameter dtype (default: `dtype`)."""
    dtype = jnp.dtype(dtype)
    param_dtype = dtype if param_dtype is None else jnp.dtype(param_dtype)
    return nnx.eval_shape(lambda: model_cls(config, rngs=_shape_only_rngs(), dtype=dtype, param_dtype=param_dtype))


def load_model(
    kind: str,
    folder: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    variant: str | None = None,
    sharding: Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None = None,
) -> tuple[nnx.Module, Any]:
    """One component folder (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`) -> (model with weights, config).

    kind: "unet", "vae", "text_encoder" or "text_encoder_2" (SDXL's CLIPTextModelWithProjection).
    dtype: parameter and compute dtype
    (float32 or bfloat16). variant: prefer `*.{variant}.safetensors` files (e.g.
    "fp16"; their values are cast to `dtype`). sharding: optional
    `(state path, abstract leaf) -> Sharding` for each parameter (default: the
    default device).

    The model is built with `nnx.eval_shape`, so no random weights are ever
    materialised; missing, unexpected, renamed or mis-shaped tensors raise
    `CheckpointError` naming the file and the tensors.
    """
    _, model_cls, rename = _table_entry(kind)
    folder = Path(folder)
    dtype = jnp.dtype(dtype)
    config = read_config(kind, folder)
    flat, source = read_component_weights(folder, variant)
    abstract = abstract_model(model_cls, config, dtype)
    model = load_state(abstract, rename(flat), dtype=dtype, ignore=names.is_ignored,
                       source=str(source), sharding=sharding)
    return model, config


def load_tokenizer(folder: str | os.PathLike):
    """`tokenizer/` -> a transformers `CLIPTokenizer` (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer  # slow import: only when a tokenizer is loaded

    folder = Path(folder)
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{folder}: cannot load the CLIP tokenizer (expected vocab.json and "
                              f"merges.txt): {e}") from None


def read_scheduler_config(folder: str | os.PathLike) -> dict[str, Any]:
    """`scheduler/scheduler_config.json` as a dict (metadata keys such as `_class_name` kept)."""
    return read_json(Path(folder) / "scheduler_config.json")
