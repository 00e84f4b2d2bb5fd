"""Live previews: A1111's cheap latent->RGB map, previews that compile nothing, the CLI's preview files."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from PIL import Image

from conftest import cli_main
import sdjax
from sdjax.pipeline import preview

EMBEDDED = Path(sdjax.__file__).resolve().parent / "assets" / "tiny"
_COMPILES: list = []


def _on_event(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def test_cheap_approximation_is_a1111s_map():
    latents = np.zeros((1, 1, 2, 4), np.float32)
    latents[0, 0, 0] = [1.0, 0.0, 0.0, 0.0]
    latents[0, 0, 1] = [0.0, 0.0, 0.0, -1.0]
    rgb = preview.cheap_approximation(latents)
    np.testing.assert_allclose(rgb[0, 0, 0], 0.5 + 0.5 * np.array([0.298, 0.207, 0.208]), rtol=1e-6)
    np.testing.assert_allclose(rgb[0, 0, 1], 0.5 + 0.5 * np.array([0.184, 0.271, 0.473]), rtol=1e-6)
    xl = preview.cheap_approximation(latents, preview.family(0.13025))
    np.testing.assert_allclose(xl[0, 0, 0], 0.5 + 0.5 * np.array([0.3448, 0.4168, 0.4395]), rtol=1e-6)
    assert preview.family(0.18215) == "sd"
    assert np.all(preview.cheap_approximation(np.full((1, 1, 1, 4), 50.0, np.float32)) <= 1.0)
    grid = preview.current_image(np.zeros((2, 4, 4, 4), np.float32))
    assert grid.size == (8, 4)  # two 4x4 previews side by side


def test_previews_compile_nothing_and_follow_every(tmp_path, no_persistent_cache):
    pipe = sdjax.load_pipeline(EMBEDDED)
    kw = dict(prompt="a red circle", steps=4, width=64, height=64, seed=3, sampler="Euler a")
    first = pipe.generate(**kw, progress=lambda i: None)  # compiles the progress-staged function
    _COMPILES.clear()
    seen = []
    every2 = preview.Previewer(tmp_path / "p2", 2, on_write=seen.append).start("a", steps=4)
    every3 = preview.Previewer(tmp_path / "p3", 3).start("b", steps=4)
    again = pipe.generate(**{**kw, "seed": 4, "cfg_scale": 5.0}, progress=lambda i: None, preview=every2)
    pipe.generate(**kw, progress=lambda i: None, preview=every3)
    assert _COMPILES == [], f"previews compiled {len(_COMPILES)} XLA programs"
    assert [p.name for p in seen] == ["a-step002.png", "a-step004.png"]
    assert [p.name for p in every3.written] == ["b-step003.png", "b-step004.png"]
    # the last preview is the cheap map of the final x0 prediction: close to the final latents
    final = np.asarray(Image.open(seen[-1]), np.float32) / 255.0
    expected = preview.cheap_approximation(again.latents)[0]
    assert final.shape == (8, 8, 3) and np.abs(final - expected).max() < 0.02
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))


@pytest.mark.slow  # a CLI run in a subprocess
def test_cli_writes_a_taesd_preview_every_n_steps(tmp_path, capsys):
    torch.manual_seed(0)
    tiny = AutoencoderTiny(decoder_block_out_channels=(8, 8, 8, 8), num_decoder_blocks=(1, 1, 1, 1),
                           encoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1))
    tiny.save_pretrained(tmp_path / "taesd")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", "a cat", "--steps", "5", "--width", "64",
                        "--height", "64", "--seed", "9", "--out", str(out), "--preview-every", "2",
                        "--preview-method", "taesd", "--taesd", str(tmp_path / "taesd")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (out / "previews").glob("*.png"))
    assert names == ["9-step002.png", "9-step004.png", "9-step005.png"]
    shown = [line.split("preview: ", 1)[1] for line in r.stderr.splitlines() if line.startswith("preview: ")]
    assert [Path(p).name for p in shown] == names
    assert Image.open(out / "previews" / names[0]).size == (64, 64)  # TAESD: full size
    status, err = cli_main(capsys, "generate", "a cat", "--preview-every", "0", "--out", tmp_path / "bad")
    assert status == 2 and "--preview-every" in err
