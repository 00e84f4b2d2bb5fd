"""The generation features the README lists, each checked for what it must produce, through the
public API only (`sdjax.load_pipeline`, `pipe.generate`, `pipe.outpaint`, the `sdjax` CLI):
variation seeds, masked content, outpainting, only-masked inpainting, float16, and the
infotext fields the pipeline fills in.

Two models: the tiny random pipeline, and the same with its UNet's last conv zeroed. The zero
UNet predicts eps = 0, so D(x, sigma) = x and an Euler step leaves x unchanged: with
`sigmas=[s, 0]` a call returns its starting latents (noise * s for txt2img; the masked init
plus noise * s for inpainting), which makes the noise and the masked content observable.
"""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sdjax
from conftest import reference
from sdjax.metadata import parse_infotext
from sdjax_tiny import build_diffusers_pipeline, write_tiny_folder

KW = dict(steps=3, width=64, height=64, sampler="euler", schedule="karras")
ZERO = dict(sampler="euler", width=64, height=64, cfg_scale=7.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("feat") / "tiny")


@pytest.fixture(scope="module")
def pipe(folder):
    return sdjax.load_pipeline(folder)


@pytest.fixture(scope="module")
def zpipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero") / "tiny"
    p = build_diffusers_pipeline("sd15", seed=0)
    with torch.no_grad():
        p.unet.conv_out.weight.zero_()
        p.unet.conv_out.bias.zero_()
    p.save_pretrained(folder)
    shutil.rmtree(folder / "tokenizer", ignore_errors=True)
    shutil.copytree(reference("sd15") / "tokenizer", folder / "tokenizer")
    return sdjax.load_pipeline(folder)


def _noise(zpipe, seed, **kw):
    """The unit noise a txt2img call starts from (latents of the zero UNet with sigmas [1, 0])."""
    return zpipe.generate("a", seed=seed, sigmas=[1.0, 0.0], **ZERO, **kw).latents


def _slerp(t, low, high):
    """Spherical interpolation of two whole latent tensors (one image's noise as one vector)."""
    lo, hi = low.reshape(-1).astype(np.float64), high.reshape(-1).astype(np.float64)
    omega = np.arccos(np.dot(lo, hi) / (np.linalg.norm(lo) * np.linalg.norm(hi)))
    return (np.sin((1 - t) * omega) * low + np.sin(t * omega) * high) / np.sin(omega)


def _pixels(im):
    return np.asarray(im, np.int16)


def test_variation_seeds_slerp_the_seed_and_subseed_noise(zpipe, pipe):
    """A1111 variation seeds: noise = slerp(strength, noise(seed), noise(subseed)); strength 0
    is the plain seed, 1 the subseed's noise, image i of a batch uses seed + i and subseed + i."""
    n5, n9 = _noise(zpipe, 5)[0], _noise(zpipe, 9)[0]
    assert abs(n5.mean()) < 0.2 and 0.85 < n5.std() < 1.15  # unit Gaussian (256 values)
    assert np.corrcoef(n5.ravel(), n9.ravel())[0, 1] < 0.3
    var = lambda s, **kw: _noise(zpipe, 5, subseed=9, subseed_strength=s, **kw)  # noqa: E731
    np.testing.assert_allclose(var(0.0)[0], n5, atol=1e-6)
    np.testing.assert_allclose(var(1.0)[0], n9, atol=1e-5)
    for s in (0.25, 0.5):
        np.testing.assert_allclose(var(s)[0], _slerp(s, n5, n9), rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(var(0.5)[0] - (n5 + n9) / 2) > 1.0  # slerp, not a linear mix
    batch = var(0.5, batch_size=2)
    np.testing.assert_allclose(batch[1], _slerp(0.5, _noise(zpipe, 6)[0], _noise(zpipe, 10)[0]),
                               rtol=1e-4, atol=1e-5)

    # The same through whole images of the tiny model (deterministic sampler: the sampler keys
    # of the seed do not matter, so strength 1 is the subseed's image).
    plain, sub = pipe.generate("a cat", seed=5, **KW), pipe.generate("a cat", seed=9, **KW)
    at = lambda s: pipe.generate("a cat", seed=5, subseed=9, subseed_strength=s, **KW)  # noqa: E731
    zero, one, half = at(0.0), at(1.0), at(0.5)
    np.testing.assert_array_equal(zero.latents, plain.latents)
    assert np.abs(_pixels(one.images[0]) - _pixels(sub.images[0])).max() <= 1
    assert np.abs(_pixels(half.images[0]) - _pixels(plain.images[0])).mean() > 2
    assert np.abs(_pixels(half.images[0]) - _pixels(sub.images[0])).mean() > 2
    p = parse_infotext(half.infotexts[0])
    assert (p["Seed"], p["Variation seed"], p["Variation seed strength"]) == ("5", "9", "0.5")


def _inpaint_case():
    """A 64x64 image, solid red outside a 32x32 square of random pixels, and the square as mask
    (aligned to the 8-px latent grid: latents [2:6, 2:6])."""
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), np.uint8)
    image[...] = (200, 30, 30)
    image[16:48, 16:48] = rng.integers(0, 255, (32, 32, 3))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    return image, mask


