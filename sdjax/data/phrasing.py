"""Captions as people write them, for the synthetic shapes: the same attributes, many phrasings.

`caption_for` writes one template ("a large red circle at the left on a blue background").
People type "a red circle on a blue background", "blue background, red box, top-left",
"A small red dot in the top left corner against blue". `phrase(attributes, rng)` writes a
single-shape attributes dict the way people do:

* parts: the object ("a [size] colour shape"), its position and the background; size and
  position are optional (the image still has a size and a position: a caption without them
  asks for any);
* several phrasings per part (`position_phrases`, `background_phrases`): "at the left",
  "on the left", "left", "on the left side", "in the top left corner", "top-left";
  "on a blue background", "blue background", "against blue", "with a blue background";
* synonyms where the picture stays the same: "box" for square, "big" for large, and "dot"
  for a small circle (no size word needed);
* frames that order the parts (`TRAIN_FRAMES`, `HELDOUT_FRAMES`): sentences, "a blue
  background with a red circle", and A1111-style tag lists ("red circle, blue background")
  in any order; articles ("a" / "an"), capitals, commas and a final full stop optional.

Held-out phrasings: the frames in `HELDOUT_FRAMES` never occur in training captions
(`phrase(..., frames=TRAIN_FRAMES)`); they put the same parts, with the same words, in
orders no training caption uses. Every word a held-out caption can contain also occurs in
training captions (tests/test_phrasing.py checks it), so they test word order, not
vocabulary.

Each phrased caption comes with what it states (`Phrased.stated`): the evaluator judges
size and position only where the caption names them. Reading a prompt back
(`parse_prompt`) and the evaluation prompts by phrasing family (`family_prompts`) are in
`sdjax.data.analysis`. This module imports nothing from sdjax (`synthetic` uses it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Words people use where the picture stays the same.
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small",), "large": ("large", "big")}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {"circle": ("circle",), "square": ("square", "box"),
                                           "triangle": ("triangle",)}
DOT = "dot"  # a small circle: "a red dot" states colour, shape and size

# The order of the parts in a caption. Sentence frames use full phrases; tag frames use
# short tags joined by commas. "{obj}" is the object noun phrase, "{pos}" a position
# phrase, "{bg}" a background phrase, "{bgnp}" a background noun phrase ("a blue background").
TRAIN_FRAMES: tuple[str, ...] = (
    "{obj} {pos} {bg}",        # a red circle on the left on a blue background
    "{obj} {bg}",              # a red circle on a blue background
    "{bgnp} with {obj} {pos}",  # a blue background with a red circle at the left
    "{bgnp} with {obj}",       # a blue background with a red circle
    "{obj} {pos}, {bg}",       # a red circle on the left, blue background
    "tags",                    # red circle, left, blue background (parts in any order)
)
HELDOUT_FRAMES: tuple[str, ...] = (
    "{obj} {bg} {pos}",        # a red circle on a blue background at the left
    "{pos}, {obj} {bg}",       # on the left, a red circle against blue
    "{bgnp}, {obj} {pos}",     # a blue background, a red circle in the top left corner
    "{obj} {bg}, {pos}",       # red circle with a blue background, top-left
)
FRAMES = TRAIN_FRAMES + HELDOUT_FRAMES
# Tag lists: these part orders (0 = object, 1 = position, 2 = background) only.
TAG_ORDERS = ((0, 1, 2), (0, 2, 1), (2, 0, 1), (1, 0, 2), (2, 1, 0))


@dataclasses.dataclass(frozen=True)
class Phrased:
    """A caption and what it states: stated[k] for k in background/color/shape/size/position."""

    caption: str
    frame: str
    stated: dict


def position_phrases(position: str) -> tuple[str, ...]:
    """Ways to say a grid position ("top left", "left", "center", ...)."""
    out = [f"at the {position}", f"on the {position}", position]
    if " " in position:  # a corner
        out += [f"in the {position} corner", position.replace(" ", "-"), f"{position} corner"]
    elif position == "center":
        out += ["in the center", "in the middle", "centered"]
    else:
        out += [f"on the {position} side", f"at the {position} side"]
    return tuple(out)


def position_tags(position: str) -> tuple[str, ...]:
    """Short position tags for tag lists."""
    if " " in position:
        return (position, position.replace(" ", "-"), f"{position} corner")
    return (position, "centered", "middle") if position == "center" else (position, f"{position} side")


def background_phrases(color: str) -> tuple[str, ...]:
    """Ways to say the background colour after the object."""
    a = _a(color)
    return (f"on {a} {color} background", f"{color} background", f"against {color}",
            f"with {a} {color} background", f"on {color}", f"against {a} {color} background")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _article(words: list[str], rng) -> list[str]:
    return words if rng.random() < 0.3 else [_a(words[0])] + words


def _object_words(o: dict, with_size: bool, with_color: bool, rng) -> tuple[list[str], bool]:
    """[size] [colour] shape, and whether the words state the size ("dot" does)."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if o["shape"] == "circle" and o["size"] == "small" and rng.random() < 0.35:
        size, noun, states_size = [], DOT, True
    else:
        size = [pick(SIZE_WORDS[o["size"]])] if with_size else []
        noun, states_size = pick(SHAPE_WORDS[o["shape"]]), with_size
    return size + ([o["color"]] if with_color else []) + [noun], states_size


