"""img2img / inpainting / outpainting preprocessing on the host, as AUTOMATIC1111 does it.

Everything here is PIL/numpy; the jitted core (`sdjax.pipeline.core`) gets arrays:
- `mask_blur`: A1111's Gaussian mask blur (cv2 kernel size 2*int(2.5*r+0.5)+1, sigma r).
- `fill`: A1111 "fill" masked content (`masking.fill`: blurred surroundings composited in).
- `get_crop_region`, `expand_crop_region`: "inpaint only masked" crop with padding.
- `prepare_inpaint`: mask + image -> the processing image, latent masks, the 9-channel
  conditioning inputs and what is needed to paste the result back (`paste_back`).
- `outpaint_canvas`: extend the canvas on chosen sides and make the mask of the new area.

Masks: white = 1 = repaint. Images: PIL RGB, or arrays as `to_pil_rgb` accepts.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdjax.errors import TaskError
from sdjax.images import _open, to_8bit, to_rgb

FILL_MODES = ("fill", "original", "latent noise", "latent nothing")  # A1111 inpainting_fill 0..3


def to_pil_rgb(image) -> Image.Image:
    """A path, a PIL image, or an array (H, W, 3) / (1, H, W, 3) -- uint8 in [0, 255] or
    float in [-1, 1] -- as a PIL RGB image. Files and PIL images of any mode go through
    `sdjax.images.to_rgb` (16-bit scaled to 8 bits, transparency composited on white)."""
    if isinstance(image, (str, os.PathLike)):
        return to_rgb(ImageOps.exif_transpose(_open(image)))
    if isinstance(image, Image.Image):
        return to_rgb(image)
    a = np.asarray(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise TaskError(f"an image array must be (H, W, 3) or (1, H, W, 3); got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.round((np.clip(a.astype(np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)
    return Image.fromarray(a[..., :3], "RGB")


def to_pil_mask(mask) -> Image.Image:
    """A path, a PIL image, or an array (H, W) -- float in [0, 1] or uint8 -- as a PIL "L" mask."""
    if isinstance(mask, (str, os.PathLike)):
        return to_8bit(ImageOps.exif_transpose(_open(mask))).convert("L")
    if isinstance(mask, Image.Image):
        return to_8bit(mask).convert("L")
    a = np.asarray(mask)
    a = a.reshape(a.shape[-3:-1]) if a.ndim > 2 else a
    if a.ndim != 2:
        raise TaskError(f"a mask array must be (H, W); got shape {np.asarray(mask).shape}")
    if a.dtype != np.uint8:
        a = np.round(np.clip(a.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(a, "L")


def pil_to_array(image: Image.Image) -> np.ndarray:
    """PIL RGB -> float32 (H, W, 3) in [-1, 1]."""
    return np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1.0


def _gaussian_1d(radius: float) -> np.ndarray:
    size = 2 * int(2.5 * radius + 0.5) + 1
    x = np.arange(size) - size // 2
    k = np.exp(-(x**2) / (2 * radius**2))
    return k / k.sum()


def mask_blur(mask: Image.Image, blur_x: float, blur_y: float | None = None) -> Image.Image:
    """A1111's mask blur: a Gaussian of std `blur` px along each axis (border reflect-101, cv2's
    default), kernel size 2*int(2.5*blur+0.5)+1. 0 leaves the mask unchanged."""
    blur_y = blur_x if blur_y is None else blur_y
    a = np.asarray(mask.convert("L"), np.float64)
    for axis, r in ((1, blur_x), (0, blur_y)):
        if r <= 0:
            continue
        k = _gaussian_1d(r)
        pad = len(k) // 2
        widths = [(0, 0), (0, 0)]
        widths[axis] = (pad, pad)
        mode = "reflect" if a.shape[axis] > pad else "edge"
        padded = np.pad(a, widths, mode=mode)
        a = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), axis, padded)
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 "fill" (masking.fill): the masked area painted with ever sharper blurs of the
    unmasked surroundings; unmasked pixels are unchanged."""
    image_mod = Image.new("RGBA", image.size)
    image_masked = Image.new("RGBa", image.size)
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def get_crop_region(mask: np.ndarray, pad: int = 0) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2) of the mask's nonzero pixels grown by `pad` and clamped; None if blank."""
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        return None
    h, w = np.asarray(mask).shape
    return (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
            min(int(xs.max()) + 1 + pad, w), min(int(ys.max()) + 1 + pad, h))


def expand_crop_region(region, processing_width: int, processing_height: int,
                       image_width: int, image_height: int) -> tuple[int, int, int, int]:
    """Grow `region` to the processing aspect ratio, shifted to stay inside the image (A1111)."""
    x1, y1, x2, y2 = region
    ratio_crop = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop > ratio_processing:
        diff = int((x2 - x1) / ratio_processing - (y2 - y1))
        y1, y2 = y1 - diff // 2, y2 + diff - diff // 2
        if y2 >= image_height:
            y1, y2 = y1 - (y2 - image_height), image_height
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, image_height)
    else:
        diff = int((y2 - y1) * ratio_processing - (x2 - x1))
        x1, x2 = x1 - diff // 2, x2 + diff - diff // 2
        if x2 >= image_width:
            x1, x2 = x1 - (x2 - image_width), image_width
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, image_width)
    return x1, y1, x2, y2