def _encode(pipe, image):
    mean, _ = pipe.vae.encode(np.asarray(image, np.float32)[None] / 127.5 - 1.0)
    return np.asarray(mean) * pipe.vae.scaling_factor


def test_masked_content_is_what_a1111_puts_under_the_mask(zpipe, pipe):
    """The latents sampling starts from inside the mask (strength 1, mask blur 0): "original" the
    image's latents, "fill" the latents of the image filled from its surroundings (here all
    red), "latent noise" the seed's noise, "latent nothing" zeros; outside the mask the latents
    of the image encoded (the original for "original", the filled image otherwise, as A1111). Then on the tiny model: each mode gives a different image inside the
    mask and the original pixels outside it."""
    image, mask = _inpaint_case()
    inside = (slice(2, 6), slice(2, 6))
    outside = np.ones((8, 8), bool)
    outside[1:7, 1:7] = False  # latents whose 8x8 pixel block is away from the square's edge
    sigma = 1e-3
    start = {mode: zpipe.generate("a", init_image=image, mask=mask, mask_blur=0, inpainting_fill=mode,
                                  strength=1.0, seed=5, sigmas=[sigma, 0.0], **ZERO).latents[0]
             for mode in ("original", "fill", "latent noise", "latent nothing")}
    original = _encode(zpipe, image)[0]
    red = _encode(zpipe, np.broadcast_to(np.array([200, 30, 30], np.uint8), (64, 64, 3)))[0]
    noise = _noise(zpipe, 5)[0]
    tol = 4 * sigma * np.abs(noise).max() + 1e-4
    np.testing.assert_allclose(start["original"][inside], original[inside], atol=tol)
    np.testing.assert_allclose(start["fill"][inside], red[inside], atol=0.05 * np.abs(red).max())
    # (fill is far from the original's latents compared with its distance to the red image's)
    assert np.abs(start["fill"][inside] - original[inside]).mean() > 3 * np.abs(start["fill"][inside] - red[inside]).mean()
    np.testing.assert_allclose(start["latent noise"][inside], noise[inside] * (1 + sigma), atol=1e-4)
    np.testing.assert_allclose(start["latent nothing"][inside], 0.0, atol=tol)
    np.testing.assert_allclose(start["original"][outside], original[outside], atol=1e-4)
    for mode in ("latent noise", "latent nothing"):  # A1111 fills the image for every mode but "original"
        np.testing.assert_allclose(start[mode][outside], start["fill"][outside], atol=1e-4)

    images = {mode: pipe.generate("a red circle", init_image=image, mask=mask, inpainting_fill=mode,
                                  strength=1.0, seed=5, **KW).images[0]
              for mode in ("original", "fill", "latent noise", "latent nothing")}
    for mode, im in images.items():
        px = _pixels(im)
        # 12+ px from the square: beyond the blurred (radius 4) mask, the original pasted back
        assert np.abs(px[:4] - image[:4]).max() <= 1 and np.abs(px[:, 60:] - image[:, 60:]).max() <= 1, mode
    modes = list(images)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            d = np.abs(_pixels(images[a])[16:48, 16:48] - _pixels(images[b])[16:48, 16:48]).mean()
            # at strength 1 the tiny VAE's small latents are swamped by sigma_max ~ 14.6 noise, so
            # original vs fill differ little; the start latents above are the precise check
            assert d > 0.1, (a, b, d)


