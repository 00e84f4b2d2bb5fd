"""TAESD / TAESDXL decoder weights -> `sdjax.models.taesd.TAESDDecoder`.

Two published layouts are read:

- diffusers `AutoencoderTiny` (`madebyollin/taesd`, `madebyollin/taesdxl` on the Hub): a folder
  with `config.json` and `diffusion_pytorch_model.safetensors`, keys `decoder.layers.N...`
  (the `encoder.*` tensors are ignored); the file alone is read with the default config;
- madebyollin's original `taesd_decoder.safetensors` / `taesdxl_decoder.safetensors`
  (github.com/madebyollin/taesd): one `nn.Sequential` whose entry 0 is a parameter-free
  Clamp, so its keys are `N...` with N = diffusers' index + 1 (`1.weight` is the first conv,
  `3.conv.0.weight` the first block). Its latent channel count is read from `1.weight`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from sdjax.errors import CheckpointError
from sdjax.models.taesd import TAESDConfig, TAESDDecoder
from sdjax.weights.diffusers import abstract_model, read_json
from sdjax.weights.files import read_weight_file
from sdjax.weights.mapping import load_state

_ORIGINAL = re.compile(r"^(\d+)\.(.+)$")
_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "taesd_decoder.safetensors", "taesdxl_decoder.safetensors")


def from_diffusers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderTiny names -> TAESDDecoder names: `decoder.layers.*` kept without `decoder.`."""
    return {k[len("decoder."):]: v for k, v in flat.items() if k.startswith("decoder.")}


def from_original(flat: Mapping[str, Any]) -> dict[str, Any]:
    """madebyollin's `N.rest` (N >= 1; 0 is the Clamp) -> `layers.{N-1}.rest`."""
    out = {}
    for k, v in flat.items():
        m = _ORIGINAL.match(k)
        if m is None or int(m.group(1)) < 1:
            raise CheckpointError(f"TAESD decoder file: unexpected tensor {k!r} (expected '1.weight', '3.conv.0.weight', ...)")
        out[f"layers.{int(m.group(1)) - 1}.{m.group(2)}"] = v
    return out


def to_original(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `from_original` (TAESDDecoder names -> madebyollin's)."""
    return {f"{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}": v for k, v in flat.items()}


def load_taesd(path: str | os.PathLike, dtype: Any = jnp.float32) -> TAESDDecoder:
    """A TAESD decoder from a diffusers AutoencoderTiny folder or file, or an original
    `taesd*_decoder.safetensors` (module doc). CheckpointError names what does not fit."""
    path = Path(path)
    config: dict = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            config = read_json(path / "config.json")
        files = [path / n for n in _FILE_NAMES if (path / n).is_file()]
        if not files:
            raise CheckpointError(f"{path}: no TAESD weights (expected one of {', '.join(_FILE_NAMES)})")
        path = files[0]
    elif not path.is_file():
        raise CheckpointError(f"TAESD weights {os.fspath(path)!r} do not exist (pass --taesd with the "
                              "taesd / taesdxl folder or its .safetensors file)")
    flat = read_weight_file(path)
    if any(k.startswith("decoder.") for k in flat):
        named = from_diffusers(flat)
    elif any(k.startswith("encoder.") for k in flat):
        raise CheckpointError(f"{path}: holds only a TAESD encoder; previews need the decoder")
    else:
        named = from_original(flat)
        if "layers.0.weight" in named and not config:
            config = {"latent_channels": int(np.shape(named["layers.0.weight"])[1])}
    cfg = TAESDConfig.from_dict(config)
    return load_state(abstract_model(TAESDDecoder, cfg, dtype), named, source=os.fspath(path))


__all__ = ["from_diffusers", "from_original", "load_taesd", "to_original"]