@dataclasses.dataclass
class InpaintJob:
    """Inputs of one inpainting run and how to paste its result back.

    image: float32 (H, W, 3) in [-1, 1], the processing image (after crop and fill);
    latent_mask: float32 (h, w, 1), 1 = repaint, for the latent blend (rounded, A1111);
    cond_mask: float32 (h, w, 1) binary, and masked_image (H, W, 3) in [-1, 1], for 9-channel
    UNets (diffusers / A1111 image conditioning); fill_keep, fill_noise: the latent
    masked-content coefficients of `core.build`; overlay: the original with alpha =
    not-mask (RGBA, full size), paste_to: (x, y, w, h) of the crop in the original or None.
    """

    image: np.ndarray
    latent_mask: np.ndarray
    cond_mask: np.ndarray
    masked_image: np.ndarray
    fill_keep: float
    fill_noise: float
    overlay: Image.Image | None
    paste_to: tuple[int, int, int, int] | None
    extra_params: dict


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def prepare_inpaint(image, mask, width: int, height: int, *, blur: float = 4, fill_mode: str = "original",
                    full_res: bool = False, padding: int = 32, paste_back: bool = True) -> InpaintJob:
    """A1111's img2img-inpaint preprocessing (processing.StableDiffusionProcessingImg2Img.init).

    image, mask: same size (any of `to_pil_rgb` / `to_pil_mask` inputs), white = repaint;
    width, height: the processing size (multiples of 8). blur: mask blur in px;
    fill_mode: one of FILL_MODES; full_res: "inpaint only masked" (crop the mask's
    bounding box grown by `padding`, to the processing aspect ratio, generate at
    width x height, paste back).
    """
    image, mask = to_pil_rgb(image), to_pil_mask(mask)
    if image.size != mask.size:
        raise TaskError(f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x{image.size[1]}; "
                        "they must be the same size")
    if fill_mode not in FILL_MODES:
        raise TaskError(f"masked content {fill_mode!r} is not one of {', '.join(FILL_MODES)}")
    extra = {"Mask blur": blur} if blur > 0 else {}
    if blur > 0:
        mask = mask_blur(mask, blur)
    crop = None
    if full_res:
        crop = get_crop_region(np.asarray(mask), padding)
    if crop is not None:
        crop = expand_crop_region(crop, width, height, mask.width, mask.height)
        mask_for_overlay = mask
        proc_mask = _resize(mask.crop(crop), (width, height))
        paste_to = (crop[0], crop[1], crop[2] - crop[0], crop[3] - crop[1])
        extra.update({"Inpaint area": "Only masked", "Masked area padding": padding})
    else:
        proc_mask = _resize(mask, (width, height))
        mask_for_overlay = Image.fromarray(np.clip(np.asarray(proc_mask, np.float32) * 2, 0, 255).astype(np.uint8))
        paste_to = None
        image = _resize(image, (width, height))
    overlay = None
    if paste_back:
        overlay = Image.new("RGBa", image.size)
        overlay.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay))
        overlay = overlay.convert("RGBA")
    proc_image = _resize(image.crop(crop), (width, height)) if crop is not None else image
    if fill_mode != "original":
        proc_image = fill(proc_image, proc_mask)
    h, w = height // 8, width // 8
    latmask = np.asarray(proc_mask.convert("RGB").resize((w, h)), np.float32)[..., 0] / 255.0
    latent_mask = np.around(latmask)[..., None]
    binary = (np.asarray(proc_mask, np.float32) / 255.0 >= 0.5).astype(np.float32)
    pixels = pil_to_array(proc_image)
    cond_mask = binary[::8, ::8][..., None]  # nearest, torch's floor indexing
    keep, noise = {"fill": (1.0, 0.0), "original": (1.0, 0.0), "latent noise": (0.0, 1.0),
                   "latent nothing": (0.0, 0.0)}[fill_mode]
    return InpaintJob(pixels, latent_mask, cond_mask, pixels * (1.0 - binary[..., None]), keep, noise,
                      overlay, paste_to, extra)


def paste_back(image: Image.Image, job: InpaintJob) -> Image.Image:
    """A1111's apply_overlay: resize an "only masked" result into its crop, then put the
    original back over it outside the (blurred) mask."""
    if job.overlay is None:
        return image
    if job.paste_to is not None:
        x, y, w, h = job.paste_to
        base = Image.new("RGBA", job.overlay.size)
        base.paste(_resize(image, (w, h)), (x, y))
        image = base
    image = image.convert("RGBA")
    image.alpha_composite(job.overlay)
    return image.convert("RGB")


def outpaint_canvas(image, *, left: int = 0, right: int = 0, up: int = 0, down: int = 0,
                    overlap: int = 8) -> tuple[Image.Image, Image.Image]:
    """Extend the canvas by the given pixels per side; returns (canvas, mask).

    The new area is filled (A1111 `fill`) from the image's edges; the mask is white over the
    new area and `overlap` px into the original along the extended sides, so the seam is
    repainted too. The new size must be a multiple of 8 (TaskError otherwise).
    """
    image = to_pil_rgb(image)
    if min(left, right, up, down) < 0 or left + right + up + down == 0:
        raise TaskError("outpainting needs non-negative extensions, at least one of left/right/up/down > 0")
    w, h = image.width + left + right, image.height + up + down
    if w % 8 or h % 8:
        raise TaskError(f"the outpainted size {w}x{h} must be a multiple of 8; adjust left/right/up/down")
    canvas = Image.new("RGB", (w, h))
    canvas.paste(image, (left, up))
    m = np.full((h, w), 255, np.uint8)
    x1, y1 = left + (overlap if left else 0), up + (overlap if up else 0)
    x2, y2 = left + image.width - (overlap if right else 0), up + image.height - (overlap if down else 0)
    m[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = 0
    mask = Image.fromarray(m, "L")
    return fill(canvas, mask), mask
