"""Canny edges in numpy (no OpenCV), for the "canny" ControlNet preprocessor.

Follows `cv2.Canny` (the detector the Canny ControlNets were trained with): 3x3 Sobel on
0..255 values, L1 magnitude, the strongest colour channel per pixel, OpenCV's
non-maximum-suppression tie rule, double threshold and 8-connected hysteresis. cv2.Canny does
not blur; `sigma > 0` adds a Gaussian blur first (Canny 1986's smoothing step) for noisy photos.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage  # scipy comes with jax

__all__ = ["canny"]


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W, C), radius ceil(3 sigma), replicated borders."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    p = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="edge")
    x = sum(k[i] * p[i:i + x.shape[0]] for i in range(2 * r + 1))
    p = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * p[:, i:i + x.shape[1]] for i in range(2 * r + 1))


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (d/dx, d/dy) of (H, W, C), replicated borders (OpenCV's Canny)."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]

    def s(dy, dx):
        return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    return gx, gy


def canny(image: np.ndarray, low_threshold: float = 100.0, high_threshold: float = 200.0, *,
          sigma: float = 0.0, l2_gradient: bool = False) -> np.ndarray:
    """Canny edges of an (H, W) or (H, W, C) image with values in 0..255 -> (H, W) bool.

    Thresholds are in OpenCV's units (Sobel magnitude of 0..255 pixels, |gx| + |gy| unless
    `l2_gradient`): A1111's defaults are 100 / 200. A pixel is an edge if it is a local
    maximum along its gradient, above `low_threshold`, and 8-connected through such pixels
    to one above `high_threshold`. Colour images use, per pixel, the channel with the
    largest gradient (as cv2.Canny does). sigma > 0 blurs first (cv2.Canny does not).
    """
    if low_threshold > high_threshold:
        low_threshold, high_threshold = high_threshold, low_threshold  # OpenCV swaps them too
    x = np.asarray(image, np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3:
        raise ValueError(f"canny expects an (H, W) or (H, W, C) image, got shape {x.shape}")
    if sigma > 0:
        x = _gaussian_blur(x, sigma)
    gx, gy = _sobel(x)
    mag = np.sqrt(gx * gx + gy * gy) if l2_gradient else np.abs(gx) + np.abs(gy)
    pick = np.argmax(mag, axis=-1)[..., None]
    gx, gy, mag = (np.take_along_axis(a, pick, axis=-1)[..., 0] for a in (gx, gy, mag))

    # Non-maximum suppression with OpenCV's sectors and tie rule (strictly greater than the
    # neighbour before, at least the one after), so a step edge comes out one pixel thick.
    h, w = mag.shape
    m = np.pad(mag, 1)  # zeros outside, as OpenCV

    def nb(dy, dx):
        return m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    ax, ay = np.abs(gx), np.abs(gy)
    tg22 = math.tan(math.radians(22.5))
    horizontal = ay < ax * tg22
    vertical = ay > ax / tg22  # tan(67.5) = 1 / tan(22.5)
    s = np.where(gx * gy < 0, -1, 1)
    diag = np.where(s < 0, (mag > nb(-1, 1)) & (mag > nb(1, -1)), (mag > nb(-1, -1)) & (mag > nb(1, 1)))
    peak = np.where(horizontal, (mag > nb(0, -1)) & (mag >= nb(0, 1)),
                    np.where(vertical, (mag > nb(-1, 0)) & (mag >= nb(1, 0)), diag))
    candidate = peak & (mag > low_threshold)
    strong = candidate & (mag > high_threshold)

    labels, _ = ndimage.label(candidate, structure=np.ones((3, 3), bool))
    keep = np.unique(labels[strong])
    return np.isin(labels, keep[keep > 0])
