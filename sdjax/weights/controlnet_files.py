"""ControlNet weight files -> `sdjax.models.controlnet.ControlNetModel` with its weights.

Two layouts:
  diffusers folder   config.json + diffusion_pytorch_model[.fp16].safetensors | .bin | shards
                     (`ControlNetModel.save_pretrained`); names are the module paths.
  original file      lllyasviel's `control_sd15_*.pth`, `control_v11*_sd15_*.pth/.safetensors`,
                     thibaud's SD2.1 files: the cldm `ControlNet` under `control_model.` (or with
                     no prefix), LDM UNet-encoder names (`time_embed`, `input_blocks`,
                     `middle_block`) plus `input_hint_block`, `zero_convs`, `middle_block_out`.
                     Files that also hold a whole SD model keep only `control_model.*`.

The original -> diffusers mapping is one table of module prefixes (`controlnet_table`): the
UNet encoder's rows come from `sdjax.weights.ldm.unet_table`, the ControlNet rows are below
(facts from diffusers' `convert_controlnet_checkpoint` in `loaders/single_file_utils.py`); the
same table renames both ways. An original file has no config: `infer_config` reads it from
the tensor shapes, except the head count, which follows SD's rule (see there); pass `config=`
to override.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import CheckpointError, ConfigError
from sdjax.models.controlnet import ControlNetConfig, ControlNetModel
from sdjax.weights import ldm
from sdjax.weights.diffusers import abstract_model, read_json
from sdjax.weights.files import read_component_weights, read_weight_file
from sdjax.weights.mapping import load_state
from sdjax.weights.names import is_ignored

CONTROL_PREFIX = "control_model."
_SAME: dict[str, str] = {}
# diffusers' SD 1.x default, used when a file's head count cannot be read from its shapes.
SD1_HEADS = 8
SD2_HEAD_DIM = 64


def _per_block(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def controlnet_table(config: Mapping[str, Any]) -> ldm.Table:
    """Module prefixes of a diffusers ControlNetModel (config dict) and their original names.

    `input_hint_block` is an nn.Sequential with a SiLU after every conv: conv_in is index 0,
    diffusers' `blocks[k]` index 2k + 2, conv_out the index after the last block. The zero
    convs are `zero_convs[i]` (a Sequential of one conv) and `middle_block_out[0]`.
    """
    # The UNet's encoder half: everything but up_blocks, conv_norm_out and conv_out.
    rows = [row for row in ldm.unet_table(config)
            if row[0] == "conv_in" or row[0].startswith(("time_embedding.", "down_blocks.", "mid_block."))]
    n_levels = len(config.get("block_out_channels", (320, 640, 1280, 1280)))
    lpb = _per_block(config.get("layers_per_block", 2), n_levels)[0]
    n_embed = len(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
    n_blocks = 2 * (n_embed - 1)
    rows += [("controlnet_cond_embedding.conv_in", "input_hint_block.0", _SAME),
             ("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * n_blocks + 2}", _SAME)]
    rows += [(f"controlnet_cond_embedding.blocks.{k}", f"input_hint_block.{2 * k + 2}", _SAME)
             for k in range(n_blocks)]
    n_zero = 1 + n_levels * lpb + (n_levels - 1)
    rows += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0", _SAME) for i in range(n_zero)]
    rows.append(("controlnet_mid_block", "middle_block_out.0", _SAME))
    return rows


def controlnet_to_diffusers(original: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Original cldm names (without `control_model.`) -> diffusers ControlNetModel names."""
    return ldm._rename(original, controlnet_table(config), False, "ControlNet")


