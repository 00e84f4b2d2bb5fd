"""Images of every mode Pillow opens become correct 8-bit RGB; PNG writes follow the umask and
never replace a file when exclusive; manifest appends are locked and deduplicated; control
characters are escaped for the terminal (issue #21)."""

import json
import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image

from sdjax.images import append_jsonl, escape_control, load_image, load_mask, read_jsonl, save_png, to_rgb
from sdjax.pipeline.inpaint import to_pil_mask, to_pil_rgb


def test_16bit_grey_png_keeps_its_grey_level(tmp_path):
    level = 20000  # 16-bit; 8-bit equivalent 77.8
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((16, 16), level, np.uint16)).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    rgb = np.asarray(to_pil_rgb(path), np.float64)
    assert rgb.shape == (16, 16, 3)
    assert np.abs(rgb - level / 65535 * 255).max() <= 1.0  # within 1/255
    pixels = (load_image(path)[0] + 1) / 2 * 255
    assert np.abs(pixels - level / 65535 * 255).max() <= 1.0
    mask = np.asarray(to_pil_mask(path), np.float64)
    assert np.abs(mask - level / 65535 * 255).max() <= 1.0
    assert np.abs(load_mask(path) * 255 - level / 65535 * 255).max() <= 1.0


def test_32bit_integer_and_float_grey():
    i32 = Image.fromarray(np.full((4, 4), 65535, np.int32), "I")
    assert np.asarray(to_rgb(i32)).min() == 255
    f = Image.fromarray(np.full((4, 4), 100.4, np.float32), "F")
    assert np.asarray(to_rgb(f)).max() == 100


def test_palette_cmyk_and_alpha_policy():
    pal = Image.new("P", (4, 4))
    pal.putpalette([10, 20, 30] + [0] * 765)
    assert np.asarray(to_rgb(pal))[0, 0].tolist() == [10, 20, 30]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # transparent black -> white (A1111)
    assert np.asarray(to_rgb(clear))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("LA", (4, 4), (0, 128))
    assert abs(int(np.asarray(to_rgb(half))[0, 0, 0]) - 127) <= 1
    keyed = Image.new("P", (4, 4), 0)
    keyed.putpalette([0, 0, 0] * 256)
    keyed.info["transparency"] = 0
    assert np.asarray(to_pil_rgb(keyed))[0, 0].tolist() == [255, 255, 255]


def test_png_mode_follows_umask_and_exclusive_never_replaces(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png", "first")
        assert path.stat().st_mode & 0o777 == 0o644
        with pytest.raises(FileExistsError):
            save_png(Image.new("RGB", (4, 4), "white"), path, "second", exclusive=True)
        assert Image.open(path).info["parameters"] == "first"
        assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left
    finally:
        os.umask(old)


def _append_many(args):
    path, writer = args
    for i in range(50):
        append_jsonl(path, {"file": f"{i}.png", "writer": writer, "pad": "x" * 2000}, unique_key="file")


def test_concurrent_unique_appends_one_record_per_file(tmp_path):
    path = tmp_path / "manifest.jsonl"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_append_many, [(str(path), w) for w in range(4)])
    records = read_jsonl(path)
    assert sorted(r["file"] for r in records) == sorted(f"{i}.png" for i in range(50))
    for line in path.read_text().splitlines():
        json.loads(line)  # no interleaved lines


def test_escape_control():
    text = "a red circle\x1b[2J\x1b]0;pwned\x07\nNegative prompt: x\tY\r\x9b"
    out = escape_control(text)
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\x9b" not in out
    assert "\\x1b[2J" in out and out.count("\n") == 1 and "\t" in out
