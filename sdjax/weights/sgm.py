"""SDXL single-file names (Stability's "generative-models" (SGM) layout, as A1111 and ComfyUI
save them) <-> diffusers names.

    model.diffusion_model.*                    UNet, LDM numbering (`sdjax.weights.ldm.unet_table`),
                                               plus `label_emb.0.0` / `label_emb.0.2` (= add_embedding)
    first_stage_model.*                        VAE (as SD 1.x)
  base:
    conditioner.embedders.0.transformer.*      CLIP ViT-L (transformers v4 names: text_model....)
    conditioner.embedders.1.model.*            OpenCLIP ViT-bigG (resblocks, fused in_proj, text_projection)
  refiner:
    conditioner.embedders.0.model.*            OpenCLIP ViT-bigG only

OpenCLIP's `text_projection` is a (width, projection) matrix used as `pooled @ text_projection`;
transformers' `text_projection.weight` is the (projection, width) weight of a Linear: its
transpose. SDXL keeps all 32 bigG layers (it reads the penultimate hidden states, and the pooled
output needs the last layer), so no layer is dropped as for SD2.

Pure functions over flat dicts (name -> array); facts from diffusers'
`loaders/single_file_utils.py` and `scripts/convert_diffusers_to_original_sdxl.py`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sdjax.errors import CheckpointError
from sdjax.weights import ldm

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."   # base: CLIP ViT-L
BIGG_PREFIX = "conditioner.embedders.1.model."           # base: OpenCLIP ViT-bigG
REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."   # refiner: OpenCLIP ViT-bigG, its only encoder
FAMILIES = ("sdxl", "sdxl-inpainting", "sdxl-refiner")
_PROJECTION = "text_projection"


def is_sdxl(state: Mapping[str, Any]) -> bool:
    """True for a file with SGM conditioner embedders (SDXL base, inpainting or refiner)."""
    return any(k.startswith(ldm.SDXL_MARKER) for k in state)


def detect_family(state: Mapping[str, Any]) -> dict[str, Any]:
    """What an SDXL single file is, from its tensors.

    Returns {"family": "sdxl" | "sdxl-inpainting" | "sdxl-refiner", "in_channels": int,
    "context_dim": int | None, "add_embedding_in": int | None}. The encoders say base (CLIP-L in
    slot 0 and bigG in slot 1) or refiner (bigG alone in slot 0); the UNet's cross-attention width
    (base 2048 = 768 + 1280, refiner 1280) must be the sum of the encoders' widths, and 9 input
    channels (latents, mask, masked-image latents) is the SDXL inpainting UNet.
    """
    clip_l = any(k.startswith(CLIP_L_PREFIX) for k in state)
    bigg = any(k.startswith(BIGG_PREFIX) for k in state)
    refiner_bigg = any(k.startswith(REFINER_BIGG_PREFIX) for k in state)
    if clip_l and bigg and not refiner_bigg:
        refiner = False
    elif refiner_bigg and not (clip_l or bigg):
        refiner = True
    else:
        found = sorted({".".join(k.split(".")[:4]) for k in state if k.startswith(ldm.SDXL_MARKER)})
        raise CheckpointError("SDXL checkpoint with an unknown set of text encoders: expected "
                              f"{CLIP_L_PREFIX}* and {BIGG_PREFIX}* (base) or only {REFINER_BIGG_PREFIX}* "
                              f"(refiner); found {', '.join(found)}")
    conv_in = state.get(ldm.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError("SDXL checkpoint without a UNet (no model.diffusion_model.input_blocks.0.0.weight)")
    if not any(k.startswith(ldm.UNET_PREFIX + "label_emb.") for k in state):
        raise CheckpointError("SDXL checkpoint whose UNet has no label_emb (the pooled-text and time-id "
                              "embedding of SDXL): the file is incomplete or not SDXL")
    widths = {}
    for name, key in (("clip_l", CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight"),
                      ("bigg", (REFINER_BIGG_PREFIX if refiner else BIGG_PREFIX) + "token_embedding.weight")):
        if key in state:
            widths[name] = int(state[key].shape[-1])
    context = [int(v.shape[-1]) for k, v in state.items()
               if k.startswith(ldm.UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    expected = sum(widths.values())
    if context and len(widths) == (1 if refiner else 2) and context[0] != expected:
        raise CheckpointError(f"SDXL checkpoint: the UNet's cross-attention is {context[0]} wide but the text "
                              f"encoders give {expected} ({' + '.join(f'{k} {v}' for k, v in widths.items())})")
    label = state.get(ldm.UNET_PREFIX + "label_emb.0.0.weight")
    in_channels = int(conv_in.shape[1])
    family = "sdxl-refiner" if refiner else ("sdxl-inpainting" if in_channels == 9 else "sdxl")
    return {"family": family, "in_channels": in_channels, "context_dim": context[0] if context else None,
            "add_embedding_in": int(label.shape[1]) if label is not None else None}


def split_components(state: Mapping[str, Any], *, prefer_ema: bool = True) -> dict[str, Any]:
    """An SDXL single-file state dict -> {"unet", "vae", "text_encoder" (None for the refiner),
    "text_encoder_2", "used_ema"}: SGM names without their prefixes.

    With `prefer_ema`, the UNet comes from `model_ema.*` when the file has an EMA copy of every UNet
    tensor (as for SD 1.x; SDXL releases have none, some fine-tunes do).
    """
    refiner = detect_family(state)["family"] == "sdxl-refiner"

    def part(prefix):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    unet, vae = part(ldm.UNET_PREFIX), part(ldm.VAE_PREFIX)
    if not vae:
        raise CheckpointError("SDXL checkpoint without a VAE (no first_stage_model.*); sdjax needs the VAE "
                              "in the file")
    used_ema = False
    if prefer_ema:
        ema = {k: state.get(ldm.EMA_PREFIX + ("diffusion_model." + k).replace(".", "")) for k in unet}
        if all(v is not None for v in ema.values()):
            unet, used_ema = ema, True
    return {"unet": unet, "vae": vae, "text_encoder": None if refiner else part(CLIP_L_PREFIX),
            "text_encoder_2": part(REFINER_BIGG_PREFIX if refiner else BIGG_PREFIX), "used_ema": used_ema}


def bigg_to_diffusers(sgm: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """OpenCLIP bigG names (prefix removed) -> sdjax `CLIPTextModelWithProjection` names.

    Layers at or past `num_layers` are dropped (none for a real SDXL file); `logit_scale` and
    `attn_mask` are not parameters of the text model. `text_projection` is transposed.
    """
    if _PROJECTION not in sgm:
        raise CheckpointError("OpenCLIP bigG text encoder without text_projection (SDXL's pooled embedding "
                              "needs it)")
    out = ldm.openclip_to_diffusers({k: v for k, v in sgm.items() if k != _PROJECTION}, num_layers)
    out["text_projection.weight"] = np.ascontiguousarray(np.asarray(sgm[_PROJECTION]).T)
    return out


def bigg_to_sgm(flat: Mapping[str, Any]) -> dict[str, Any]:
    """sdjax `CLIPTextModelWithProjection` names -> OpenCLIP bigG names (prefix not included)."""
    flat = {k.removeprefix("text_model."): v for k, v in flat.items()}
    if "text_projection.weight" not in flat:
        raise CheckpointError("text_encoder_2 has no text_projection.weight; SDXL's second encoder is a "
                              "CLIPTextModelWithProjection")
    out = ldm.openclip_to_ldm({k: v for k, v in flat.items() if k != "text_projection.weight"})
    out[_PROJECTION] = np.ascontiguousarray(np.asarray(flat["text_projection.weight"]).T)
    return out


def to_single_file(unet: Mapping[str, Any], vae: Mapping[str, Any], text_encoder: Mapping[str, Any] | None,
                   text_encoder_2: Mapping[str, Any], *, unet_config: Mapping[str, Any],
                   vae_config: Mapping[str, Any]) -> dict[str, Any]:
    """Diffusers-named components (sdjax CLIP names for the encoders) -> one SGM state dict.

    `text_encoder` None writes a refiner file (bigG in slot 0).
    """
    out = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(unet, unet_config).items()}
    out.update({ldm.VAE_PREFIX + k: v for k, v in ldm.vae_to_ldm(vae, vae_config).items()})
    if text_encoder is not None:
        out.update({CLIP_L_PREFIX + k: v for k, v in ldm.clip_to_ldm(text_encoder).items()})
    bigg_prefix = BIGG_PREFIX if text_encoder is not None else REFINER_BIGG_PREFIX
    out.update({bigg_prefix + k: v for k, v in bigg_to_sgm(text_encoder_2).items()})
    return out
