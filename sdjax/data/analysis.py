"""Read the attributes back out of a (generated) synthetic-shapes image.

A deterministic pixel analysis, no learned model: it tells whether the tiny model
drew what the caption asked for.

1. Light denoising (3x3 median), then every pixel is mapped to its nearest palette
   colour (Euclidean RGB).
2. Background = the most common label on the border (a frame ~1/32 of the side).
3. Objects = non-background colours that still cover enough pixels after a 3x3
   erosion (erosion removes the thin rings of blended colour that blur and
   anti-aliasing leave around edges, e.g. purple between red and blue), at most
   `max_objects`, largest first.
4. Per object (its pixels = its colour within 3 px of the eroded core): position =
   nearest grid centre to the bounding-box centre; size = small/large by the bounding-box
   extent; shape: triangle when the top third of the box holds far fewer pixels than
   the bottom third (or vice versa), else circle vs square by the fill ratio
   area / box area (circle ~0.79, square ~1.0).
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageFilter

from sdjax.data.phrasing import (DOT, HELDOUT_FRAMES, SHAPE_WORDS, SIZE_WORDS, TRAIN_FRAMES, Phrased, phrase,
                                 stated_attributes)
from sdjax.data.synthetic import (DEFAULT_CONFIG, PALETTE, POSITIONS, SIZES, SPLITS, SyntheticConfig, _draw_attributes,
                                  _rng, caption_for, sample)

ATTRIBUTES = ("background", "color", "shape", "size", "position")


def _as_uint8_hwc(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        # Float images in [-1, 1] (model output) or [0, 1].
        array = np.asarray(array, np.float32)
        if array.min() < 0:
            array = (array + 1) / 2
        array = np.clip(np.round(array * 255), 0, 255).astype(np.uint8)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HWC RGB image, got shape {array.shape}")
    return array[..., :3]


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion; pixels outside the image count as set (shapes may touch the border)."""
    padded = np.pad(mask, 1, constant_values=True)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy:dy + h, dx:dx + w]
    return out


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """3x3 binary dilation, `steps` times."""
    h, w = mask.shape
    for _ in range(steps):
        padded = np.pad(mask, 1, constant_values=False)
        out = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                out |= padded[dy:dy + h, dx:dx + w]
        mask = out
    return mask


