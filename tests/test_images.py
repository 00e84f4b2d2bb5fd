"""PNG infotext, atomic writes, JSON lines, grids and pixel conversions."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdjax import images
from sdjax.errors import SdjaxError
from sdjax.images import (
    ImageError,
    append_jsonl,
    atomic_write_text,
    load_image,
    load_mask,
    make_grid,
    read_infotext,
    read_jsonl,
    remove_stale_temp_files,
    save_png,
    to_pil,
)
from sdjax.metadata import format_infotext, parse_infotext


def _png_text_chunks(path):
    """(chunk type, keyword, text) of every tEXt/iTXt chunk, read straight from the PNG bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, found = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        if kind == b"tEXt":
            key, text = body.split(b"\0", 1)
            found.append(("tEXt", key.decode("latin-1"), text.decode("latin-1")))
        elif kind == b"iTXt":
            key, rest = body.split(b"\0", 1)
            compressed, _method, rest = rest[0], rest[1], rest[2:]
            _lang, _tkey, text = rest.split(b"\0", 2)
            text = zlib.decompress(text) if compressed else text
            found.append(("iTXt", key.decode("latin-1"), text.decode("utf-8")))
        pos += 12 + length
    return found


def _image(seed=0, size=(12, 8)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def test_save_png_writes_parameters_chunk_and_reads_back(tmp_path):
    info = format_infotext("a cat, (red:1.2)\nline two", "blurry", {"Steps": 20, "Sampler": "Euler a", "Seed": 1, "Size": (12, 8)})
    image = _image()
    out = save_png(image, tmp_path / "sub" / "00001-1.png", info)
    assert out == tmp_path / "sub" / "00001-1.png"
    assert _png_text_chunks(out) == [("tEXt", "parameters", info)]
    assert read_infotext(out) == info
    assert parse_infotext(read_infotext(out))["Prompt"] == "a cat, (red:1.2)\nline two"
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(image))
    assert sorted(p.name for p in out.parent.iterdir()) == ["00001-1.png"]  # no temp files left


def test_non_latin1_infotext_goes_to_itxt(tmp_path):
    info = "日本の猫 😀\nSteps: 1, Sampler: Euler, Seed: 2"
    out = save_png(_image(), tmp_path / "u.png", info)
    assert _png_text_chunks(out) == [("iTXt", "parameters", info)]
    assert read_infotext(out) == info


def test_read_infotext_none_and_errors(tmp_path):
    plain = save_png(_image(), tmp_path / "plain.png")
    assert read_infotext(plain) is None
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="bad.png"):
        read_infotext(bad)
    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(plain.read_bytes()[:60])
    with pytest.raises(SdjaxError, match="trunc.png"):
        load_mask(truncated)


def test_failed_png_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(ImageError, match="out.png"):
        save_png(Image.new("CMYK", (4, 4)), target, "x")  # PNG cannot store CMYK
    assert list(tmp_path.iterdir()) == []
    # An existing file survives a failed overwrite untouched.
    save_png(_image(1), target, "old")
    before = target.read_bytes()
    with pytest.raises(ImageError):
        save_png(Image.new("CMYK", (4, 4)), target, "new")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_atomic_write_text(tmp_path):
    target = tmp_path / "a" / "info.txt"
    atomic_write_text(target, "héllo\nwörld")
    assert target.read_text(encoding="utf-8") == "héllo\nwörld"
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "x" * 10 + "\ud800")  # lone surrogate fails mid-write
    assert target.read_text(encoding="utf-8") == "héllo\nwörld"
    assert [p.name for p in target.parent.iterdir()] == ["info.txt"]


def test_jsonl_append_and_crash_tolerance(tmp_path):
    path = tmp_path / "log" / "runs.jsonl"
    assert read_jsonl(path) == []
    records = [{"seed": i, "prompt": f"p, \"{i}\"\nx", "ok": True} for i in range(3)]
    for r in records:
        append_jsonl(path, r)
    assert read_jsonl(path) == records
    # A crash mid-append leaves a cut line: it is ignored by the reader...
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"seed": 3, "pro')
    assert read_jsonl(path) == records
    # ...and removed by the next append, so the file stays valid line by line.
    append_jsonl(path, {"seed": 4})
    assert read_jsonl(path) == records + [{"seed": 4}]
    assert path.read_bytes() == whole + b'{"seed": 4}\n'
    # A file that is one cut line only.
    lone = tmp_path / "lone.jsonl"
    lone.write_bytes(b'{"a": ')
    assert read_jsonl(lone) == []
    append_jsonl(lone, [1, 2])
    assert lone.read_bytes() == b"[1, 2]\n"
    # Corruption in the middle is an error naming the file and line.
    path.write_bytes(b'{"a": 1}\n{broken\n{"b": 2}\n')
    with pytest.raises(ImageError, match=r"runs.jsonl.*line 2"):
        read_jsonl(path)


