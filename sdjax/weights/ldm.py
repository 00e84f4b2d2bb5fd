"""Original LDM ("CompVis", A1111, ComfyUI) single-file names <-> diffusers names.

A single-file Stable Diffusion 1.x/2.x checkpoint holds the three models under
fixed prefixes:

    model.diffusion_model.*       UNet    (input_blocks / middle_block / output_blocks)
    first_stage_model.*           VAE     (encoder.down.i.block.j / decoder.up.i ...)
    cond_stage_model.transformer.*  SD1 text encoder (transformers CLIPTextModel, v4 names)
    cond_stage_model.model.*        SD2 text encoder (OpenCLIP: resblocks, fused in_proj)

Everything here is a pure function over flat dicts (name -> array). The UNet and
VAE mappings are tables of module prefixes built from the diffusers config
(`unet_table`, `vae_table`); a name is renamed by its longest matching prefix
plus a small per-module-kind table for the names inside the module. The same
tables serve both directions. Facts from diffusers' own converter
(`diffusers/loaders/single_file_utils.py` and
`scripts/convert_diffusers_to_original_stable_diffusion.py`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sdjax.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."        # SD1: transformers CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."          # SD2: OpenCLIP text tower
EMA_PREFIX = "model_ema."
SDXL_MARKER = "conditioner.embedders."

# Names inside one module, diffusers -> LDM. Absent entries are the same on both sides.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_SAME: dict[str, str] = {}

# One table row: (diffusers module prefix, LDM module prefix, inner-name table).
Table = list[tuple[str, str, dict[str, str]]]


def _per_block(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_table(config: Mapping[str, Any]) -> Table:
    """Module prefixes of a diffusers UNet2DConditionModel (config dict) and their LDM names.

    LDM numbers `input_blocks` consecutively over the levels (each level's resnets,
    then its downsampler), `output_blocks` likewise with one more resnet per level,
    and puts an up level's upsampler after its attention when it has one.
    """
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    n = len(down)
    lpb = _per_block(config.get("layers_per_block", 2), n)
    rows: Table = [
        ("conv_in", "input_blocks.0.0", _SAME),
        ("time_embedding.linear_1", "time_embed.0", _SAME),
        ("time_embedding.linear_2", "time_embed.2", _SAME),
        ("conv_norm_out", "out.0", _SAME),
        ("conv_out", "out.2", _SAME),
        ("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        ("mid_block.attentions.0", "middle_block.1", _SAME),
        ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
    ]
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + time ids (SGM `label_emb`)
        rows += [("add_embedding.linear_1", "label_emb.0.0", _SAME), ("add_embedding.linear_2", "label_emb.0.2", _SAME)]
    k = 1
    for i, kind in enumerate(down):
        for j in range(lpb[i]):
            rows.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", _UNET_RESNET))
            if kind.startswith("CrossAttn"):
                rows.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", _SAME))
            k += 1
        if i < n - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op", _SAME))
            k += 1
    k = 0
    up_lpb = lpb[::-1]
    for i, kind in enumerate(up):
        attn = kind.startswith("CrossAttn")
        for j in range(up_lpb[i] + 1):
            rows.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", _UNET_RESNET))
            if attn:
                rows.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", _SAME))
            if j == up_lpb[i] and i < n - 1:
                rows.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{2 if attn else 1}.conv",
                             _SAME))
            k += 1
    return rows


def vae_table(config: Mapping[str, Any]) -> Table:
    """Module prefixes of a diffusers AutoencoderKL (config dict) and their LDM names.

    The LDM decoder numbers its levels from the bottom (`up.0` is the last
    diffusers up block), the encoder from the top.
    """
    n = len(config.get("block_out_channels", [64]))
    lpb = int(config.get("layers_per_block", 1))
    rows: Table = []
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in", f"{part}.conv_in", _SAME),
                 (f"{part}.conv_out", f"{part}.conv_out", _SAME),
                 (f"{part}.conv_norm_out", f"{part}.norm_out", _SAME),
                 (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
                 (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
                 (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN)]
    rows += [("quant_conv", "quant_conv", _SAME), ("post_quant_conv", "post_quant_conv", _SAME)]
    for i in range(n):
        for j in range(lpb):
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        if i < n - 1:
            rows.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv",
                         _SAME))
        level = n - 1 - i
        for j in range(lpb + 1):
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET))
        if i < n - 1:
            rows.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", _SAME))
    return rows


def _rename(flat: Mapping[str, Any], table: Table, to_ldm: bool, what: str) -> dict[str, Any]:
    """Rename every name of `flat` by the longest table prefix; unknown names raise CheckpointError."""
    if to_ldm:
        prefixes = {d: (l, inner) for d, l, inner in table}
    else:
        prefixes = {l: (d, {v: k for k, v in inner.items()}) for d, l, inner in table}
    out, unknown = {}, []
    for name, arr in flat.items():
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            hit = prefixes.get(".".join(parts[:cut]))
            if hit is not None:
                new_prefix, inner = hit
                module, leaf = ".".join(parts[cut:-1]), parts[-1]
                module = inner.get(module, module)
                out[".".join(p for p in (new_prefix, module, leaf) if p)] = arr
                break
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{what}: {len(unknown)} tensors have no "
                              f"{'LDM' if to_ldm else 'diffusers'} name: {', '.join(sorted(unknown)[:10])}")
    return out


def unet_to_diffusers(ldm: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """LDM UNet names (without `model.diffusion_model.`) -> diffusers UNet2DConditionModel names."""
    return _rename(ldm, unet_table(config), False, "UNet")


def unet_to_ldm(flat: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers UNet2DConditionModel names -> LDM names (without `model.diffusion_model.`)."""
    return _rename(flat, unet_table(config), True, "UNet")


