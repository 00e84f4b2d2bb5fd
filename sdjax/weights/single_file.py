"""Single-file Stable Diffusion 1.x/2.x and SDXL checkpoints (`.safetensors`, `.ckpt`) <-> diffusers components.

    ckpt = read_single_file("v1-5-pruned-emaonly.safetensors")
    ckpt.family            "sd1" | "sd1-inpainting" | "sd2" (512, eps) | "sd2-v" (768, v) | "sd2-inpainting"
                           | "sdxl" | "sdxl-inpainting" | "sdxl-refiner" (SGM layout, `sdjax.weights.sgm`)
    ckpt.prediction_type   "epsilon" | "v_prediction"
    ckpt.weights["unet"]   flat diffusers names -> arrays (torch layouts; file dtype kept)
    ckpt.configs["unet"]   diffusers config dicts (also "vae", "text_encoder", "scheduler", "model_index";
                           SDXL adds "text_encoder_2", the refiner has no "text_encoder")

Configs come from the reference configs shipped in `sdjax/weights/configs/` (a
user's machine has no diffusers folder), or from `config_dir`, a diffusers-layout
folder whose `*/config.json` replace them (needed for non-standard sizes).

The prediction type comes from, in order: the `prediction_type` argument; a
sidecar `<file>.yaml` (A1111: `parameterization: "v"`); the safetensors metadata
key `modelspec.prediction_type`; for SD2 (non-inpainting) diffusers' rule
(`global_step == 875000` is SD 2.0-base, epsilon; otherwise v); else epsilon.
SDXL base vs refiner comes from the tensors (which text encoders the file holds).

`.ckpt` files are read by the restricted unpickler (nothing in the file runs);
their `state_dict` nesting is unwrapped. EMA weights (`model_ema.*`) are used when
the file has a complete EMA copy of the UNet, unless `prefer_ema=False`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from sdjax.errors import CheckpointError, ConfigError
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.weights import export, ldm, names, sgm
from sdjax.weights.diffusers import abstract_model, model_family, read_model_index
from sdjax.weights.files import read_component_weights, read_safetensors, read_safetensors_header
from sdjax.weights.mapping import load_state
from sdjax.weights.pickle_safe import load_torch_file

CONFIGS = Path(__file__).resolve().parent / "configs"
PREDICTION_TYPES = ("epsilon", "v_prediction")
FAMILIES = ("sd1", "sd1-inpainting", "sd2", "sd2-v", "sd2-inpainting", *sgm.FAMILIES)
# family -> (template folder, overrides per component)
_TEMPLATES: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "sd1": ("sd15", {}),
    "sd1-inpainting": ("sd15", {"unet": {"in_channels": 9}}),
    "sd2": ("sd21", {"unet": {"sample_size": 64}, "vae": {"sample_size": 512}}),
    "sd2-v": ("sd21", {}),
    "sd2-inpainting": ("sd2-inpainting", {}),
    "sdxl": ("sdxl-base", {}),
    "sdxl-inpainting": ("sdxl-base", {"unet": {"in_channels": 9}}),
    "sdxl-refiner": ("sdxl-refiner", {}),
}
# Text encoders (and their tokenizers) of each kind of pipeline.
_ENCODERS = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"), "sdxl-refiner": ("text_encoder_2",)}
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class SingleFileCheckpoint:
    """A single-file checkpoint split into diffusers-named components (see the module docstring)."""

    path: Path
    family: str
    prediction_type: str
    weights: dict[str, dict[str, Any]]
    configs: dict[str, dict[str, Any]]
    tokenizer_dir: Path | None = None          # a diffusers `tokenizer/` folder, if config_dir had one
    used_ema: bool = False
    tokenizer_2_dir: Path | None = None        # SDXL: config_dir's `tokenizer_2/`, if it had one

    @property
    def pipeline_family(self) -> str:
        """"sd", "sdxl" or "sdxl-refiner": the `Pipeline.family` (and diffusers folder kind) it makes."""
        return "sdxl-refiner" if self.family == "sdxl-refiner" else "sdxl" if self.family.startswith("sdxl") else "sd"

    @property
    def encoders(self) -> tuple[str, ...]:
        """Its text-encoder components, in context order ("text_encoder", "text_encoder_2")."""
        return _ENCODERS[self.pipeline_family]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None


def read_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """A single file -> (flat state dict, extras).

    `.safetensors` tensors are lazy (read when converted); extras hold the
    safetensors `__metadata__` as "metadata". `.ckpt`/`.pt`/`.pth` go through
    the restricted unpickler: a top-level `state_dict` is unwrapped and the other
    top-level entries (`global_step`, `epoch`, ...) are returned in extras.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        header, _ = read_safetensors_header(path)
        return read_safetensors(path), {"metadata": header.get("__metadata__") or {}}
    if path.suffix not in _SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown single-file type {path.suffix!r} (expected .safetensors or .ckpt)")

    obj = load_torch_file(path)
    extras: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        extras = {k: v for k, v in obj.items() if k != "state_dict" and not isinstance(v, np.ndarray)}
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    return state, extras