@pytest.mark.parametrize("n,cols,grid_cols,grid_rows", [(1, None, 1, 1), (2, None, 2, 1), (3, None, 2, 2), (4, None, 2, 2), (5, None, 3, 2), (6, None, 3, 2), (8, None, 3, 3), (9, None, 3, 3), (10, None, 4, 3), (5, 5, 5, 1), (5, 1, 1, 5), (3, 10, 3, 1)])
def test_make_grid_layout(n, cols, grid_cols, grid_rows):
    images = [_image(i, size=(6, 4)) for i in range(n)]
    grid = make_grid(images, cols=cols)
    assert grid.mode == "RGB" and grid.size == (grid_cols * 6, grid_rows * 4)
    pixels = np.asarray(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, grid_cols)
        np.testing.assert_array_equal(pixels[r * 4 : r * 4 + 4, c * 6 : c * 6 + 6], np.asarray(image))
    empty_cells = grid_cols * grid_rows - n
    if empty_cells:
        assert (pixels[-4:, -6:] == 0).all()  # black, as A1111


def test_make_grid_rejects_mixed_sizes():
    with pytest.raises(ValueError, match="image 1"):
        make_grid([_image(0, (4, 4)), _image(1, (5, 4))])
    with pytest.raises(ValueError):
        make_grid([])


def test_to_pil_rounds_like_diffusers():
    x = np.linspace(-1.2, 1.2, 2 * 5 * 7 * 3, dtype=np.float32).reshape(2, 5, 7, 3)
    got = to_pil(x)
    assert len(got) == 2 and got[0].size == (7, 5) and got[0].mode == "RGB"
    # diffusers: VaeImageProcessor.denormalize, then numpy_to_pil.
    import torch
    from diffusers.image_processor import VaeImageProcessor

    want = VaeImageProcessor(do_normalize=True).postprocess(torch.from_numpy(x).permute(0, 3, 1, 2), output_type="pil")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert to_pil(x[0, :, :, :1])[0].mode == "L"
    assert len(to_pil(x[0])) == 1


def test_load_image_and_mask_ranges_and_resize(tmp_path):
    image = _image(3, size=(10, 6))
    path = save_png(image, tmp_path / "in.png")
    x = load_image(path)
    assert x.shape == (1, 6, 10, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], np.asarray(image, np.float32) / 127.5 - 1, atol=1e-6)
    # Round trip through to_pil is exact at 8 bits.
    np.testing.assert_array_equal(np.asarray(to_pil(x)[0]), np.asarray(image))
    resized = load_image(path, size=(20, 12))
    assert resized.shape == (1, 12, 20, 3)
    want = np.asarray(image.resize((20, 12), Image.Resampling.LANCZOS), np.float32) / 127.5 - 1
    np.testing.assert_allclose(resized[0], want, atol=1e-6)
    assert load_image(path, size=8).shape == (1, 8, 8, 3)
    rgba = save_png(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), tmp_path / "rgba.png")
    # Transparent pixels are composited on white (A1111's img2img background), not their hidden colour.
    np.testing.assert_allclose(load_image(rgba)[0, 0, 0], [1, 1, 1])

    mask = Image.new("L", (8, 4), 0)
    mask.paste(255, (0, 0, 4, 4))
    mpath = save_png(mask, tmp_path / "mask.png")
    m = load_mask(mpath)
    assert m.shape == (4, 8) and m.dtype == np.float32
    np.testing.assert_array_equal(m[:, :4], 1.0)
    np.testing.assert_array_equal(m[:, 4:], 0.0)
    m2 = load_mask(mpath, size=(16, 8))
    assert m2.shape == (8, 16) and m2.min() >= 0 and m2.max() <= 1
    want = np.asarray(mask.resize((16, 8), Image.Resampling.LANCZOS), np.float32) / 255
    np.testing.assert_allclose(m2, want, atol=1e-6)
    assert m2[:, :2].min() == 1.0 and m2[:, 14:].max() == 0.0


def test_stale_temp_files_of_a_killed_writer_are_removed_once_the_file_is_written(tmp_path):
    # A writer killed mid-write (SIGKILL: no cleanup runs) leaves `.NAME.XXXX.tmp` beside NAME.
    target = tmp_path / "00001-7-abc.png"
    stale = [tmp_path / f".{target.name}.k1ll3d.tmp", tmp_path / f".{target.name}.0ther.tmp"]
    for s in stale:
        s.write_bytes(b"\x89PNG half")
    other = tmp_path / ".00002-7-abc.png.k1ll3d.tmp"  # another image's: not ours to remove
    other.write_bytes(b"x")
    save_png(_image(1), target, "p", exclusive=True)
    assert sorted(remove_stale_temp_files(target)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, other.name])
    assert remove_stale_temp_files(target) == []


def test_exclusive_writer_whose_temp_file_was_cleared_reports_the_file_exists(tmp_path):
    # Two runs write the same image: the first finishes and clears the temp files beside it,
    # the second's included; the second must see "exists" (and skip), not crash.
    target = tmp_path / "same.png"

    def write(f):
        f.write(b"second writer")
        save_png(_image(2), target, "first", exclusive=True)  # the concurrent run finishes first
        remove_stale_temp_files(target)

    with pytest.raises(FileExistsError):
        images._atomic_write(target, write, exclusive=True)
    assert read_infotext(target) == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["same.png"]
