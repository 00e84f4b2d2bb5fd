"""Image files: PNGs with A1111 infotext, grids, pixel conversions, crash-safe writes.

Conventions: arrays are NHWC float32; pixel images are in [-1, 1] (the VAE's
range), masks in [0, 1] with 1 = repaint. Sizes are `(width, height)` as PIL
writes them, or one int for a square.

Every file this module writes appears whole or not at all: it is written to a
temporary file in the same folder, flushed, fsynced and renamed over the target
(`os.replace`), so a crash or error never leaves a truncated output behind. With
`exclusive=True` the temporary file is hard-linked to the target instead, which fails
when the target exists: an existing file is never replaced (`FileExistsError`). Files
get the permissions the umask gives a new file (0644 under the usual 022), not mkstemp's 0600.
JSONL records are appended under an exclusive `fcntl.flock`, so concurrent writers never
interleave or duplicate records (`append_jsonl(..., unique_key=...)`).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from sdjax.errors import ImageError
from sdjax.metadata import XMP_KEY

__all__ = [
    "ImageError",
    "INFOTEXT_KEY",
    "append_jsonl",
    "atomic_write_text",
    "escape_control",
    "to_rgb",
    "load_image",
    "load_mask",
    "remove_stale_temp_files",
    "make_grid",
    "read_infotext",
    "read_jsonl",
    "read_xmp",
    "save_png",
    "to_pil",
]

INFOTEXT_KEY = "parameters"  # the PNG text chunk A1111 reads and writes


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask_mode() -> int:
    """The mode a new regular file gets under the current umask (0o666 & ~umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_TEMP_SUFFIX = ".tmp"


def _temp_prefix(path: Path) -> str:
    """The name `_atomic_write`'s temp file for `path` starts with: `.NAME.` (then random, then .tmp)."""
    return f".{path.name}."


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], exclusive: bool = False) -> Path:
    """Run `write(binary_file)` on a temp file next to `path`, then rename it onto `path`
    (exclusive: hard-link it there, FileExistsError if `path` exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            try:
                os.fchmod(f.fileno(), _umask_mode())
            except (AttributeError, OSError):
                pass  # no fchmod (Windows): mkstemp's mode stays
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp_name, path)  # atomic create-if-absent, the file already whole
            except FileNotFoundError:
                # Our temp file is gone: a concurrent writer of the same file finished first and
                # cleared the temp files left beside it (`remove_stale_temp_files`).
                if path.exists():
                    raise FileExistsError(f"{path} was written by another process first") from None
                raise
            os.unlink(tmp_name)
        else:
            os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files `_atomic_write` leaves beside `path` when its process is killed
    mid-write (`.NAME.XXXXXXXX.tmp`). Call it once `path` has been written exclusively: a
    concurrent exclusive writer of the same file is then bound to fail with FileExistsError,
    also when its temp file is removed here. Returns the removed files."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f"{glob.escape(_temp_prefix(path))}*{_TEMP_SUFFIX}"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def save_png(image: Image.Image, path: str | os.PathLike, infotext: str | None = None, *,
             exclusive: bool = False, xmp: str | None = None) -> Path:
    """Write `image` as PNG at `path` atomically, with `infotext` in a `parameters` text chunk.

    Like A1111 (PIL `PngInfo.add_text`), the chunk is tEXt when the text is
    Latin-1 and iTXt (UTF-8) otherwise. Missing parent folders are created.
    exclusive: never replace an existing file (FileExistsError, nothing written).
    xmp: an XMP packet (`sdjax.metadata.provenance_xmp`) written after the parameters as the
    iTXt chunk `XML:com.adobe.xmp`, where XMP readers (exiftool, Pillow's `getxmp`) look.
    Raises ImageError naming the file if it cannot be written.
    """
    pnginfo = None
    if infotext is not None or xmp is not None:
        pnginfo = PngImagePlugin.PngInfo()
    if infotext is not None:
        pnginfo.add_text(INFOTEXT_KEY, infotext)
    if xmp is not None:
        pnginfo.add_itxt(XMP_KEY, xmp)
    try:
        return _atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=pnginfo), exclusive)
    except FileExistsError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ImageError(f"cannot write PNG {os.fspath(path)!r}: {e}") from e


def _open(path: str | os.PathLike) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decode now so truncated files fail here, naming the file
    except FileNotFoundError as e:
        raise ImageError(f"image not found: {os.fspath(path)!r}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot read image {os.fspath(path)!r}: {e}") from e
    return image


def read_xmp(path: str | os.PathLike) -> str | None:
    """The XMP packet (iTXt `XML:com.adobe.xmp`) of a PNG, or None."""
    info = _open(path).info
    value = info.get(XMP_KEY, info.get("xmp"))  # Pillow also files it under "xmp"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value)


def read_infotext(path: str | os.PathLike) -> str | None:
    """The A1111 `parameters` text (PNG tEXt, zTXt or iTXt) of an image file, or None if it has none."""
    value = _open(path).info.get(INFOTEXT_KEY)
    return None if value is None else str(value)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` as UTF-8 to `path` atomically (whole file or nothing)."""

    def write(f: IO[bytes]) -> None:
        for start in range(0, len(text), 1 << 20):  # encode piecewise: no second copy of huge texts
            f.write(text[start : start + (1 << 20)].encode("utf-8"))

    return _atomic_write(path, write)


def _drop_partial_last_line(f: IO[bytes]) -> None:
    """Truncate a file opened r+b after its last newline (removes a line cut short by a crash)."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    pos, block = end, 1 << 16
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        cut = f.read(pos - start).rfind(b"\n")
        if cut != -1:
            f.truncate(start + cut + 1)
            return
        pos = start
    f.truncate(0)


def append_jsonl(path: str | os.PathLike, record: Any, unique_key: str | None = None) -> bool:
    """Append `record` as one JSON line to `path`, flushed and fsynced, under an exclusive
    `fcntl.flock` of the file (where flock exists), so concurrent writers each add whole lines.

    A last line left incomplete by an earlier crash is removed first, so every
    line before the new one stays a whole record. unique_key: append only when no record
    already has `record[unique_key]` under that key (checked under the lock); returns whether
    the record was appended.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "a+b") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        except (ImportError, OSError):
            pass  # no flock (Windows, some network file systems): one writer per file then
        _drop_partial_last_line(f)
        if unique_key is not None:
            f.seek(0)
            for raw in f.read().split(b"\n"):
                try:
                    if raw.strip() and json.loads(raw).get(unique_key) == record[unique_key]:
                        return False
                except (ValueError, AttributeError):
                    continue
        f.seek(0, os.SEEK_END)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return True


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_control(text: str) -> str:
    """`text` safe to print on a terminal: control characters other than newline and tab
    (ESC sequences, carriage returns, C1 codes) become visible `\\xNN` escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Records of a JSON-lines file; [] if it does not exist.

    An unparsable last line without a trailing newline (a crash mid-append) is
    ignored; an unparsable line elsewhere raises ImageError naming file and line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except ValueError as e:
            if number == len(lines):  # no newline after it: the write was cut short
                break
            raise ImageError(f"{os.fspath(path)!r} line {number} is not JSON: {e}") from e
    return records


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Paste equally sized images into one RGB grid, row by row, on black.

    Without `cols`, A1111's default layout: rows = round(sqrt(n)),
    cols = ceil(n / rows) (4 -> 2x2, 5 -> 2 rows of 3, 8 -> 3 rows of 3).
    """
    images = list(images)
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    if cols is None:
        rows = min(max(round(math.sqrt(n)), 1), n)
        cols = math.ceil(n / rows)
    else:
        if cols < 1:
            raise ValueError(f"cols must be >= 1, got {cols}")
        cols = min(cols, n)
        rows = math.ceil(n / cols)
    width, height = images[0].size
    for i, image in enumerate(images):
        if image.size != (width, height):
            raise ValueError(f"image {i} is {image.size[0]}x{image.size[1]}, image 0 is {width}x{height}")
    grid = Image.new("RGB", (cols * width, rows * height), color="black")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), box=(i % cols * width, i // cols * height))
    return grid


def to_pil(images_nhwc: Any) -> list[Image.Image]:
    """Decoded images in [-1, 1], (N, H, W, C) or (H, W, C), C in {1, 3, 4} -> PIL images.

    Pixels are `round(clip(x / 2 + 0.5, 0, 1) * 255)` as diffusers'
    `VaeImageProcessor.postprocess` + `numpy_to_pil` (A1111 truncates instead of rounding).
    """
    x = np.asarray(images_nhwc, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected (N, H, W, C) with C in 1, 3, 4; got shape {x.shape}")
    pixels = (np.clip(x / 2 + 0.5, 0.0, 1.0) * 255).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [Image.fromarray(p) for p in pixels]


def to_8bit(image: Image.Image) -> Image.Image:
    """Integer and float greyscale images with more than 8 bits as 8-bit "L", others unchanged.

    I;16 (16-bit PNGs and TIFFs) and I (what Pillow opens 16-bit PNGs as): 0..65535 -> 0..255
    (value / 257, rounded; I values outside 0..65535 clipped), where Pillow's own convert would
    clip at 255 and make almost everything white. F: 0..255 as Pillow's convert (clipped).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        a = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.round(np.asarray(image, np.float64)), 0, 255).astype(np.uint8), "L")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image Pillow opens as 8-bit RGB.

    High-bit greyscale (I;16, I, F) is scaled as `to_8bit`; 16-bit RGB PNGs are reduced to
    8 bits by Pillow on open; palette, CMYK, YCbCr, LAB and HSV go through Pillow's convert.
    Alpha policy (as A1111's img2img): an image with transparency (RGBA, LA, PA, or a
    palette / L / RGB image with a transparency key) is composited onto white, so transparent
    areas become white rather than whatever colour the invisible pixels happened to hold.
    """
    image = to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _target_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    width, height = size
    return (int(width), int(height))


def load_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Read an image as float32 (1, H, W, 3) in [-1, 1].

    EXIF rotation is applied; any mode is made 8-bit RGB by `to_rgb` (transparency composited
    on white). With `size` = (width, height) (or an int for a square) it is resized with
    Lanczos, as diffusers does.
    """
    image = to_rgb(ImageOps.exif_transpose(_open(path)))
    target = _target_size(size)
    if target is not None and image.size != target:
        image = image.resize(target, resample=Image.Resampling.LANCZOS)
    x = np.asarray(image, dtype=np.float32) / 255.0
    return (x * 2.0 - 1.0)[None]


def load_mask(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Read an inpainting mask as float32 (H, W) in [0, 1] (white = 1 = repaint).

    Converted to greyscale (PIL "L"); resized to `size` = (width, height) with
    Lanczos. Not binarised: threshold at 0.5 where a hard mask is needed.
    """
    image = to_8bit(ImageOps.exif_transpose(_open(path))).convert("L")
    target = _target_size(size)
    if target is not None and image.size != target:
        image = image.resize(target, resample=Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0