def _prediction_from_yaml(path: Path) -> str | None:
    # A1111 reads `<model>.yaml` next to the model; v-models say `parameterization: "v"`.
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    m = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", yaml.read_text(errors="replace"), re.M)
    if m is None:
        return "epsilon"  # the LDM default when the key is absent
    return {"v": "v_prediction", "eps": "epsilon", "x0": None}.get(m.group(1), None) or _bad_param(yaml, m.group(1))


def _bad_param(yaml: Path, value: str) -> str:
    raise ConfigError(f"{yaml}: parameterization {value!r} is not supported (expected \"eps\" or \"v\")")


def _normalize_prediction(value: str | None, source: str) -> str | None:
    if value is None:
        return None
    aliases = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
    if value not in aliases:
        raise ConfigError(f"{source}: prediction type {value!r} is not supported; use 'epsilon' or 'v_prediction'")
    return aliases[value]


def detect(state: dict[str, Any], extras: dict[str, Any], path: Path | None = None,
           prediction_type: str | None = None) -> tuple[str, str]:
    """(family, prediction_type) of a single-file state dict; see the module docstring for the rules."""
    if sgm.is_sdxl(state):
        info = sgm.detect_family(state)
        if info["in_channels"] not in (4, 9):
            raise CheckpointError(f"{path or 'checkpoint'}: SDXL UNet with {info['in_channels']} input channels "
                                  "is not a text-to-image or inpainting model")
        return info["family"], _prediction(extras, path, prediction_type, "sdxl")
    info = ldm.detect_family(state)
    sd2 = info["text_encoder"] == "openclip"
    if info["in_channels"] == 9:
        family = "sd2-inpainting" if sd2 else "sd1-inpainting"
    elif info["in_channels"] == 4:
        family = "sd2" if sd2 else "sd1"
    else:
        raise CheckpointError(f"{path or 'checkpoint'}: UNet with {info['in_channels']} input channels is not "
                              "a Stable Diffusion 1.x/2.x text-to-image or inpainting model")
    pred = _prediction(extras, path, prediction_type, family)
    if family == "sd2" and pred == "v_prediction":
        family = "sd2-v"
    return family, pred


def _prediction(extras: dict[str, Any], path: Path | None, prediction_type: str | None, family: str) -> str:
    pred = _normalize_prediction(prediction_type, "prediction_type argument")
    if pred is None and path is not None:
        pred = _prediction_from_yaml(path)
    if pred is None:
        meta = (extras.get("metadata") or {}).get("modelspec.prediction_type")
        pred = _normalize_prediction(meta, f"{path}: metadata modelspec.prediction_type")
    if pred is None and family == "sd2":
        pred = "epsilon" if extras.get("global_step") == 875000 else "v_prediction"
    return pred or "epsilon"


