"""What the `sdjax` command adds to the images it writes: provenance (the invisible watermark and
the XMP digital source type), live previews, and what `sdjax info` reports. Thin: flags in,
library calls out (`sdjax.watermark`, `sdjax.metadata`, `sdjax.pipeline.preview`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from sdjax import watermark
from sdjax.errors import UsageError
from sdjax.images import escape_control, read_infotext, read_xmp
from sdjax.metadata import provenance_xmp, xmp_source_type
from sdjax.pipeline import preview
from sdjax.weights.taesd import load_taesd


def add_output_arguments(s: argparse.ArgumentParser) -> None:
    """--no-watermark, --preview-every, --preview-method, --taesd."""
    g = s.add_argument_group("provenance and previews")
    g.add_argument("--no-watermark", dest="watermark", action="store_false", default=True,
                   help="do not embed the invisible watermark (on by default, as the SD reference scripts)")
    g.add_argument("--preview-every", type=int, metavar="N",
                   help="write a preview PNG every N steps to OUT/previews/ and print its path on stderr")
    g.add_argument("--preview-method", choices=preview.METHODS,
                   help="cheap (A1111 'Approx cheap', default) or taesd (needs --taesd)")
    g.add_argument("--taesd", metavar="PATH", help="TAESD / TAESDXL decoder: diffusers folder or .safetensors")


def check_output_options(o: dict) -> None:
    """The preview flags, before any model loads."""
    every, method = o.get("preview_every"), o.get("preview_method")
    if every is not None and every < 1:
        raise UsageError(f"--preview-every must be at least 1, got {every}")
    if (method is not None or o.get("taesd")) and every is None:
        raise UsageError("--preview-method / --taesd need --preview-every N")
    if method == "taesd" and not o.get("taesd"):
        raise UsageError("--preview-method taesd needs the decoder weights: pass --taesd PATH")
    if o.get("taesd") and not Path(o["taesd"]).exists():
        raise UsageError(f"--taesd {o['taesd']!r} does not exist")


def make_previewer(o: dict, pipe, folder: Path):
    """A `Previewer` writing to `folder` (OUT/previews), or None without --preview-every."""
    if o.get("preview_every") is None:
        return None
    method = o.get("preview_method") or ("taesd" if o.get("taesd") else "cheap")
    decoder = None
    if method == "taesd":
        decoder = load_taesd(o["taesd"])
    return preview.Previewer(folder, o["preview_every"], method=method, taesd=decoder,
                             model_family=preview.family(pipe.vae.scaling_factor),
                             on_write=lambda p: print(f"preview: {p}", file=sys.stderr, flush=True))


def wrap_generate(generate, o: dict, previewer):
    """`generate(**kw)` with previews (named by the first seed) and the watermark applied to the
    images about to be written (never to the pipeline's own arrays)."""

    def run(**kw):
        if previewer is not None:
            seed = kw.get("seed", 0)
            seed = seed[0] if isinstance(seed, (list, tuple)) else seed  # an X/Y/Z batch: its first cell's
            kw["preview"] = previewer.start(f"{seed}", kw.get("steps"))
        result = generate(**kw)
        if o.get("watermark", True):
            result = dataclasses.replace(result, images=watermark.apply_watermark(result.images))
        return result

    return run


def print_info(path: str) -> int:
    """`sdjax info IMAGE`: the parameters as stored, then a `Watermark:` line (images of at least
    256x256 pixels, where the mark can be read) and a `Digital source type:` line (when the PNG
    has XMP). Exit 2 when the image has none of the three."""
    text = read_infotext(path)
    source = xmp_source_type(read_xmp(path))
    from PIL import Image

    with Image.open(path) as im:
        checked = im.width * im.height >= watermark.MIN_PIXELS
        found, bits = watermark.detect(im) if checked else (False, 0)
    if text is None and source is None and not found:
        raise UsageError(f"{path} has no generation parameters")
    if text is not None:
        print(escape_control(text))  # a PNG's text must not drive the terminal
    if checked:
        print(f"Watermark: {'found' if found else 'not found'} ({bits}/48 bits of the sdjax / diffusers SDXL "
              "dwtDct message)")
    if source is not None:
        print(f"Digital source type: {escape_control(source)}")
    return 0


__all__ = ["add_output_arguments", "check_output_options", "make_previewer", "print_info", "provenance_xmp",
           "wrap_generate"]
