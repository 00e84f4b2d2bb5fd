"""The SDXL flags of the `sdjax` command: size conditioning, --refiner / --refiner-switch-at, and
A1111's "Refiner" / "Refiner switch at" infotext read back by --from-png."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import cli_run
from sdjax.cli_sdxl import sdxl_options
from sdjax.errors import UsageError
from sdjax.images import read_infotext
from sdjax_tiny import build_sdxl_pipeline


def test_size_flags_parse_to_diffusers_pairs():
    o = sdxl_options({"original_size": "1024x768", "crops_coords_top_left": "16,32", "target_size": "640 x 512",
                      "aesthetic_score": 7.0})
    assert o == {"original_size": (768, 1024), "crops_coords_top_left": (16, 32), "target_size": (512, 640),
                 "aesthetic_score": 7.0}


@pytest.mark.parametrize("o, words", [
    ({"original_size": "1024"}, "--original-size"),
    ({"crops_coords_top_left": "1x2"}, "--crop-coords"),
    ({"refiner_switch_at": 0.5}, "needs --refiner"),
    ({"png_refiner": "sd_xl_refiner_1.0 [7440042bbd]"}, "pass --refiner"),
])
def test_bad_flags_name_the_problem(o, words):
    with pytest.raises(UsageError, match=words):
        sdxl_options(o)


def _run(env, *args):
    return subprocess.run([sys.executable, "-m", "sdjax.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow  # two CLI runs of a tiny SDXL base + refiner in subprocesses, two errors in-process
def test_refiner_from_png_round_trip(tmp_path, capsys):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    base = build_sdxl_pipeline("sdxl-base", seed=3)
    base.save_pretrained(tmp_path / "base")
    build_sdxl_pipeline("sdxl-refiner", seed=7, vae=base.vae).save_pretrained(tmp_path / "refiner")
    out = tmp_path / "a.png"
    r = _run(env, "generate", "a red circle", "--model", tmp_path / "base", "--refiner", tmp_path / "refiner",
             "--refiner-switch-at", "0.5", "--steps", "4", "--sampler", "Euler", "--width", "64", "--height", "48",
             "--seed", "5", "--original-size", "96x64", "--out", out)
    assert r.returncode == 0, r.stderr
    info = read_infotext(out)
    assert "Refiner: refiner [" in info and "Refiner switch at: 0.5" in info
    # Errors: sdjax.cli.main in this process.
    r = cli_run(capsys, "generate", "--from-png", out, "--model", tmp_path / "base", "--out", tmp_path / "b.png")
    assert r.returncode == 2 and "pass --refiner" in r.stderr
    # A real process again: images are compared bit for bit, and this process (8 simulated devices,
    # strict promotion) may round differently.
    r = _run(env, "generate", "--from-png", out, "--model", tmp_path / "base", "--refiner", tmp_path / "refiner",
             "--original-size", "96x64", "--out", tmp_path / "c.png")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "c.png")))
    r = cli_run(capsys, "generate", "x", "--model", tmp_path / "base", "--crop-coords", "-1,0",
                "--out", tmp_path / "d.png")
    assert r.returncode == 2 and "--crop-coords" in r.stderr