def phrase(attributes: dict, rng: np.random.Generator, frames: tuple[str, ...] = TRAIN_FRAMES, *,
           p_size: float = 0.5, p_position: float = 0.75, p_color: float = 1.0, p_background: float = 1.0,
           frame: str | None = None) -> Phrased:
    """A caption of a single-shape attributes dict (see `sample`) in one of `frames`.

    p_*: probability that the caption states that attribute (a caption without a position,
    colour or background uses a frame without that part). frame: force this frame.
    """
    if len(attributes["objects"]) != 1:
        raise ValueError("phrase() writes single-shape captions; two-shape images use caption_for")
    o = attributes["objects"][0]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    with_size = rng.random() < p_size
    with_pos = rng.random() < p_position
    with_color = rng.random() < p_color
    with_bg = rng.random() < p_background
    if frame is None:
        usable = [f for f in frames if ("{pos}" in f) == with_pos or f == "tags"]
        frame = pick(usable or list(frames))
    with_pos = with_pos if frame == "tags" else "{pos}" in frame
    words, states_size = _object_words(o, with_size, with_color, rng)
    bg = attributes["background"]
    if frame == "tags":
        parts = [" ".join(words), pick(position_tags(o["position"])) if with_pos else None,
                 f"{bg} background" if with_bg else None]
        text = ", ".join(parts[i] for i in pick(TAG_ORDERS) if parts[i] is not None)
    else:
        if not with_bg:  # no background: the object and its position only
            frame = "{obj} {pos}" if with_pos else "{obj}"
        bgnp = f"{bg} background" if rng.random() < 0.3 else f"{_a(bg)} {bg} background"
        text = frame.format(obj=" ".join(_article(words, rng)),
                            pos=pick(position_phrases(o["position"])) if with_pos else "",
                            bg=pick(background_phrases(bg)), bgnp=bgnp)
    text = " ".join(text.split())
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    elif rng.random() < 0.05:
        text = text.title()
    if rng.random() < 0.1:
        text += "."
    stated = {"background": with_bg, "color": with_color, "shape": True, "size": states_size,
              "position": with_pos}
    return Phrased(text, frame, stated)


def stated_attributes(attributes: dict, stated: dict) -> dict:
    """The attributes dict with what the caption does not state left out (for the evaluator)."""
    o = {k: v for k, v in attributes["objects"][0].items() if stated.get(k, True)}
    out = {"objects": [o], **o}
    if stated.get("background", True):
        out["background"] = attributes["background"]
    return out