def vae_to_diffusers(ldm: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """LDM VAE names (without `first_stage_model.`) -> diffusers AutoencoderKL names.

    The LDM mid-block attention projections are 1x1 convs (C, C, 1, 1); diffusers'
    are linear (C, C).
    """
    out = _rename(ldm, vae_table(config), False, "VAE")
    for name, arr in out.items():
        if ".attentions." in name and name.endswith(".weight") and getattr(arr, "ndim", 0) == 4 \
                and any(f".{p}." in name for p in ("to_q", "to_k", "to_v", "to_out")):
            out[name] = np.asarray(arr)[:, :, 0, 0]
    return out


def vae_to_ldm(flat: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers AutoencoderKL names -> LDM names; attention projections become (C, C, 1, 1) convs."""
    out = _rename(flat, vae_table(config), True, "VAE")
    for name, arr in out.items():
        if ".mid.attn_1." in name and name.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") \
                and name.endswith(".weight") and getattr(arr, "ndim", 0) == 2:
            out[name] = np.asarray(arr)[:, :, None, None]
    return out


# ---------------------------------------------------------------------------------------------
# Text encoders. sdjax CLIP names are transformers v5 names (no `text_model.` prefix).


def clip_to_diffusers(ldm: Mapping[str, Any]) -> dict[str, Any]:
    """SD1 `cond_stage_model.transformer.*` (prefix removed) -> sdjax CLIP names.

    Files hold transformers v4 names (`text_model.encoder...`); very old ones lack
    `text_model.`. The `position_ids` buffer is dropped.
    """
    out = {}
    for name, arr in ldm.items():
        name = name[len("text_model."):] if name.startswith("text_model.") else name
        if not name.endswith("position_ids"):
            out[name] = arr
    return out


def clip_to_ldm(flat: Mapping[str, Any]) -> dict[str, Any]:
    """sdjax CLIP names -> SD1 single-file names (v4, `text_model.`), prefix not included."""
    return {(n if n.startswith("text_model.") else "text_model." + n): a for n, a in flat.items()}


# OpenCLIP residual-block module names -> transformers CLIP encoder-layer names.
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                   "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
_OPENCLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
# Parts of the OpenCLIP text tower that SD2's CLIPTextModel does not use.
_OPENCLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")


def openclip_to_diffusers(ldm: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """SD2 `cond_stage_model.model.*` (prefix removed) -> sdjax CLIP names.

    SD2 conditions on the penultimate layer of OpenCLIP ViT-H (24 layers), so, as
    diffusers does, the CLIPTextModel has `num_layers` (23) layers and any layer at
    or past `num_layers` is dropped; so are `text_projection` and `logit_scale`.
    The fused `attn.in_proj_weight` (3D, D) / `in_proj_bias` (3D,) split into
    q, k, v in that order.
    """
    out, unknown = {}, []
    for name, arr in ldm.items():
        if name in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[name]] = arr
            continue
        if name in _OPENCLIP_UNUSED:
            continue
        parts = name.split(".")
        if len(parts) < 4 or parts[:2] != ["transformer", "resblocks"] or not parts[2].isdigit():
            unknown.append(name)
            continue
        i = int(parts[2])
        if i >= num_layers:
            continue
        module, leaf = ".".join(parts[3:-1]), parts[-1]
        prefix = f"encoder.layers.{i}"
        if leaf in ("in_proj_weight", "in_proj_bias") and module == "attn":
            q, k, v = np.split(np.asarray(arr), 3, axis=0)
            kind = leaf.split("_")[-1]
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{prefix}.self_attn.{proj}.{kind}"] = part
        elif module in _OPENCLIP_LAYER:
            out[f"{prefix}.{_OPENCLIP_LAYER[module]}.{leaf}"] = arr
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"OpenCLIP text encoder: unknown tensors {', '.join(sorted(unknown)[:10])}")
    return out


def openclip_to_ldm(flat: Mapping[str, Any]) -> dict[str, Any]:
    """sdjax CLIP names -> SD2 OpenCLIP names (prefix not included); q/k/v fuse into in_proj.

    Like diffusers' `convert_diffusers_to_original_stable_diffusion.py`, only the
    layers the CLIPTextModel has are written (no 24th layer, no text_projection):
    A1111 and ComfyUI load such files, and SD2 never reads what is missing.
    """
    top = {v: k for k, v in _OPENCLIP_TOP.items()}
    layer = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out, qkv = {}, {}
    for name, arr in flat.items():
        name = name[len("text_model."):] if name.startswith("text_model.") else name
        if name in top:
            out[top[name]] = arr
            continue
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["encoder", "layers"]:
            raise CheckpointError(f"text encoder tensor {name!r} has no OpenCLIP name")
        i, module, leaf = parts[2], ".".join(parts[3:-1]), parts[-1]
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((i, leaf), {})[module[-6]] = arr
        elif module in layer:
            out[f"transformer.resblocks.{i}.{layer[module]}.{leaf}"] = arr
        else:
            raise CheckpointError(f"text encoder tensor {name!r} has no OpenCLIP name")
    for (i, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"text encoder layer {i}: q/k/v {leaf} incomplete ({sorted(parts)})")
        fused = np.concatenate([np.asarray(parts[c]) for c in "qkv"], axis=0)
        out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = fused
    return out


# ---------------------------------------------------------------------------------------------
# Whole files


def split_components(state: Mapping[str, Any], *, prefer_ema: bool = True) -> dict[str, dict[str, Any]]:
    """A single-file state dict -> {"unet", "vae", "text_encoder"}: LDM names without prefixes.

    `"used_ema"` says whether it did. `"text_encoder_kind"` says which text encoder the file has: "clip" (SD1) or "openclip" (SD2).
    With `prefer_ema`, UNet weights come from `model_ema.*` when the file has an EMA
    copy of every UNet tensor (LitEma stores `model.diffusion_model.a.b` as
    `model_ema.diffusion_modelab`), as A1111's option and diffusers' `extract_ema` do.
    Raises CheckpointError for SDXL files (`sdjax.weights.sgm` reads those) or files without the three models.
    """
    if any(k.startswith(SDXL_MARKER) for k in state):
        raise CheckpointError("this is an SDXL checkpoint (it has conditioner.embedders.*): "
                              "read it with sdjax.weights.sgm.split_components")
    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    vae = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    clip = {k[len(CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
    openclip = {k[len(OPENCLIP_PREFIX):]: v for k, v in state.items() if k.startswith(OPENCLIP_PREFIX)}
    missing = [what for what, d in (("UNet (model.diffusion_model.*)", unet), ("VAE (first_stage_model.*)", vae),
                                    ("text encoder (cond_stage_model.*)", clip or openclip)) if not d]
    if missing:
        sample = ", ".join(sorted(state)[:5])
        raise CheckpointError(f"not a Stable Diffusion 1.x/2.x single-file checkpoint: no {' and no '.join(missing)}"
                              f" (first names in the file: {sample})")
    if clip and openclip:
        raise CheckpointError("the file holds both a CLIP (cond_stage_model.transformer.*) and an OpenCLIP "
                              "(cond_stage_model.model.*) text encoder")
    used_ema = False
    if prefer_ema:
        ema = {k: state.get(EMA_PREFIX + ("diffusion_model." + k).replace(".", "")) for k in unet}
        if all(v is not None for v in ema.values()):
            unet, used_ema = ema, True
    return {"unet": unet, "vae": vae, "text_encoder": clip or openclip,
            "text_encoder_kind": "clip" if clip else "openclip", "used_ema": used_ema}


def to_single_file(unet: Mapping[str, Any], vae: Mapping[str, Any], text_encoder: Mapping[str, Any], *,
                   unet_config: Mapping[str, Any], vae_config: Mapping[str, Any], openclip: bool) -> dict[str, Any]:
    """Diffusers-named components (sdjax CLIP names for the text encoder) -> one LDM state dict."""
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet, unet_config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae, vae_config).items()})
    if openclip:
        out.update({OPENCLIP_PREFIX + k: v for k, v in openclip_to_ldm(text_encoder).items()})
    else:
        out.update({CLIP_PREFIX + k: v for k, v in clip_to_ldm(text_encoder).items()})
    return out


def detect_family(state: Mapping[str, Any]) -> dict[str, Any]:
    """What a single-file checkpoint is, from its tensor names and shapes.

    Returns {"text_encoder": "clip" | "openclip", "in_channels": int, "inpainting": bool,
    "context_dim": int}. SD2 is the OpenCLIP text encoder (context 1024); 9 UNet input
    channels (latents + mask + masked-image latents) is an inpainting model.
    Raises CheckpointError for SDXL (`sdjax.weights.sgm.detect_family`) and for files that are not SD1/SD2.
    """
    if any(k.startswith(SDXL_MARKER) for k in state):
        raise CheckpointError("this is an SDXL checkpoint (it has conditioner.embedders.*): "
                              "use sdjax.weights.sgm.detect_family")
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError("not a Stable Diffusion 1.x/2.x single-file checkpoint: no "
                              "model.diffusion_model.input_blocks.0.0.weight")
    openclip = any(k.startswith(OPENCLIP_PREFIX) for k in state)
    clip = any(k.startswith(CLIP_PREFIX) for k in state)
    if not (openclip or clip):
        raise CheckpointError("no text encoder in the file (neither cond_stage_model.transformer.* (SD1) "
                              "nor cond_stage_model.model.* (SD2))")
    context = [v.shape[-1] for k, v in state.items()
               if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    in_channels = int(conv_in.shape[1])
    return {"text_encoder": "openclip" if openclip else "clip", "in_channels": in_channels,
            "inpainting": in_channels == 9, "context_dim": int(context[0]) if context else None}