def controlnet_to_original(flat: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ControlNetModel names -> original cldm names (without `control_model.`)."""
    return ldm._rename(flat, controlnet_table(config), True, "ControlNet")


def _shape(flat: Mapping[str, Any], name: str) -> tuple[int, ...]:
    if name not in flat:
        raise CheckpointError(f"not an original-format ControlNet: tensor {name!r} is missing")
    return tuple(flat[name].shape)


def infer_config(original: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ControlNetModel config dict read from original-format tensor shapes.

    Read from shapes: in/conditioning channels, block_out_channels, layers_per_block, block
    types, transformer depth, cross_attention_dim, linear vs conv projection, the hint
    block's channels. Not in the weights: the attention head count. As in the cldm yaml
    files, conv projections (SD 1.x) mean 8 heads and linear projections (SD 2.x) mean
    64-wide heads; a ControlNet made otherwise needs an explicit config. Also not in the
    weights: `global_pool_conditions` (True only for the "shuffle" ControlNet), left False.
    """
    in_channels = _shape(original, "input_blocks.0.0.weight")[1]
    blocks = sorted({int(m.group(1)) for m in map(re.compile(r"^input_blocks\.(\d+)\.").match, original) if m})
    levels: list[list[int]] = [[]]
    for k in blocks[1:]:
        if f"input_blocks.{k}.0.op.weight" in original:
            levels.append([])
        else:
            levels[-1].append(k)
    lpb = {len(ks) for ks in levels}
    if len(lpb) != 1 or 0 in lpb:
        raise CheckpointError(f"original ControlNet: levels have {sorted(len(ks) for ks in levels)} resnets; "
                              "expected the same number per level")
    chans, types, depth = [], [], []
    cross_dim, linear = None, None
    for ks in levels:
        chans.append(_shape(original, f"input_blocks.{ks[0]}.0.out_layers.3.weight")[0])
        attn = f"input_blocks.{ks[0]}.1."
        if any(name.startswith(attn) for name in original):
            types.append("CrossAttnDownBlock2D")
            depth.append(len({name[len(attn):].split(".")[1] for name in original
                              if name.startswith(attn + "transformer_blocks.")}))
            cross_dim = _shape(original, attn + "transformer_blocks.0.attn2.to_k.weight")[1]
            linear = len(_shape(original, attn + "proj_in.weight")) == 2
        else:
            types.append("DownBlock2D")
            depth.append(1)
    if cross_dim is None:
        raise CheckpointError("original ControlNet has no cross-attention block; sdjax supports SD 1.x / 2.x "
                              "ControlNets")
    heads: Any = [c // SD2_HEAD_DIM for c in chans] if linear else SD1_HEADS
    hint = sorted({int(m.group(1)) for m in map(re.compile(r"^input_hint_block\.(\d+)\.weight$").match, original)
                   if m})
    if not hint or hint[0] != 0 or hint != list(range(0, 2 * len(hint), 2)) or len(hint) < 4 or len(hint) % 2:
        raise CheckpointError(f"original ControlNet: input_hint_block convs at indices {hint}; expected "
                              "0, 2, 4, ... (conv_in, pairs of convs, conv_out)")
    embed = [_shape(original, "input_hint_block.0.weight")[0]]
    embed += [_shape(original, f"input_hint_block.{k}.weight")[0] for k in hint[2:-1:2]]
    return {
        "in_channels": in_channels,
        "conditioning_channels": _shape(original, "input_hint_block.0.weight")[1],
        "conditioning_embedding_out_channels": embed,
        "block_out_channels": chans,
        "layers_per_block": lpb.pop(),
        "down_block_types": types,
        "transformer_layers_per_block": depth if len(set(depth)) > 1 else depth[0],
        "cross_attention_dim": cross_dim,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "global_pool_conditions": False,
        "controlnet_conditioning_channel_order": "rgb",
    }


def split_original(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ControlNet part of an original-format state dict (prefix removed), or None if not one.

    `control_model.*` when present (whole-model files also hold `model.diffusion_model.*`
    etc.); else the file itself when it has the bare names (`time_embed.0.weight`).
    """
    if any(name.startswith(CONTROL_PREFIX) for name in state):
        return {name[len(CONTROL_PREFIX):]: arr for name, arr in state.items() if name.startswith(CONTROL_PREFIX)}
    if "time_embed.0.weight" in state and "input_hint_block.0.weight" in state:
        return dict(state)
    return None


def _read_config_arg(config: Any) -> dict[str, Any] | None:
    """`config=`: None, a dict, a config.json path or a folder holding one -> dict."""
    if config is None or isinstance(config, Mapping):
        return None if config is None else dict(config)
    path = Path(config)
    return read_json(path / "config.json" if path.is_dir() else path)


def _parse(raw: dict[str, Any], where: str):
    try:
        return ControlNetConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_controlnet(path: str | os.PathLike, *, config: Any = None, variant: str | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(flat diffusers-named arrays, config dict, source file) of a ControlNet folder or file.

    path: a diffusers folder (config.json + weights; or a pipeline folder with controlnet/) or
    one original-format file
    (`.safetensors`, `.pth`, `.ckpt`, `.bin`; read without running code from it).
    config: a config dict, a config.json path or a folder holding one. For a single file it
    replaces `infer_config` (default); for a folder it replaces the folder's config.json. A
    single file with diffusers names (`controlnet_cond_embedding.*`) takes `config`, else a
    config.json beside it.
    """
    path = Path(path).expanduser()
    given = _read_config_arg(config)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "controlnet" / "config.json").is_file():
        path = path / "controlnet"  # a diffusers ControlNet *pipeline* folder
    if path.is_dir():
        raw = given if given is not None else read_json(path / "config.json")
        flat, source = read_component_weights(path, variant)
        return dict(flat), raw, source
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; expected a diffusers ControlNet folder (config.json + "
                              "diffusion_pytorch_model.safetensors) or an original ControlNet file")
    state = read_weight_file(path)
    original = split_original(state)
    if original is not None:
        raw = given if given is not None else infer_config(original)
        return controlnet_to_diffusers(original, raw), raw, path
    if "controlnet_cond_embedding.conv_in.weight" in state:
        if given is None:
            sidecar = path.parent / "config.json"
            if not sidecar.is_file():
                raise CheckpointError(f"{path} holds diffusers ControlNet names but has no config; pass "
                                      "config= (a config.json or its folder)")
            given = read_json(sidecar)
        return dict(state), given, path
    some = ", ".join(sorted(state)[:5])
    raise CheckpointError(f"{path} is not a ControlNet: no `control_model.*`, `input_hint_block.*` or "
                          f"`controlnet_cond_embedding.*` tensors (found {some} ...)")


def load_controlnet_model(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    config: Any = None,
    variant: str | None = None,
    sharding: Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None = None,
):
    """A ControlNet folder or original-format file -> (ControlNetModel with weights, ControlNetConfig).

    dtype: parameter and compute dtype (file values are cast once while loading).
    config / variant: see `read_controlnet`. sharding: optional `(state path, abstract leaf)
    -> Sharding` per parameter. The model is built with `nnx.eval_shape` (no random init);
    missing, unexpected or mis-shaped tensors raise `CheckpointError` naming them.
    """

    flat, raw, source = read_controlnet(path, config=config, variant=variant)
    cfg = _parse(raw, str(source) if config is None else "the config= given")
    abstract = abstract_model(ControlNetModel, cfg, dtype)
    model = load_state(abstract, flat, dtype=jnp.dtype(dtype), ignore=is_ignored, source=str(source),
                       sharding=sharding)
    return model, cfg


def save_original(flat: Mapping[str, Any], config: Mapping[str, Any], path: str | os.PathLike,
                  *, prefix: str = CONTROL_PREFIX) -> Path:
    """Write diffusers-named ControlNet weights as an original-format `.safetensors` file."""
    from safetensors.numpy import save_file

    out = {prefix + name: np.ascontiguousarray(np.asarray(arr))
           for name, arr in controlnet_to_original(flat, config).items()}
    path = Path(path)
    save_file(out, str(path), metadata={"format": "pt"})
    return path