def template_configs(family: str, prediction_type: str, config_dir: str | os.PathLike | None = None
                     ) -> dict[str, dict[str, Any]]:
    """Diffusers config dicts for a family: "unet", "vae", "text_encoder" (SDXL: and "text_encoder_2";
    the refiner only that), "scheduler", "model_index".

    config_dir: a diffusers-layout folder; each of its `unet/config.json`,
    `vae/config.json`, `text_encoder[_2]/config.json`, `scheduler/scheduler_config.json`
    that exists replaces the template's.
    """
    if family not in _TEMPLATES:
        raise ConfigError(f"unknown checkpoint family {family!r}; known: {', '.join(FAMILIES)}")
    folder, overrides = _TEMPLATES[family]
    base = CONFIGS / folder
    files = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
             "text_encoder_2": "text_encoder_2/config.json",
             "scheduler": "scheduler/scheduler_config.json", "model_index": "model_index.json"}
    if not (base / files["text_encoder_2"]).is_file():
        del files["text_encoder_2"]
    if not (base / files["text_encoder"]).is_file():
        del files["text_encoder"]
    configs = {}
    for name, rel in files.items():
        given = Path(config_dir) / rel if config_dir is not None else None
        if given is not None and given.is_file():
            configs[name] = _read_json(given)
        else:
            configs[name] = {**_read_json(base / rel), **overrides.get(name, {})}
    configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction_type}
    return configs


def read_single_file(path: str | os.PathLike, *, prediction_type: str | None = None,
                     config_dir: str | os.PathLike | None = None, prefer_ema: bool = True) -> SingleFileCheckpoint:
    """Read a single-file SD1/SD2/SDXL checkpoint into diffusers-named components with their configs.

    Weights keep the file's dtype (fp16, bf16 or fp32) and torch layouts; safetensors
    tensors stay lazy until used. Raises CheckpointError for unknown or
    incomplete files, ConfigError for a bad prediction type.
    """
    path = Path(path).expanduser()
    state, extras = read_state(path)
    family, pred = detect(state, extras, path, prediction_type)
    configs = template_configs(family, pred, config_dir)
    xl = family in sgm.FAMILIES
    parts = sgm.split_components(state, prefer_ema=prefer_ema) if xl else \
        ldm.split_components(state, prefer_ema=prefer_ema)
    try:
        weights = {"unet": ldm.unet_to_diffusers(parts["unet"], configs["unet"]),
                   "vae": ldm.vae_to_diffusers(parts["vae"], configs["vae"])}
        if xl:
            weights["text_encoder_2"] = sgm.bigg_to_diffusers(parts["text_encoder_2"],
                                                              configs["text_encoder_2"]["num_hidden_layers"])
            if parts["text_encoder"] is not None:
                weights["text_encoder"] = ldm.clip_to_diffusers(parts["text_encoder"])
        elif parts["text_encoder_kind"] == "openclip":
            weights["text_encoder"] = ldm.openclip_to_diffusers(parts["text_encoder"],
                                                                configs["text_encoder"]["num_hidden_layers"])
        else:
            weights["text_encoder"] = ldm.clip_to_diffusers(parts["text_encoder"])
    except CheckpointError as e:
        where = f"the configs in {config_dir}" if config_dir is not None else \
            f"the standard {family} configs (pass config_dir=<a diffusers folder> for other sizes)"
        raise CheckpointError(f"{path}: the weights do not fit {where}: {e}") from None
    tok_dirs = [Path(config_dir) / name if config_dir is not None else None for name in ("tokenizer", "tokenizer_2")]
    tok_dir, tok_2_dir = (d if d is not None and (d / "vocab.json").is_file() else None for d in tok_dirs)
    return SingleFileCheckpoint(path, family, pred, weights, configs, tok_dir, parts["used_ema"], tok_2_dir)


def load_tokenizer(ckpt: SingleFileCheckpoint, name: str = "tokenizer"):
    """A CLIP tokenizer of a single-file checkpoint (`name`: "tokenizer", or SDXL's "tokenizer_2"):
    `config_dir/<name>` if given, else the shipped CLIP BPE files with the family's tokenizer JSON
    files (SD2 and SDXL's second tokenizer pad with `!`)."""
    import tempfile

    from transformers import CLIPTokenizer

    given = ckpt.tokenizer_2_dir if name == "tokenizer_2" else ckpt.tokenizer_dir
    if given is not None:
        return CLIPTokenizer.from_pretrained(str(given))
    # One folder for from_pretrained, which reads the files the same way in transformers v4 and v5.
    with tempfile.TemporaryDirectory() as tmp:
        _assemble_tokenizer(ckpt.family, Path(tmp), name)
        return CLIPTokenizer.from_pretrained(tmp)