def test_outpaint_keeps_the_image_and_grows_the_canvas(pipe):
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC)  # smooth, like a photo
    result = pipe.outpaint(image, "a red circle", left=16, right=8, down=8, seed=3, steps=3, sampler="euler")
    out = result.images[0]
    assert out.size == (88, 72)
    p = parse_infotext(result.infotexts[0])
    assert (p["Size-1"], p["Size-2"]) == ("88", "72")
    px, orig = _pixels(out), _pixels(image)
    kept = px[0:64, 16:80]
    # Away from the repainted seams (8 px overlap + mask blur 4) the original is pasted back as is.
    np.testing.assert_array_equal(kept[:40, 20:44], orig[:40, 20:44])
    # Up to the repainted overlap bands (8 px at the extended sides) the image stays close to the
    # original (only the blurred mask edge blends in the generated pixels).
    assert np.abs(kept[:56, 8:56] - orig[:56, 8:56]).mean() < 12
    # The new areas are generated: not black, not a copy of the edge fill everywhere.
    new = np.concatenate([px[:, :16].reshape(-1, 3), px[64:, :].reshape(-1, 3)])
    assert new.std() > 5 and new.mean() > 5


def test_only_masked_inpainting_cli_keeps_pixels_outside_the_crop(folder, tmp_path):
    """`sdjax inpaint --only-masked`: the mask's bounding box grown by --padding is generated at
    --width x --height and pasted back; every pixel outside that crop is the original's."""
    rng = np.random.default_rng(2)
    image = np.asarray(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
                       .resize((128, 128), Image.Resampling.BICUBIC))
    mask = np.zeros((128, 128), np.uint8)
    mask[56:72, 48:64] = 255
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "inpaint", "a red circle", "--model", str(folder),
                        "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
                        "--only-masked", "--padding", "8", "--mask-blur", "2", "--width", "64", "--height", "64",
                        "--steps", "3", "--sampler", "Euler", "--seed", "4", "--strength", "1",
                        "--no-progress", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = Image.open(out)
    assert result.size == (128, 128)  # the original's size, not the processing size
    px = _pixels(result)
    crop = np.zeros((128, 128), bool)
    crop[48:80, 40:72] = True  # the mask's box grown by 8 px: 32 x 32, already square
    assert np.array_equal(px[~crop], image[~crop])
    assert np.abs(px[56:72, 48:64] - image[56:72, 48:64]).mean() > 5  # the masked area was repainted
    p = parse_infotext(result.info["parameters"])
    assert (p["Inpaint area"], p["Masked area padding"], p["Size-1"], p["Size-2"]) == \
        ("Only masked", "8", "64", "64")


def test_float16_loads_and_generates_close_to_float32(folder, pipe):
    """float16 weights and compute: finite images within 3/255 mean and 24/255 max of float32,
    latents within 2% relative L2 (float16 keeps 11 mantissa bits; 3 steps of a tiny UNet)."""
    import jax

    half = sdjax.load_pipeline(folder, dtype="float16")
    assert {x.dtype.name for x in jax.tree.leaves(half.unet.state)} == {"float16"}
    r16 = half.generate(["a red circle", "a blue square"], seed=7, **KW)
    r32 = pipe.generate(["a red circle", "a blue square"], seed=7, **KW)
    assert np.isfinite(r16.latents).all()
    rel = np.linalg.norm(r16.latents - r32.latents) / np.linalg.norm(r32.latents)
    assert 0 < rel < 2e-2, rel
    for a, b in zip(r16.images, r32.images):
        d = np.abs(_pixels(a) - _pixels(b))
        assert d.mean() < 3 and d.max() <= 24, (d.mean(), d.max())


def test_infotext_fields_of_a_single_file_model_match_a1111(folder, tmp_path):
    """What A1111 writes for a checkpoint file `my-model.safetensors` on a 64x32 image:
    `Size: 64x32` (width first), `Model hash:` the first 10 hex digits of the file's sha256
    (A1111's "new" short hash), `Model: my-model` (the file name without extension)."""
    from sdjax.weights.single_file import convert_diffusers_to_single_file

    path = tmp_path / "my-model.safetensors"
    convert_diffusers_to_single_file(folder, path)
    single = sdjax.load_pipeline(path, config_dir=folder)
    r = single.generate("a red circle", seed=1, steps=2, sampler="euler", width=64, height=32)
    assert r.images[0].size == (64, 32)
    assert "Size: 64x32," in r.infotexts[0]
    p = parse_infotext(r.infotexts[0])
    assert (p["Model"], p.get("Model hash")) == ("my-model", hashlib.sha256(path.read_bytes()).hexdigest()[:10])
