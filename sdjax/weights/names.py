"""Per-component renames of torch checkpoint names to sdjax module paths' torch spelling.

Each function is pure: flat dict of torch-named arrays in, flat dict out, ready
for `sdjax.weights.mapping.load_state`. They absorb the layouts found in real
files: transformers v4 (`text_model.` prefix) and v5 (none), and diffusers'
deprecated VAE attention names (`query`/`key`/`value`/`proj_attn`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# Buffers found in real checkpoints that are not parameters.
IGNORED_BUFFERS = ("position_ids",)


def is_ignored(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in IGNORED_BUFFERS


def clip_text(flat: Mapping[str, Any]) -> dict[str, Any]:
    """transformers CLIPTextModel names (v4 with `text_model.`, or v5 without) -> sdjax CLIP names."""
    out = {}
    for name, arr in flat.items():
        if name.startswith("text_model."):
            name = name[len("text_model."):]
        if not is_ignored(name):
            out[name] = arr
    return out


_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae(flat: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers AutoencoderKL names, old (`query`, ..., `proj_attn`) or new (`to_q`, ...) -> sdjax."""
    out = {}
    for name, arr in flat.items():
        parts = name.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _OLD_VAE_ATTN:
            name = ".".join(parts[:-2] + [_OLD_VAE_ATTN[parts[-2]], parts[-1]])
        # Some conversions store attention projections as 1x1 convs: (out, in, 1, 1).
        if "attentions" in parts and parts[-1] == "weight" and getattr(arr, "ndim", 0) == 4 \
                and tuple(arr.shape[2:]) == (1, 1) and any(p in name for p in ("to_q", "to_k", "to_v", "to_out")):
            arr = np.asarray(arr)[:, :, 0, 0]
        out[name] = arr
    return out


def unet(flat: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers UNet2DConditionModel names -> sdjax (identical today; kept for symmetry)."""
    return dict(flat)