def _assemble_tokenizer(family: str, dst: Path, name: str = "tokenizer") -> None:
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for f in (*(CONFIGS / "clip-tokenizer").iterdir(), *(CONFIGS / _TEMPLATES[family][0] / name).iterdir()):
        shutil.copyfile(f, dst / f.name)


def load_single_file_models(path: str | os.PathLike, *, dtype: Any = "float32",
                            sharding: Callable | None = None, prediction_type: str | None = None,
                            config_dir: str | os.PathLike | None = None, prefer_ema: bool = True
                            ) -> dict[str, Any]:
    """A single file -> {"text_encoder": (model, config), "unet": ..., "vae": ..., "tokenizer",
    "scheduler_config", "model_index", "family", "checkpoint": SingleFileCheckpoint (weights emptied)}.
    SDXL adds "text_encoder_2" and "tokenizer_2"; the refiner's "text_encoder" and "tokenizer" are
    None. "family" is the `Pipeline.family`: "sd", "sdxl" or "sdxl-refiner".

    Models are built with `nnx.eval_shape` and filled by `sdjax.weights.mapping.load_state`
    (parameters and compute in `dtype`; `sharding(path, abstract)` places each parameter).
    """
    import jax.numpy as jnp


    dtype = jnp.dtype(dtype)
    ckpt = read_single_file(path, prediction_type=prediction_type, config_dir=config_dir, prefer_ema=prefer_ema)
    out: dict[str, Any] = {"text_encoder": None, "tokenizer": None}
    for kind, cfg_cls, model_cls in (("text_encoder", CLIPTextConfig, CLIPTextModel),
                                     ("text_encoder_2", CLIPTextConfig, CLIPTextModelWithProjection),
                                     ("unet", UNetConfig, UNet2DConditionModel),
                                     ("vae", VAEConfig, AutoencoderKL)):
        if kind.startswith("text_encoder") and kind not in ckpt.encoders:
            continue
        try:
            config = cfg_cls.from_dict(ckpt.configs[kind])
        except ConfigError as e:
            raise ConfigError(f"{kind} config for {ckpt.path.name}: {e}") from None
        model = load_state(abstract_model(model_cls, config, dtype), ckpt.weights[kind], dtype=dtype,
                           ignore=names.is_ignored, source=f"{ckpt.path} ({kind})", sharding=sharding)
        ckpt.weights[kind] = {}  # drop references to file data as soon as each model holds its weights
        out[kind] = (model, config)
    for kind in ckpt.encoders:
        name = "tokenizer" + kind.removeprefix("text_encoder")
        out[name] = load_tokenizer(ckpt, name)
    out["family"] = ckpt.pipeline_family
    out["scheduler_config"] = ckpt.configs["scheduler"]
    out["model_index"] = ckpt.configs["model_index"]
    out["checkpoint"] = ckpt
    return out


# ---------------------------------------------------------------------------------------------
# Conversion both ways


def convert_single_file_to_diffusers(src: str | os.PathLike, dst: str | os.PathLike, *,
                                     prediction_type: str | None = None,
                                     config_dir: str | os.PathLike | None = None,
                                     prefer_ema: bool = True, dtype: str | None = None) -> Path:
    """Write a single-file checkpoint as a diffusers folder (safetensors); returns `dst`.

    Values are copied bit-exactly unless `dtype` ("float16", "bfloat16", "float32") is given.
    """

    ckpt = read_single_file(src, prediction_type=prediction_type, config_dir=config_dir, prefer_ema=prefer_ema)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for kind in ("unet", "vae", *ckpt.encoders):
        config = dict(ckpt.configs[kind])
        export.save_component(dst, kind, ckpt.weights[kind], config, dtype=dtype)
    export.save_scheduler(dst, ckpt.configs["scheduler"])
    tokenizers = ["tokenizer" + kind.removeprefix("text_encoder") for kind in ckpt.encoders]
    for name in tokenizers:
        given = ckpt.tokenizer_2_dir if name == "tokenizer_2" else ckpt.tokenizer_dir
        if given is not None:
            export.copy_tokenizer(given, dst, name)
        else:
            _assemble_tokenizer(ckpt.family, dst / name, name)
    scheduler_class = ckpt.configs["scheduler"].get("_class_name", "PNDMScheduler")
    if ckpt.pipeline_family == "sd":
        export.save_model_index(dst, ["unet", "text_encoder", "vae", "tokenizer", "scheduler"],
                                scheduler_class=scheduler_class)
    else:
        export.save_sdxl_model_index(dst, refiner=ckpt.family == "sdxl-refiner",
                                     inpainting=ckpt.family == "sdxl-inpainting",
                                     scheduler_class=scheduler_class, template=ckpt.configs["model_index"])
    return dst


