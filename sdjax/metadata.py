"""A1111 "infotext": the generation-parameters text stored in PNGs and shown under images.

Format (stable-diffusion-webui `processing.create_infotext`):

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>      (only when non-empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, ...

The last line is `key: value` pairs joined by ", ". A value containing `,`, `:`
or a newline is written as a JSON string (A1111 `infotext_utils.quote`); sdjax
also quotes values containing `"` or surrounding whitespace so that they read
back unchanged (A1111 reads these the same way).

`parse_infotext` follows A1111's `parse_generation_parameters`: the last line is
the parameter line only when it holds at least 3 `key: value` pairs; prompt
lines are stripped; `WxH` values are split into `key-1` / `key-2`. Values come
back as strings. A1111's UI defaults (e.g. "Clip skip" = 1 when absent) are not
filled in.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from sdjax import __version__
from sdjax.errors import InfotextError

__all__ = [
    "A1111_KEY_ORDER",
    "InfotextError",
    "TRAINED_ALGORITHMIC_MEDIA",
    "XMP_KEY",
    "format_hashes",
    "format_infotext",
    "parse_hashes",
    "parse_infotext",
    "provenance_xmp",
    "quote",
    "unquote",
    "xmp_source_type",
]

SDJAX_VERSION = f"sdjax {__version__}"

# Keys of create_infotext's dict before `**p.extra_generation_params`, in order.
# Other keys (Hires ..., Lora hashes, TI hashes, extensions) come after them in
# the caller's order, then Version and User.
A1111_KEY_ORDER = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
)
_TRAILING_KEYS = ("Version", "User")

# A1111 re_param: a key starts with a word character and holds word chars, spaces, "-" and "/".
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]*\w")
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"


def quote(value: Any) -> str:
    """A1111 `quote`, made lossless: JSON-quote a value that would not read back as is."""
    text = str(value)
    needs_quotes = (
        any(c in text for c in ",:\n\"")
        or text != text.strip()
        or text == ""
    )
    return json.dumps(text, ensure_ascii=False) if needs_quotes else text


def unquote(text: str) -> str:
    """A1111 `unquote`: decode a JSON-quoted value; anything else is returned unchanged."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        decoded = json.loads(text)
    except ValueError:
        return text
    return decoded if isinstance(decoded, str) else text


def _value_text(key: str, value: Any) -> str:
    # (w, h) pairs are written as A1111 writes sizes: "512x768".
    if key in ("Size", "Seed resize from", "Hires resize") and isinstance(value, (tuple, list)):
        width, height = value
        return f"{int(width)}x{int(height)}"
    if isinstance(value, Mapping):
        return format_hashes(value)
    return str(value)


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """Write an A1111 infotext.

    params: infotext labels -> values (numbers, strings, bools; `(w, h)` for
        "Size"/"Seed resize from"/"Hires resize"; a `{name: hash}` dict for
        "Lora hashes"/"TI hashes"). `None` values are left out, as is "Clip skip"
        <= 1 (A1111 writes it only when it is 2 or more). "Version" defaults to
        `sdjax <version>`; pass `"Version": None` to leave it out.
    A1111 needs at least 3 parameters on the last line to recognise it.
    """
    params = dict(params)
    params.setdefault("Version", SDJAX_VERSION)
    clip_skip = params.get("Clip skip")
    if clip_skip is not None and str(clip_skip).strip().isdigit() and int(clip_skip) <= 1:
        params["Clip skip"] = None

    ordered = [k for k in A1111_KEY_ORDER if k in params]
    ordered += [k for k in params if k not in A1111_KEY_ORDER and k not in _TRAILING_KEYS]
    ordered += [k for k in _TRAILING_KEYS if k in params]

    pairs = []
    for key in ordered:
        value = params[key]
        if value is None:
            continue
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise InfotextError(
                f"infotext key {key!r} cannot be read back: use letters, digits, '_', ' ', '-' or '/',"
                " starting and ending with a letter or digit"
            )
        text = _value_text(key, value)
        # A1111 writes a bare key when the value equals it (flags set by extensions).
        pairs.append(key if text == key else f"{key}: {quote(text)}")

    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """Read an A1111 or sdjax infotext into a dict of strings.

    Always has "Prompt" and "Negative prompt". Parameter values are unquoted;
    a `WxH` value for key K becomes "K-1" = W and "K-2" = H (so "Size" gives
    "Size-1"/"Size-2", as in A1111). Never raises on odd text: what is not a
    parameter line is prompt.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    result: dict[str, str] = {
        "Prompt": "\n".join(prompt_lines),
        "Negative prompt": "\n".join(negative_lines),
    }
    for key, value in _PARAM.findall(last):
        if not value:
            continue  # A1111 drops "Key: " with nothing after it (its v[0] fails)
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        size = _IMAGE_SIZE.match(value)
        if size is not None:
            result[f"{key}-1"] = size.group(1)
            result[f"{key}-2"] = size.group(2)
        else:
            result[key] = value
    return result


def format_hashes(hashes: Mapping[str, str]) -> str:
    """`{"add_detail": "7c6bad76eb54"}` -> `"add_detail: 7c6bad76eb54"` (A1111 "Lora hashes" value).

    A1111 removes `:` and `,` from names so the list can be split again.
    """
    return ", ".join(
        f"{name.replace(':', '').replace(',', '')}: {value}" for name, value in hashes.items()
    )


def parse_hashes(value: str) -> dict[str, str]:
    """Inverse of `format_hashes`: `"a: 123, b: 456"` -> `{"a": "123", "b": "456"}`."""
    result = {}
    for item in value.split(","):
        name, sep, digest = item.partition(":")
        if sep:
            result[name.strip()] = digest.strip()
    return result


# IPTC "Digital Source Type" of an image made by a generative model (IPTC NewsCodes).
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
XMP_KEY = "XML:com.adobe.xmp"  # the PNG iTXt keyword Adobe's XMP spec (part 3) gives XMP packets

_XMP_TEMPLATE = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    Iptc4xmpExt:DigitalSourceType="{source}"
    xmp:CreatorTool="{tool}"/>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="r"?>"""

_SOURCE_TYPE = re.compile(r'DigitalSourceType(?:="([^"]*)"|>([^<]*)<)')


def provenance_xmp(source_type: str = TRAINED_ALGORITHMIC_MEDIA) -> str:
    """An XMP packet stating the IPTC digital source type (Iptc4xmpExt:DigitalSourceType) and
    sdjax as the creator tool; written by `sdjax.images.save_png(..., xmp=...)`."""
    return _XMP_TEMPLATE.format(source=source_type, tool=SDJAX_VERSION)


def xmp_source_type(xmp: str | bytes | None) -> str | None:
    """The DigitalSourceType URI of an XMP packet (attribute or element form), or None."""
    if xmp is None:
        return None
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else str(xmp)
    m = _SOURCE_TYPE.search(text)
    return None if m is None else (m.group(1) or m.group(2) or "").strip()
