"""The SDXL flags of `sdjax generate / img2img / inpaint / outpaint`: size conditioning and the refiner.

    --original-size WxH   --crop-coords TOP,LEFT   --target-size WxH     (and --negative-... forms)
    --aesthetic-score S   --negative-aesthetic-score S                  (refiner time ids)
    --refiner PATH        --refiner-switch-at F                          (A1111 "Refiner switch at")

Sizes are written WIDTHxHEIGHT as --width/--height and A1111's "Size"; they become diffusers'
(height, width) pairs. Parsing only: the values are checked by `sdjax.pipeline.request.Request`.
"""

from __future__ import annotations

import argparse
import re

from sdjax.errors import UsageError

# Request field -> (flag, kind): "size" = WxH -> (h, w); "crop" = TOP,LEFT -> (top, left).
_PAIRS = {
    "original_size": ("--original-size", "size"),
    "crops_coords_top_left": ("--crop-coords", "crop"),
    "target_size": ("--target-size", "size"),
    "negative_original_size": ("--negative-original-size", "size"),
    "negative_crops_coords_top_left": ("--negative-crop-coords", "crop"),
    "negative_target_size": ("--negative-target-size", "size"),
}
# Options that are `Request` fields of the same name (checked before the model loads).
REQUEST_OPTIONS = tuple(_PAIRS) + ("aesthetic_score", "negative_aesthetic_score", "refiner_switch_at")
# A1111 infotext keys read back by --from-png.
INFOTEXT_KEYS = {"Refiner switch at": ("refiner_switch_at", float), "Refiner": ("png_refiner", str)}


def add_sdxl_arguments(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("SDXL")
    for field, (flag, kind) in _PAIRS.items():
        what = "WxH in pixels (default: the image size)" if kind == "size" else "TOP,LEFT in pixels (default 0,0)"
        g.add_argument(flag, dest=field, help=f"SDXL {field.replace('_', ' ')} time id: {what}")
    g.add_argument("--aesthetic-score", type=float, help="SDXL refiner aesthetic score (default 6.0)")
    g.add_argument("--negative-aesthetic-score", type=float, help="SDXL refiner negative aesthetic score (2.5)")
    g.add_argument("--refiner", help="SDXL refiner (diffusers folder) that takes over at --refiner-switch-at")
    g.add_argument("--refiner-switch-at", type=float,
                   help="fraction of the denoising after which the refiner takes over (default 0.8)")


def _pair(flag: str, kind: str, text: str) -> tuple[int, int]:
    sep = "x" if kind == "size" else ","
    m = re.fullmatch(rf"\s*(\d+)\s*{sep}\s*(\d+)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        example = "1024x1024 (WIDTHxHEIGHT)" if kind == "size" else "0,0 (TOP,LEFT)"
        raise UsageError(f"{flag} {text!r}: expected e.g. {example}")
    a, b = int(m.group(1)), int(m.group(2))
    return (b, a) if kind == "size" else (a, b)  # sizes: WxH -> diffusers' (height, width)


def sdxl_options(o: dict) -> dict:
    """The Request fields these flags give (parsed; values checked by Request)."""
    out = {}
    for field, (flag, kind) in _PAIRS.items():
        if o.get(field) is not None:
            out[field] = _pair(flag, kind, o[field])
    for field in ("aesthetic_score", "negative_aesthetic_score", "refiner_switch_at"):
        if o.get(field) is not None:
            out[field] = o[field]
    if o.get("refiner_switch_at") is not None and not o.get("refiner") and not o.get("png_refiner"):
        raise UsageError("--refiner-switch-at needs --refiner PATH (the SDXL refiner that takes over)")
    if o.get("png_refiner") and not o.get("refiner"):
        raise UsageError(f"the PNG was made with the refiner {o['png_refiner']!r}; pass --refiner PATH "
                         "(its diffusers folder) to make it again")
    return out


__all__ = ["INFOTEXT_KEYS", "REQUEST_OPTIONS", "add_sdxl_arguments", "sdxl_options"]
