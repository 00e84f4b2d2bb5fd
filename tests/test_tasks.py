"""Host-side A1111 preprocessing: crop regions, mask blur, fill, outpaint canvas, inpaint jobs."""

import numpy as np
import pytest
from PIL import Image

from sdjax.pipeline import inpaint as tasks


def test_crop_region_and_expand():
    m = np.zeros((100, 200), np.uint8)
    m[40:50, 60:80] = 255
    assert tasks.get_crop_region(m, 5) == (55, 35, 85, 55)
    assert tasks.get_crop_region(np.zeros((4, 4)), 3) is None
    x1, y1, x2, y2 = tasks.expand_crop_region((55, 35, 85, 55), 64, 64, 200, 100)
    assert (x2 - x1) == (y2 - y1) and 0 <= x1 and x2 <= 200 and 0 <= y1 and y2 <= 100


def test_mask_blur_matches_gaussian_and_keeps_zero_blur():
    m = np.zeros((32, 32), np.uint8)
    m[:, 16:] = 255
    img = Image.fromarray(m)
    assert np.array_equal(np.asarray(tasks.mask_blur(img, 0)), m)
    blurred = np.asarray(tasks.mask_blur(img, 4), np.float32)
    assert 0 < blurred[0, 15] < 255 and blurred[0, 0] == 0 and blurred[0, 31] == 255
    assert np.all(np.diff(blurred[5]) >= 0)


def test_fill_keeps_unmasked_pixels():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    out = np.asarray(tasks.fill(im, Image.fromarray(mask)))
    keep = mask == 0
    assert np.abs(out[keep].astype(int) - np.asarray(im)[keep]).max() <= 1


def test_outpaint_canvas():
    im = Image.new("RGB", (64, 64), (200, 10, 10))
    canvas, mask = tasks.outpaint_canvas(im, right=32, overlap=8)
    assert canvas.size == mask.size == (96, 64)
    m = np.asarray(mask)
    assert m[:, 64:].min() == 255 and m[:, 56:64].min() == 255 and m[:, :56].max() == 0
    assert np.asarray(canvas)[:, 80].mean(axis=0)[0] > 100  # filled from the red edge
    with pytest.raises(tasks.TaskError, match="multiple of 8"):
        tasks.outpaint_canvas(im, left=3)


def test_prepare_inpaint_modes_and_paste_back():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:32, 16:32] = 255
    job = tasks.prepare_inpaint(image, mask, 64, 64, blur=0, fill_mode="latent noise")
    assert job.latent_mask.shape == job.cond_mask.shape == (8, 8, 1)
    assert job.latent_mask[2:4, 2:4].min() == 1 and job.latent_mask.sum() == 4
    assert (job.fill_keep, job.fill_noise) == (0.0, 1.0)
    assert np.all(job.masked_image[16:32, 16:32] == 0)
    out = tasks.paste_back(Image.new("RGB", (64, 64)), job)
    assert np.array_equal(np.asarray(out)[:8], image[:8])  # the original outside the mask
    crop = tasks.prepare_inpaint(image, mask, 32, 32, blur=2, full_res=True, padding=4)
    assert crop.paste_to is not None and crop.image.shape == (32, 32, 3)
    assert crop.extra_params["Inpaint area"] == "Only masked"
    with pytest.raises(tasks.TaskError, match="same size"):
        tasks.prepare_inpaint(image, mask[:32], 64, 64)
