"""Hires fix (A1111 txt2img "Hires. fix") on the tiny random model: both passes seen by the step
recorder, A1111's target sizes, its latent upscalers equal torch's interpolate, the infotext keys
read back, and `--from-png` regenerates the same image."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli_main, cli_run
import sdjax
from sdjax.images import read_infotext
from sdjax.metadata import parse_infotext
from sdjax.pipeline import HiresFix, core
from sdjax.pipeline.hires import LATENT_UPSCALERS, target_size, upscale_latents
from sdjax_tiny import write_tiny_folder

KW = dict(steps=3, width=32, height=32, sampler="euler", schedule="karras", seed=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("hr") / "tiny")


@pytest.mark.parametrize("name", list(LATENT_UPSCALERS))
@pytest.mark.parametrize("size", [(10, 14), (3, 5), (7, 4)])
def test_latent_upscalers_equal_torch_interpolate(name, size):
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 4)).astype(np.float32)
    mode, antialias = LATENT_UPSCALERS[name]
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode=mode,
                                          antialias=antialias).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(upscale_latents(x, *size, name), ref, atol=2e-5)


def test_target_size_as_a1111():
    assert target_size(512, 768, HiresFix(scale=1.5)) == (768, 1152, 0, 0)
    assert target_size(512, 768, HiresFix(resize_x=1024)) == (1024, 1536, 0, 0)
    assert target_size(512, 768, HiresFix(resize_y=1024)) == (682, 1024, 0, 0)
    # both given: cover the box, then crop (1536 - 1024) / 8 = 64 latent rows
    assert target_size(512, 768, HiresFix(resize_x=1024, resize_y=1024)) == (1024, 1536, 0, 64)


def test_two_passes_and_infotext(model):
    pipe = sdjax.load_pipeline(model)
    steps = []
    with core.record_steps(lambda i, shape: steps.append((i, shape))):
        out = pipe.generate("[red:blue:0.5] cube", hires=HiresFix(scale=2, steps=6, denoising_strength=0.5),
                            progress=lambda i: None, **KW)
    first = [(i, (1, 4, 4, 4)) for i in range(3)]  # 32 px, 3 steps
    # 64 px; img2img at 0.5 of 6 steps runs int(0.5 * 6) + 1 = 4 steps (A1111's t_enc + 1)
    second = [(i, (1, 8, 8, 4)) for i in range(4)]
    assert steps == first + second
    assert out.images[0].size == (64, 64) and out.latents.shape == (1, 8, 8, 4)
    p = parse_infotext(out.infotexts[0])
    assert (p["Size-1"], p["Size-2"], p["Steps"]) == ("32", "32", "3")  # A1111 writes the first pass
    assert (p["Hires upscale"], p["Hires steps"], p["Hires upscaler"], p["Denoising strength"]) == (
        "2", "6", "Latent", "0.5")
    # The same request without hires is the first pass only: a different, smaller image.
    assert pipe.generate("[red:blue:0.5] cube", **KW).images[0].size == (32, 32)


@pytest.mark.slow
def test_cli_hires_from_png_equality(model, tmp_path, capsys):
    # sdjax.cli.main in this process (the second run reuses the first one's compiled programs).
    def sdjax_cli(*args):
        r = cli_run(capsys, *args)
        assert r.returncode == 0, r.stderr
        return r

    out, again = tmp_path / "a.png", tmp_path / "b.png"
    sdjax_cli("generate", "a [red:blue:2] cube", "--model", model, "--steps", "3", "--width", "32", "--height", "32",
              "--sampler", "Euler", "--seed", "4", "--hr-resize-x", "64", "--hr-resize-y", "48", "--hr-steps", "4",
              "--hr-upscaler", "Lanczos", "--hr-denoise", "0.6", "--hr-sampler", "Euler a", "--out", out)
    info = read_infotext(out)
    p = parse_infotext(info)
    assert (p["Hires resize-1"], p["Hires resize-2"], p["Hires steps"], p["Hires upscaler"]) == ("64", "48", "4",
                                                                                                 "Lanczos")
    assert (p["Hires sampler"], p["Denoising strength"], p["Size-1"]) == ("Euler a", "0.6", "32")
    assert Image.open(out).size == (64, 48)
    sdjax_cli("generate", "--from-png", out, "--model", model, "--out", again)
    assert read_infotext(again) == info
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    status, err = cli_main(capsys, "generate", "x", "--model", model, "--hr-upscaler", "Bogus",
                           "--out", tmp_path / "c.png")
    assert status == 2 and "unknown hires upscaler 'Bogus'" in err