def convert_diffusers_to_single_file(src: str | os.PathLike, dst: str | os.PathLike, *,
                                     dtype: str | None = None, text_encoder_format: str = "auto") -> Path:
    """Write a diffusers SD1/SD2/SDXL folder as one LDM-layout `.safetensors` file; returns `dst`.

    text_encoder_format (SD1/SD2): "clip" (SD1 layout), "openclip" (SD2 layout) or "auto"
    (OpenCLIP when the text encoder uses `gelu`, as SD2's does; SD1's CLIP uses
    `quick_gelu`). An SDXL folder (text_encoder_2 in model_index.json) is written in the SGM layout
    (`sdjax.weights.sgm`), base or refiner as the folder is. The scheduler's prediction type is stored in the safetensors
    metadata (`modelspec.prediction_type`), which `read_single_file` reads back.
    Values are copied bit-exactly unless `dtype` is given.
    """
    from safetensors.numpy import save_file


    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: sdjax writes single files as .safetensors only")
    family = model_family(read_model_index(src))
    kinds = ("unet", "vae", *_ENCODERS[family])
    configs = {k: _read_json(src / k / "config.json") for k in kinds}
    weights = {}
    for kind in kinds:
        rename = {"unet": names.unet, "vae": names.vae}.get(kind, names.clip_text)
        flat, _ = read_component_weights(src / kind)
        weights[kind] = {k: v for k, v in rename(flat).items() if not names.is_ignored(k)}
    if family != "sd":
        state = sgm.to_single_file(weights["unet"], weights["vae"], weights.get("text_encoder"),
                                   weights["text_encoder_2"], unet_config=configs["unet"], vae_config=configs["vae"])
    else:
        if text_encoder_format == "auto":
            text_encoder_format = "openclip" if configs["text_encoder"].get("hidden_act") == "gelu" else "clip"
        if text_encoder_format not in ("clip", "openclip"):
            raise ConfigError(f"text_encoder_format={text_encoder_format!r}; expected 'auto', 'clip' or 'openclip'")
        state = ldm.to_single_file(weights["unet"], weights["vae"], weights["text_encoder"],
                                   unet_config=configs["unet"], vae_config=configs["vae"],
                                   openclip=text_encoder_format == "openclip")
    tensors = {}
    for k, v in state.items():
        v = np.ascontiguousarray(np.asarray(v))
        if dtype is not None and (v.dtype.kind == "f" or v.dtype == ml_dtypes.bfloat16):
            v = v.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
        tensors[k] = v
    metadata = {"format": "pt"}
    sched = src / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        pred = _read_json(sched).get("prediction_type", "epsilon")
        metadata["modelspec.prediction_type"] = {"v_prediction": "v"}.get(pred, pred)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def is_single_file(path: str | os.PathLike) -> bool:
    """True for an existing file with a single-file checkpoint suffix (.safetensors, .ckpt, ...)."""
    p = Path(path)
    return p.is_file() and p.suffix in _SINGLE_FILE_SUFFIXES


__all__ = ["SingleFileCheckpoint", "read_state", "detect", "template_configs", "read_single_file",
           "load_tokenizer", "load_single_file_models", "convert_single_file_to_diffusers",
           "convert_diffusers_to_single_file", "is_single_file", "FAMILIES", "CONFIGS"]
