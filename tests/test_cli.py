"""The real `sdjax` command in subprocesses: outputs, exit codes, --from-png, resumable runs (the
input errors but one, and `sdjax info`, through `sdjax.cli.main` in the test's process)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli_main, cli_run
from sdjax.images import read_infotext, read_jsonl
from sdjax.metadata import TRAINED_ALGORITHMIC_MEDIA
from sdjax_tiny import write_tiny_folder

ARGS = ["--steps", "2", "--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # the run's one persistent compilation cache (SDJAX_CACHE_DIR, tests/conftest.py)
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("m") / "tiny")


def sdjax(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sdjax.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_generate_from_png_and_info(env, model, tmp_path, capsys):
    out = tmp_path / "a.png"
    r = sdjax(env, "generate", "a red circle on a blue background", "--model", model, *ARGS, "--seed", 11,
              "--negative-prompt", "green, blurry", "--out", out)
    assert r.returncode == 0, r.stderr
    info = read_infotext(out)
    assert info.startswith("a red circle on a blue background\nNegative prompt: green, blurry\n")
    assert "Seed: 11" in info and "Size: 64x64" in info
    # the parameters as stored, then the provenance (64 px: no watermark); sdjax.cli.main in-process
    r = cli_run(capsys, "info", out)
    assert r.returncode == 0 and r.stdout == info + "\nDigital source type: " + TRAINED_ALGORITHMIC_MEDIA + "\n"
    again = tmp_path / "b.png"
    r = sdjax(env, "generate", "--from-png", out, "--model", model, "--out", again)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert read_infotext(again) == info


def test_console_script_and_img2img(env, model, tmp_path):
    exe = shutil.which("sdjax", path=str(Path(sys.executable).parent))
    assert exe, "the sdjax console script is not installed"
    src = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "i2i"
    r = subprocess.run([exe, "img2img", "--image", src, "--prompt", "x", "--model", model, "--steps", "2",
                        "--strength", "0.5", "--out", out, "--batch-size", "2"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.png"))
    assert len(files) == 2 and all("Denoising strength: 0.5" in read_infotext(f) for f in files)


# The first case runs the real `python -m sdjax.cli` (its exit status and stderr as a user sees
# them); the others call `sdjax.cli.main`, which that script exits with, in the test's process.
@pytest.mark.parametrize("args,needle", [
    (["generate", "x", "--width", "60"], "multiple of 8"),
    (["generate", "x", "--sampler", "nope"], "unknown sampler"),
    (["img2img", "x", "--image", "{src}", "--strength", "1.5"], "strength"),
    (["img2img", "x", "--image", "{src}", "--strength", "0"], "strength"),
    (["inpaint", "x", "--image", "{src}", "--mask", "{small}"], "same size"),
    (["generate", "x", "--model", "{missing}"], "does not exist"),
    (["generate", "x", "--model", "{bad}"], "model_index"),
    (["generate", "x", "--out", "{ro}/sub"], "output folder"),
])
def test_errors_exit_2_without_files(env, model, tmp_path, capsys, args, needle):
    src, small = tmp_path / "src.png", tmp_path / "small.png"
    Image.new("RGB", (64, 64)).save(src)
    Image.new("L", (32, 32)).save(small)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text("{not json")
    ro = tmp_path / "ro"  # a file where a folder is needed: unwritable even for root
    ro.write_text("x")
    out = tmp_path / "out"
    fmt = dict(src=src, small=small, missing=tmp_path / "missing", bad=bad, ro=ro)
    args = [a.format(**fmt) for a in args]
    if "--model" not in args:
        args += ["--model", str(model)]
    if "--out" not in args:
        args += ["--out", str(out)]
    args = [args[0], *ARGS, *args[1:]]  # the case's flags come last and win
    if needle == "multiple of 8":
        r = sdjax(env, *args)
        status, err = r.returncode, r.stderr
    else:
        status, err = cli_main(capsys, *args)
    assert status == 2, (status, err)
    assert needle in err and err.startswith("sdjax: error:")
    assert not out.exists() and ro.read_text() == "x"


def test_prompts_file_killed_then_resumed(env, model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    lines = ["a red circle", json.dumps({"prompt": "a blue square", "seed": 100, "cfg_scale": 5}),
             "a green triangle", "a yellow star"]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sdjax.cli", "generate", "--prompts-file", str(prompts), "--model", str(model),
           "--seed", "1", "--batch-count", "2", "--out", str(out), *ARGS]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("*.png"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(out.glob("*.png"))) < 8, "finished before it could be interrupted"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 8 and not [p for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    for p in out.glob("*.png"):
        Image.open(p).load()  # not truncated
        assert read_infotext(p)
    records = read_jsonl(out / "manifest.jsonl")
    assert sorted(r["file"] for r in records) == pngs  # every image exactly once
    assert {p.split("-")[1] for p in pngs} >= {"100", "101"}  # the JSONL line's own seed (NNNNN-SEED-KEY.png)
