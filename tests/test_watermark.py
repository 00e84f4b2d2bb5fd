"""Provenance: the invisible watermark (ours and the invisible-watermark package read each other's),
the XMP digital source type in written PNGs, and `sdjax info` reporting both."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import cli_run
from sdjax import watermark
from sdjax.images import read_infotext, read_xmp, save_png
from sdjax.metadata import TRAINED_ALGORITHMIC_MEDIA, provenance_xmp, xmp_source_type

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import bench_watermark  # noqa: E402

HAS_PACKAGE = importlib.util.find_spec("imwatermark") is not None and importlib.util.find_spec("pywt") is not None


def test_mark_is_read_back_and_survives_png_but_not_jpeg_or_resize(tmp_path):
    rgb = bench_watermark.scene(3, 384)
    marked = watermark.embed_bits(rgb)
    assert np.abs(marked.astype(int) - rgb).mean() < 1.0  # invisible: under one level on average
    assert watermark.detect(marked) == (True, 48)
    assert not watermark.detect(rgb)[0]
    path = save_png(Image.fromarray(marked), tmp_path / "m.png", "a cat\nSteps: 1, Seed: 1, Size: 384x384",
                    xmp=provenance_xmp())
    assert watermark.detect(Image.open(path)) == (True, 48)
    assert xmp_source_type(read_xmp(path)) == TRAINED_ALGORITHMIC_MEDIA
    assert read_infotext(path).startswith("a cat")
    # As bench_results/watermark_2026-12-01.md reports: JPEG q90 and a 0.5x resize lose it.
    assert not watermark.detect(bench_watermark.jpeg(marked))[0]
    assert not watermark.detect(bench_watermark.half(marked))[0]
    small = np.full((128, 128, 3), 100, np.uint8)
    assert np.array_equal(watermark.embed_bits(small), small) and watermark.detect(small) == (False, 0)


@pytest.mark.skipif(not HAS_PACKAGE, reason="invisible-watermark not installed (pip install --no-deps "
                    "invisible-watermark PyWavelets: its own requirements pull torch and GUI opencv)")
def test_package_reads_our_mark_and_we_read_its_mark():
    import cv2
    from imwatermark import WatermarkDecoder

    rgb = np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    bits = WatermarkDecoder("bits", 48).decode(cv2.cvtColor(watermark.embed_bits(rgb), cv2.COLOR_RGB2BGR), "dwtDct")
    assert list(map(int, bits)) == list(watermark.WATERMARK_BITS)
    theirs = bench_watermark.package_encoder()(rgb)
    assert watermark.detect(theirs)[0]


def test_bench_script_writes_its_table(tmp_path, monkeypatch):
    out = tmp_path / "w.md"
    monkeypatch.setattr(sys, "argv", ["bench_watermark.py", "--images", "1", "--out", str(out)])
    monkeypatch.setattr(bench_watermark, "package_encoder", lambda: None)
    monkeypatch.setattr(bench_watermark, "timing", lambda encode, size: 1.0)
    bench_watermark.main()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| sdjax |")]
    assert len(rows) == 2 and all("1/1 detected, 48.0 bits" in r.split("|")[5] for r in rows)


@pytest.mark.slow  # two 256 px CLI runs in subprocesses (`info` in-process)
def test_cli_marks_by_default_writes_xmp_and_info_prints_both(tmp_path, capsys):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SDJAX_CACHE_DIR": str(tmp_path / "cache")}
    base = ["generate", "a cat", "--steps", "1", "--width", "256", "--height", "256", "--seed", "5"]

    def run(*args):
        return subprocess.run([sys.executable, "-m", "sdjax.cli", *base, *args], env=env, capture_output=True,
                              text=True, timeout=300)

    r = run("--out", str(tmp_path / "on.png"))
    assert r.returncode == 0, r.stderr
    r2 = run("--out", str(tmp_path / "off.png"), "--no-watermark")  # a process too: the images are compared
    assert r2.returncode == 0, r2.stderr
    on, off = Image.open(tmp_path / "on.png"), Image.open(tmp_path / "off.png")
    assert watermark.detect(on) == (True, 48) and not watermark.detect(off)[0]
    assert np.abs(np.asarray(on, np.int16) - np.asarray(off, np.int16)).max() > 0
    for name in ("on.png", "off.png"):
        assert xmp_source_type(read_xmp(tmp_path / name)) == TRAINED_ALGORITHMIC_MEDIA
    info = cli_run(capsys, "info", tmp_path / "on.png")
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    assert lines[0] == "a cat" and "Seed: 5" in info.stdout
    assert lines[-2].startswith("Watermark: found (48/48")
    assert lines[-1] == f"Digital source type: {TRAINED_ALGORITHMIC_MEDIA}"