def _classify_shape(region: np.ndarray) -> str:
    """Triangle if one end of the box is much thinner than the other, else circle vs
    square by fill ratio (area / box area: circle pi/4, square 1)."""
    ys, xs = np.nonzero(region)
    box = region[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    third = max(1, box.shape[0] // 3)
    top, bottom = box[:third].sum(), box[-third:].sum()
    taper = min(top, bottom) / max(top, bottom, 1)  # apex-up triangle ~0.2, circle/square 1
    if taper < 0.55:
        return "triangle"
    fill = box.sum() / box.size
    if fill < 0.89:
        return "circle"
    return "square"


def analyze(image, config: SyntheticConfig = DEFAULT_CONFIG, max_objects: int = 2,
            min_fraction: float = 0.004) -> dict:
    """Estimate the attributes of a synthetic-shapes image.

    image: PIL image, uint8 HWC RGB array, or float HWC array in [-1, 1] / [0, 1].
    Returns {"background", "objects": [{"color", "shape", "size", "position",
    "pixels", "center": (x, y) bounding-box centre in fractions of width / height}], and the largest object's "color",
    "shape", "size", "position" at top level (None when no object is found)}.
    """
    rgb = _as_uint8_hwc(image)
    h, w, _ = rgb.shape
    rgb = np.asarray(Image.fromarray(rgb).filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    names = list(config.colors)
    palette = np.array([PALETTE[n] for n in names], np.float32)
    labels = np.argmin(((rgb[:, :, None, :] - palette) ** 2).sum(-1), axis=-1)

    frame = max(1, min(h, w) // 32)
    border = np.concatenate([labels[:frame].ravel(), labels[-frame:].ravel(),
                             labels[:, :frame].ravel(), labels[:, -frame:].ravel()])
    background = int(np.bincount(border, minlength=len(names)).argmax())

    candidates = []
    for k in range(len(names)):
        if k == background:
            continue
        core = _erode(labels == k)
        count = int(core.sum())
        if count >= min_fraction * h * w:
            candidates.append((count, k, core))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    if candidates:  # a second "object" far smaller than the first is noise, not a shape
        candidates = [c for c in candidates if c[0] >= 0.25 * candidates[0][0]][:max_objects]

    side = float(min(h, w))
    split_extent = 0.5 * (SIZES["small"] + SIZES["large"]) * side
    objects = []
    for _, k, core in candidates:
        # The full shape = pixels of its colour near its eroded core: this restores the
        # edges and the triangle's thin apex but leaves out stray pixels elsewhere.
        region = _dilate(core, 3) & (labels == k)
        ys, xs = np.nonzero(region)
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        area = float(region.sum())
        # The bounding-box centre, as the generator places shapes (a triangle's centroid
        # sits lower than its box centre).
        cx, cy = (xs.min() + xs.max() + 1) / (2 * w), (ys.min() + ys.max() + 1) / (2 * h)
        position = min(config.positions,
                       key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
        objects.append({
            "color": names[k], "shape": _classify_shape(region),
            "size": "large" if max(width, height) > split_extent else "small",
            "position": position, "pixels": int(area), "center": (float(cx), float(cy)),
        })
    result = {"background": names[background], "objects": objects}
    first = objects[0] if objects else {}
    for key in ("color", "shape", "size", "position"):
        result[key] = first.get(key)
    return result


def score(predicted: dict, intended: dict) -> dict[str, bool]:
    """Per-attribute correctness of `analyze` output against `sample` attributes.

    Keys: "background", "color" (the set of shape colours matches exactly), and
    "shape", "size", "position" (correct for every intended object, matched by
    colour; an intended object whose colour was not found counts as wrong), plus
    "all" (everything correct).
    """
    found = {o["color"]: o for o in predicted.get("objects", [])}
    want = intended["objects"]
    result = {
        "background": predicted.get("background") == intended["background"],
        "color": set(found) == {o["color"] for o in want},
    }
    for key in ("shape", "size", "position"):
        result[key] = all(o["color"] in found and found[o["color"]][key] == o[key] for o in want)
    result["all"] = all(result.values())
    return result


# ---------------------------------------------------------------------------------
# Evaluation: accuracy per attribute, for seen and held-out attribute combinations.

REPORT_KEYS = ATTRIBUTES + ("all",)


def parse_caption(caption: str, config: SyntheticConfig = DEFAULT_CONFIG) -> dict:
    """The attributes dict of a caption in the synthetic formats (inverse of `caption_for`).

    Two-shape captions without positions give objects without "position"/"size" keys
    ("size" is "small" for two-shape images). Raises ValueError for any other text.
    """
    names = lambda group: "|".join(sorted(map(re.escape, group), key=len, reverse=True))  # noqa: E731
    color, shape = f"({names(config.colors)})", f"({names(config.shapes)})"
    where = f"(?: at the ({names(config.positions)}))"
    text = " ".join(caption.lower().split())
    m = re.fullmatch(f"a ({names(config.sizes)}) {color} {shape}{where} on a {color} background", text)
    if m:
        obj = {"shape": m[3], "color": m[2], "size": m[1], "position": m[4]}
        return {"background": m[5], "objects": [obj], **obj}
    m = re.fullmatch(f"a {color} {shape}{where}? and a {color} {shape}{where}? on a {color} background", text)
    if not m:
        raise ValueError(f"caption {caption!r} is not in the synthetic caption format")
    objects = []
    for c, s, p in ((m[1], m[2], m[3]), (m[4], m[5], m[6])):
        obj = {"shape": s, "color": c, "size": "small"}
        if p:
            obj["position"] = p
        objects.append(obj)
    return {"background": m[7], "objects": objects}


def _score_known(predicted: dict, intended: dict) -> dict[str, bool | None]:
    """`score`, with None for what the intended dict does not state (not counted): the
    background when it has no "background", size / position when an object lacks the key
    (a prompt without a size or position asks for any)."""
    objects = [{"position": None, "size": None, **o} for o in intended["objects"]]
    result = dict(score(predicted, {"background": intended.get("background"), "objects": objects}))
    if "background" not in intended:
        result["background"] = None
    for key in ("size", "position"):
        if any(key not in o for o in intended["objects"]):
            result[key] = None
    result["all"] = all(v for k, v in result.items() if k != "all" and v is not None)
    return result


def evaluate(images, attributes: list[dict], splits: list[str] | None = None,
             config: SyntheticConfig = DEFAULT_CONFIG) -> dict:
    """Accuracy per attribute, grouped by split.

    images: PIL images / uint8 HWC / float HWC arrays; attributes: the intended
    attributes per image; splits: "seen"/"train" or "heldout" per image (default:
    from `config.is_heldout`). Returns {"seen": {"n": int, "background": float, ...,
    "all": float}, "heldout": {...}}; only groups with images appear.
    """
    images, attributes = list(images), list(attributes)
    if len(images) != len(attributes):
        raise ValueError(f"{len(images)} images but {len(attributes)} attribute dicts")
    if splits is None:
        splits = ["heldout" if config.is_heldout(a) else "seen" for a in attributes]
    sums: dict[str, dict[str, list[int]]] = {}
    for image, intended, split in zip(images, attributes, splits):
        group = "seen" if split == "train" else split
        result = _score_known(analyze(image, config), intended)
        acc = sums.setdefault(group, {k: [0, 0] for k in REPORT_KEYS})
        for key in REPORT_KEYS:
            if result[key] is not None:
                acc[key][0] += bool(result[key])
                acc[key][1] += 1
    report = {}
    for group in sorted(sums, key=lambda g: (g != "seen", g)):
        n = max(c[1] for c in sums[group].values())
        report[group] = {"n": n, **{k: (c[0] / c[1] if c[1] else None) for k, c in sums[group].items()}}
    return report


def format_report(report: dict) -> str:
    """A fixed-width table of `evaluate`'s result, one row per split."""
    width = max([8] + [len(g) + 1 for g in report])
    lines = [f"{'split':<{width}}{'n':>6}" + "".join(f"{k:>12}" for k in REPORT_KEYS)]
    for group, row in report.items():
        cells = "".join(f"{'-' if row[k] is None else format(row[k], '.3f'):>12}" for k in REPORT_KEYS)
        lines.append(f"{group:<{width}}{row['n']:>6}" + cells)
    return "\n".join(lines)


def evaluation_prompts(n: int, seed: int = 0, config: SyntheticConfig = DEFAULT_CONFIG) -> list[dict]:
    """n prompts, half from the train distribution ("seen") and half held-out.

    Each: {"caption", "attributes", "split": "seen" | "heldout", "seed": int (for the
    generator's noise)}. Deterministic in (n, seed, config).
    """

    out = []
    for i in range(n):
        split = "train" if i % 2 == 0 else "heldout"
        _, caption, attributes = sample(seed, i // 2, split, config)
        out.append({"caption": caption, "attributes": attributes,
                    "split": "seen" if split == "train" else "heldout", "seed": seed * 1_000_003 + i})
    return out


# ---------------------------------------------------------------------------------
# Prompts as people write them (`sdjax.data.phrasing`): read back, and evaluation by phrasing family.


def phrasing_vocabulary(frames: tuple[str, ...], samples: int = 4000, seed: int = 0) -> set[str]:
    """Every word (lower case, punctuation split off) of `samples` captions in `frames`."""
    words: set[str] = set()
    for i in range(samples):
        rng = _rng(seed, "train", i)
        attributes = _draw_attributes(rng, DEFAULT_CONFIG, "train")
        words.update(re.findall(r"[a-z]+|[^\sa-z]", phrase(attributes, rng, frames).caption.lower()))
    return words


_COLOR_AFTER = ("against", "on")  # "against blue", "on blue": the background
_NOUNS = {**{w: shape for shape, words in SHAPE_WORDS.items() for w in words}, DOT: "circle"}
_SIZES = {w: size for size, words in SIZE_WORDS.items() for w in words}
_PLACES = {"top", "bottom", "left", "right", "center", "centered", "middle"}


def parse_prompt(text: str) -> dict:
    """The attributes a single-shape prompt states, in any phrasing `phrasing.phrase` writes (and the
    template): {"background"?, "objects": [{"shape", "color"?, "size"?, "position"?}], and the
    object's keys at top level}. Unstated attributes are left out. Raises ValueError for a
    prompt that names no shape, or several shapes or places it cannot tell apart.
    """
    words = re.findall(r"[a-z]+", text.lower())
    nouns = [i for i, w in enumerate(words) if w in _NOUNS]
    if len(nouns) != 1:
        raise ValueError(f"prompt {text!r}: expected one shape word ({sorted(_NOUNS)}), found {len(nouns)}")
    k = nouns[0]
    obj = {"shape": _NOUNS[words[k]]}
    if words[k] == "dot":
        obj["size"] = "small"
    background = None
    for i, w in enumerate(words):
        if w not in PALETTE:
            continue
        nxt = words[i + 1] if i + 1 < len(words) else ""
        prev = [p for p in words[max(0, i - 2):i] if p not in ("a", "an")]
        if nxt in ("background", "backdrop") or (prev and prev[-1] in _COLOR_AFTER and nxt not in _NOUNS
                                                 and nxt not in _SIZES):
            if background is not None and background != w:
                raise ValueError(f"prompt {text!r}: two background colours")
            background = w
        elif "color" not in obj and k - 3 <= i < k:
            obj["color"] = w
        else:
            raise ValueError(f"prompt {text!r}: cannot tell what {w!r} colours")
    sizes = {_SIZES[w] for w in words if w in _SIZES}
    if len(sizes) > 1 or (sizes and obj.get("size", next(iter(sizes))) not in sizes):
        raise ValueError(f"prompt {text!r}: conflicting sizes")
    if sizes:
        obj["size"] = next(iter(sizes))
    places = [w for w in words if w in _PLACES]
    if places:
        vertical = {w for w in places if w in ("top", "bottom")}
        horizontal = {w for w in places if w in ("left", "right")}
        centre = set(places) - vertical - horizontal
        if len(vertical) > 1 or len(horizontal) > 1 or (centre and (vertical or horizontal)):
            raise ValueError(f"prompt {text!r}: conflicting positions {places}")
        obj["position"] = " ".join(sorted(vertical) + sorted(horizontal)) or "center"
    out = {"objects": [obj], **obj}
    if background is not None:
        out["background"] = background
    return out


FAMILIES = ("template", "paraphrase", "heldout")


def family_prompts(family: str, n: int, seed: int = 1) -> list[dict]:
    """n evaluation prompts of one phrasing family, every one stating colour, background and position.

    family: "template" (`caption_for`), "paraphrase" (the training frames) or "heldout"
    (`HELDOUT_FRAMES`, never in training). Attributes come from the train split's
    distribution at `seed` (the tiny model trains on seed 0). Each prompt: {"caption",
    "attributes" (only what the caption states), "split": family, "frame", "seed"}; seeds are
    consecutive, so a batch generated with the first one's seed gives each prompt its own.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: use one of {FAMILIES}")
    out = []
    for i in range(n):
        attributes = _draw_attributes(_rng(seed, "train", i), DEFAULT_CONFIG, "train")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLITS.index("train"), i, 2])))
        if family == "template":
            phrased = Phrased(caption_for(attributes), "template", dict.fromkeys(
                ("background", "color", "shape", "size", "position"), True))
        else:
            phrased = phrase(attributes, rng, TRAIN_FRAMES if family == "paraphrase" else HELDOUT_FRAMES,
                             p_position=1.0)
        out.append({"caption": phrased.caption, "attributes": stated_attributes(attributes, phrased.stated),
                    "split": family, "frame": phrased.frame,
                    "seed": seed * 1_000_003 + 7919 * FAMILIES.index(family) + i})
    return out
