"""The invisible watermark of the SD reference scripts and diffusers' SDXL pipelines, in numpy.

The `invisible-watermark` package (`imwatermark.WatermarkEncoder`, method "dwtDct") is what
those scripts call; it cannot be a dependency here: it requires PyTorch and the full (GUI)
opencv-python. This module is the same algorithm, written from the package's source
(`imwatermark/maxDct.py`, `EmbedMaxDct`), so the package's `WatermarkDecoder("bits", 48)`
reads sdjax's mark and `decode` below reads the package's (tests/test_watermark.py checks both):

1. RGB -> YUV as OpenCV's `COLOR_BGR2YUV` for 8-bit images (U = 0.492 (B - Y) + 128);
2. one level of the Haar DWT of the U channel (cropped to a multiple of 4): its LL band;
3. the LL band in 4x4 blocks, in raster order; block k carries bit k mod 48: its largest
   coefficient by magnitude (the DC-position [0, 0] excluded) becomes
   sign * (|v| // 36 + 0.25 + 0.5 * bit) * 36;
4. decode: per block, (|v| mod 36) > 18 is a 1; the bits are the per-position averages > 0.5.

Three deliberate differences from the package's encoder, none of which changes what a decoder
reads. The package moves each peak within its quantisation bin (up to 0.75 * 36 away), and a
peak moved down can stop being its block's peak, so that block reads another coefficient: on
smooth images the package's own decoder then reads only ~40 of its 48 bits. Here the peak moves
to the nearest level carrying the bit (at most 18 away), or to the level above when the nearest
one would drop it to or below the block's second-largest coefficient (+1 margin for 8-bit
rounding); scripts/bench_watermark.py measures both encoders. The package rebuilds the image with the Haar detail bands swapped (`idwt2((ca,
(v, h, d)))`), which transposes every 2x2 pixel block of the U channel; here only the LL band
changes, so each 2x2 block's U moves by the LL change / 2, and is turned back into RGB with the
exact inverse for a change of U alone (dB = dU / 0.492, dG = -0.114 / 0.587 dB, R and Y
unchanged), rounded to 8 bits. Images under 256 x 256 pixels (area) are left unmarked, as the
package refuses them.

The message is diffusers' `WATERMARK_MESSAGE` (`StableDiffusionXLWatermarker`). Pixels change
only where an image is written to a file by the CLI (`--no-watermark` turns it off), never in
the arrays `Pipeline.generate` returns.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = tuple(int(b) for b in bin(WATERMARK_MESSAGE)[2:])  # 48 bits, as diffusers
SCALE = 36.0
BLOCK = 4
MIN_PIXELS = 256 * 256
DETECT_MIN_BITS = 40  # of 48

__all__ = ["DETECT_MIN_BITS", "MIN_PIXELS", "WATERMARK_BITS", "WATERMARK_MESSAGE", "apply_watermark", "decode_bits",
           "detect", "embed_bits"]


def _u_channel(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return 0.492 * (b - y) + 128.0


def _ll_blocks(u: np.ndarray) -> np.ndarray:
    """Haar LL band of u (H, W) (H, W multiples of 4) as (n_blocks, 16), blocks in raster order."""
    ll = (u[0::2, 0::2] + u[0::2, 1::2] + u[1::2, 0::2] + u[1::2, 1::2]) / 2.0  # pywt 'haar' cA
    h, w = ll.shape
    return ll.reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(-1, BLOCK * BLOCK)


def _peaks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1
    return pos, blocks[np.arange(len(blocks)), pos]


def embed_bits(rgb: np.ndarray, bits=WATERMARK_BITS) -> np.ndarray:
    """The image uint8 (H, W, 3) RGB with `bits` embedded (a new array); images under
    256 x 256 pixels come back unchanged."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"embed_bits needs a uint8 (H, W, 3) RGB image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[0] // BLOCK * BLOCK, rgb.shape[1] // BLOCK * BLOCK
    if rgb.shape[0] * rgb.shape[1] < MIN_PIXELS or h < 2 * BLOCK or w < 2 * BLOCK:
        return rgb.copy()
    blocks = _ll_blocks(_u_channel(rgb[:h, :w]))
    pos, val = _peaks(blocks)
    bit = np.resize(np.asarray(bits, np.float64), len(blocks))
    offset = 0.25 + 0.5 * bit
    # The nearest level that carries the bit (at most SCALE / 2 away) ...
    level = np.maximum(np.rint(np.abs(val) / SCALE - offset), 0.0)
    magnitude = (level + offset) * SCALE
    # ... unless it would stop being the block's peak: then the level above (> |val|).
    rest = np.abs(blocks[:, 1:]).copy()
    rest[np.arange(len(blocks)), pos - 1] = -np.inf
    runner_up = rest.max(axis=1)
    magnitude = np.where(magnitude <= runner_up + 1.0, (np.floor(np.abs(val) / SCALE - offset) + 1 + offset) * SCALE,
                         magnitude)
    new = np.where(val >= 0, magnitude, -magnitude)
    d_ll = np.zeros_like(blocks)
    d_ll[np.arange(len(blocks)), pos] = new - val
    hb, wb = h // 2 // BLOCK, w // 2 // BLOCK
    d_ll = d_ll.reshape(hb, wb, BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(h // 2, w // 2)
    d_u = np.repeat(np.repeat(d_ll / 2.0, 2, axis=0), 2, axis=1)  # inverse Haar of an LL change
    d_b = d_u / 0.492
    d_g = -0.114 / 0.587 * d_b
    out = rgb.astype(np.float64)
    out[:h, :w, 1] += d_g
    out[:h, :w, 2] += d_b
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def decode_bits(rgb: np.ndarray, n_bits: int = len(WATERMARK_BITS)) -> np.ndarray | None:
    """The n_bits read from an RGB image (H, W, 3) (bool (n_bits,)), or None under 256 x 256."""
    rgb = np.asarray(rgb)[..., :3]
    h, w = rgb.shape[0] // BLOCK * BLOCK, rgb.shape[1] // BLOCK * BLOCK
    if rgb.shape[0] * rgb.shape[1] < MIN_PIXELS or h < 2 * BLOCK or w < 2 * BLOCK:
        return None
    _, val = _peaks(_ll_blocks(_u_channel(rgb[:h, :w])))
    score = (np.abs(val) % SCALE) > 0.5 * SCALE
    sums = np.bincount(np.arange(len(score)) % n_bits, weights=score, minlength=n_bits)
    counts = np.bincount(np.arange(len(score)) % n_bits, minlength=n_bits)
    return sums / np.maximum(counts, 1) * 255 > 127


def detect(image: Image.Image | np.ndarray, bits=WATERMARK_BITS) -> tuple[bool, int]:
    """(found, matching bits of the 48): found at >= DETECT_MIN_BITS. The algorithm does not
    read back all 48 bits on every image, not even the package's own (a re-quantised peak can
    stop being its block's peak): 45 / 48 is usual on a fresh image, and an unmarked image
    matches about half (P(>= 40 of 48 by chance) = 3e-7). Under 256 x 256 pixels: (False, 0)."""
    rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    read = decode_bits(rgb, len(bits))
    if read is None:
        return False, 0
    match = int(np.sum(read == np.asarray(bits, bool)))
    return match >= DETECT_MIN_BITS * len(bits) // 48, match


def apply_watermark(images: list[Image.Image]) -> list[Image.Image]:
    """Each PIL image with the sdjax / diffusers SDXL watermark embedded (RGB; see the module doc)."""
    return [Image.fromarray(embed_bits(np.asarray(im.convert("RGB")))) for im in images]
