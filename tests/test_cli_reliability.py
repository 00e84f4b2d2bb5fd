"""Nothing lost, nothing silent (issue #21): the `sdjax` command on the embedded model (real
processes where the process matters: concurrent runs, SIGINT; elsewhere `sdjax.cli.main` in the
test's process).

Concurrent same-seed runs into one folder, reruns with a changed request, --out onto an
existing file, bad numbers, SIGINT during a batch and its resume, escaped `sdjax info`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from conftest import cli_main, cli_run
from sdjax.images import read_infotext, read_jsonl

ARGS = ["--steps", "2", "--sampler", "Euler", "--no-progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # the run's one persistent compilation cache (SDJAX_CACHE_DIR, tests/conftest.py)
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _cmd(*args):
    return [sys.executable, "-m", "sdjax.cli", *map(str, args)]


def sdjax(env, *args, timeout=300):
    return subprocess.run(_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def _records(out: Path) -> list[dict]:
    return read_jsonl(out / "manifest.jsonl")


def test_concurrent_same_seed_runs_lose_nothing(env, tmp_path):
    out = tmp_path / "d"
    runs = [("a red circle on a blue background", "red"), ("a green square on a white background", "green"),
            ("a green square on a white background", "green")]  # the last two: identical requests
    procs = [subprocess.Popen(_cmd("generate", prompt, "--seed", 42, "--batch-count", 3, "--out", out, *ARGS),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for prompt, _ in runs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    pngs = sorted(out.glob("*.png"))
    prompts = [read_infotext(p).split("\n")[0] for p in pngs]
    assert sorted(prompts) == sorted([runs[0][0]] * 3 + [runs[1][0]] * 3)  # 6 distinct images, none lost
    records = _records(out)
    assert sorted(r["file"] for r in records) == [p.name for p in pngs]  # one record per file
    assert not [p for p in out.iterdir() if p.suffix == ".tmp" or p.name.startswith(".")]


def test_rerun_with_changed_request_makes_a_new_image(tmp_path, capsys):
    # sdjax.cli.main in this process: reruns and refusals are decided by the files, not the process.
    out = tmp_path / "d"
    r = cli_run(capsys, "generate", "a red circle on a blue background", "--seed", 5, "--out", out, *ARGS)
    assert r.returncode == 0, r.stderr
    first = sorted(out.glob("*.png"))
    r = cli_run(capsys, "generate", "a red circle on a blue background", "--seed", 5, "--out", out, *ARGS)
    assert r.returncode == 0 and sorted(out.glob("*.png")) == first  # identical request: reused
    r = cli_run(capsys, "generate", "a totally different prompt", "--seed", 5, "--cfg-scale", 2, "--out", out, *ARGS)
    assert r.returncode == 0, r.stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    new = [p for p in pngs if p not in first][0]
    assert read_infotext(new).startswith("a totally different prompt\n") and "CFG scale: 2" in read_infotext(new)
    assert read_infotext(first[0]).startswith("a red circle")
    assert r.stdout.split() == [str(new)]


def test_out_file_is_not_replaced_without_overwrite(tmp_path, capsys):
    # sdjax.cli.main in this process: reruns and refusals are decided by the files, not the process.
    target = tmp_path / "keep.png"
    target.write_bytes(b"precious")
    r = cli_run(capsys, "generate", "a red circle", "--out", target, *ARGS)
    assert r.returncode == 2 and "--overwrite" in r.stderr and target.read_bytes() == b"precious"
    r = cli_run(capsys, "generate", "a red circle", "--out", target, "--overwrite", *ARGS)
    assert r.returncode == 0, r.stderr
    assert read_infotext(target).startswith("a red circle")
    r = cli_run(capsys, "generate", "a red circle", "--out", tmp_path / "result.jpg", *ARGS)
    assert r.returncode == 2 and "result.png" in r.stderr and not (tmp_path / "result.jpg").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--cfg-scale", "nan"], "cfg_scale must be a finite"),
    (["--cfg-scale", "inf"], "cfg_scale must be a finite"),
    (["--seed", "4294967297"], "seed"),
    (["--seed", "100000000000000000000000"], "seed"),
    (["--steps", "100000"], "--max-steps"),
    (["--width", "100000", "--height", "100000"], "--max-pixels"),
    (["--steps", "1001", "--max-steps", "1000"], "--max-steps"),
    (["--lora", "f.safetensors:abc"], "multiplier 'abc' is not a number"),
    (["--prompts-file", "{zero}"], "line 1: batch_size must be"),
    (["--from-png", "{huge}"], "--max-steps"),
])
def test_bad_numbers_exit_2(tmp_path, capsys, flags, needle):
    """Through `sdjax.cli.main`, which the script exits with, in this process (a Python and JAX
    start per case saved; test_out_file_is_not_replaced_without_overwrite runs the script's exit 2)."""
    zero = tmp_path / "p.jsonl"
    zero.write_text(json.dumps({"prompt": "x", "batch_size": 0}) + "\n")
    huge = tmp_path / "huge.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x\nSteps: 1000000000, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64")
    Image.new("RGB", (8, 8)).save(huge, pnginfo=info)
    flags = [f.format(zero=zero, huge=huge) for f in flags]
    prompt = [] if any(f in flags for f in ("--prompts-file", "--from-png")) else ["x"]
    out = tmp_path / "out"
    base = ["--no-progress"] if "--from-png" in flags else ARGS  # --steps would override the PNG's
    status, err = cli_main(capsys, "generate", *prompt, "--out", out, *base, *flags)
    assert status == 2, (status, err)
    assert needle in err and err.startswith("sdjax: error:") and err.count("\n") == 1, err
    assert not out.exists()


def test_info_escapes_control_characters(env, tmp_path):
    path = tmp_path / "evil.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\x1b[2J\x1b]0;owned\x07\nSteps: 20")
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    r = sdjax(env, "info", path)
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert r.stdout == "a cat\\x1b[2J\\x1b]0;owned\\x07\nSteps: 20\n"


def test_sigint_stops_a_batch_within_5s_then_rerun_completes(env, tmp_path):
    out = tmp_path / "run"
    cmd = _cmd("generate", "a red circle on a blue background", "--seed", 7, "--batch-count", 40, "--out", out,
               *ARGS)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("*.png"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.time() - sent < 5, f"took {time.time() - sent:.1f}s to stop"
    assert proc.returncode == 130, err
    made = list(out.glob("*.png"))
    assert 0 < len(made) < 40, "finished before it could be interrupted"
    assert not [p for p in out.iterdir() if p.suffix == ".tmp" or p.name.startswith(".")]
    assert sorted(r["file"] for r in _records(out)) == sorted(p.name for p in made)  # no image without record
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 40 and sorted(r["file"] for r in _records(out)) == pngs
    for name in pngs:
        assert np.asarray(Image.open(out / name)).shape == (64, 64, 3)
