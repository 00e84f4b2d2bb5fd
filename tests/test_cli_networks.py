"""The `sdjax` CLI's network flags: --lora-dir / --lora, --embeddings-dir, ControlNet flags with
--save-control-image, and `sdjax convert` round trips (single file <-> diffusers folder). The
commands run through `sdjax.cli.main` (what the script exits with) in the test's process, but
the --lora-nonstrict run (its warning is read from a real `python -m sdjax.cli` process's
stderr) and the plain run its image is compared with."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

from sdjax.images import read_infotext
from sdjax.metadata import parse_hashes, parse_infotext
from conftest import cli_main, cli_run
from sdjax_tiny import write_tiny_folder

ARGS = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--sampler", "Euler"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # the run's one persistent compilation cache (SDJAX_CACHE_DIR, tests/conftest.py)
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("m") / "tiny", seed=2)


def sdjax(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sdjax.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _lora(path):
    rng = np.random.default_rng(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": rng.standard_normal((4, 32)).astype(np.float32),
               f"{key}.lora_up.weight": rng.standard_normal((32, 4)).astype(np.float32),
               f"{key}.alpha": np.array(4.0, np.float32)}, str(path))


def test_lora_dir_and_embeddings_dir(model, tmp_path, capsys):
    (tmp_path / "loras").mkdir()
    _lora(tmp_path / "loras" / "style.safetensors")
    (tmp_path / "emb").mkdir()
    save_file({"emb_params": np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32)},
              str(tmp_path / "emb" / "shinytok.safetensors"))
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    r = cli_run(capsys, "generate", "a shinytok cat <lora:style:0.7>", "--model", model,
                "--lora-dir", tmp_path / "loras", "--embeddings-dir", tmp_path / "emb", "--out", a, *ARGS)
    assert r.returncode == 0, r.stderr
    info = parse_infotext(read_infotext(a))
    data = (tmp_path / "loras" / "style.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert parse_hashes(info["Lora hashes"]) == {"style": hashlib.sha256(data[8 + n:]).hexdigest()[:12]}
    assert set(parse_hashes(info["TI hashes"])) == {"shinytok"}
    r = cli_run(capsys, "generate", "a shinytok cat", "--model", model,
                "--lora", f"{tmp_path / 'loras' / 'style.safetensors'}:0.7",
                "--embedding", tmp_path / "emb" / "shinytok.safetensors", "--out", b, *ARGS)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))  # explicit file == tag
    r = cli_run(capsys, "generate", "a shinytok cat", "--model", model, "--out", c, *ARGS)
    assert r.returncode == 0, r.stderr
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(c)))
    # a tag that resolves to nothing: exit 2, one line, no file
    status, err = cli_main(capsys, "generate", "x <lora:nope:1>", "--model", model, "--lora-dir", tmp_path / "loras",
                            "--out", tmp_path / "d.png", *ARGS)
    assert status == 2 and "nope" in err and not (tmp_path / "d.png").exists()


def test_controlnet_flags_and_saved_control_image(model, tmp_path, capsys):
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(model / "unet")
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    cn.save_pretrained(tmp_path / "cn")
    img = np.zeros((48, 48, 3), np.uint8)
    img[10:30, 12:40] = 255
    Image.fromarray(img).save(tmp_path / "edges.png")
    out = tmp_path / "out.png"
    r = cli_run(capsys, "generate", "a box", "--model", model, "--controlnet", tmp_path / "cn", "--control-image",
                tmp_path / "edges.png", "--control-preprocessor", "canny", "--control-scale", "0.8", "--control-end",
                "0.5", "--save-control-image", tmp_path / "hints", "--out", out, *ARGS)
    assert r.returncode == 0, r.stderr
    hint = np.asarray(Image.open(tmp_path / "hints" / "control-0.png"))
    assert hint.shape == (64, 64, 3) and set(np.unique(hint)) <= {0, 255} and hint.max() == 255
    unit = parse_infotext(read_infotext(out))["ControlNet 0"]
    assert unit.startswith("Module: canny, Model: cn [") and "Weight: 0.8" in unit and "Guidance End: 0.5" in unit
    status, err = cli_main(capsys, "generate", "a box", "--model", model, "--controlnet", tmp_path / "cn",
                            "--out", out, *ARGS)
    assert status == 2 and "--control-image" in err


def test_convert_round_trip(model, tmp_path, capsys):
    one = tmp_path / "one.safetensors"
    r = cli_run(capsys, "convert", model, one)
    assert r.returncode == 0, r.stderr
    r = cli_run(capsys, "convert", one, tmp_path / "folder", "--config-dir", model)
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two.safetensors"
    assert cli_run(capsys, "convert", tmp_path / "folder", two).returncode == 0
    a, b = load_file(str(one)), load_file(str(two))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    r = cli_run(capsys, "convert", one, tmp_path / "half", "--dtype", "float16", "--config-dir", model)
    assert r.returncode == 0, r.stderr
    half = load_file(str(next((tmp_path / "half" / "unet").glob("*.safetensors"))))
    assert all(v.dtype == np.float16 for v in half.values())
    status, err = cli_main(capsys, "convert", tmp_path / "missing.safetensors", tmp_path / "x")
    assert status == 2 and "does not exist" in err


def test_lora_nonstrict_skips_tensors_that_are_not_lora(env, model, tmp_path, capsys):
    lora = tmp_path / "mixed.safetensors"
    rng = np.random.default_rng(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": rng.standard_normal((4, 32)).astype(np.float32),
               f"{key}.lora_up.weight": rng.standard_normal((32, 4)).astype(np.float32),
               "model.diffusion_model.out.2.weight": np.zeros((4, 4), np.float32)}, str(lora))
    strict = cli_run(capsys, "generate", "a cat", "--model", model, "--lora", f"{lora}:0.7", *ARGS,
                     "--out", tmp_path / "strict.png")
    assert strict.returncode == 2 and "model.diffusion_model.out.2.weight" in strict.stderr, strict.stderr
    # The real script: its warning on stderr is what a user sees (in-process, pytest captures warnings).
    loose = sdjax(env, "generate", "a cat", "--model", model, "--lora", f"{lora}:0.7", "--lora-nonstrict", *ARGS,
                  "--out", tmp_path / "loose.png")
    assert loose.returncode == 0, loose.stderr
    assert "model.diffusion_model.out.2.weight" in loose.stderr  # named in the warning
    # A process too: its image is compared with the one above.
    plain = sdjax(env, "generate", "a cat", "--model", model, *ARGS, "--out", tmp_path / "plain.png")
    assert plain.returncode == 0
    # The LoRA tensors that are LoRA still apply.
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "loose.png")),
                              np.asarray(Image.open(tmp_path / "plain.png")))


def test_lora_multiplier_must_be_a_number(env, model, tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    _lora(lora)
    status, err = cli_main(capsys, "generate", "a cat", "--model", model, "--lora", f"{lora}:abc", *ARGS,
                            "--out", tmp_path / "x.png")
    assert status == 2 and "abc" in err and "does not exist" not in err, err
