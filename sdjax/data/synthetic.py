"""Procedurally drawn, captioned shape images: the training data of sdjax's tiny model.

Each image shows one (or, optionally, two) filled shapes on a flat background:

* shapes: circle, square, triangle (equilateral-ish, apex up);
* colours: 8 saturated colours far apart in RGB (the closest pair, orange/yellow,
  is ~100 apart); the background colour is drawn from the same palette but is
  always different from every shape colour in the image;
* sizes: small (extent 0.24 of the image side) and large (0.40): at 64 px a small
  shape is ~15 px, two latent pixels of an 8x-downsampling VAE, about the least a
  tiny model can still draw as a recognisable shape;
* positions: a 3x3 grid of centres at 0.2 / 0.5 / 0.8 of the width and height
  ("top left", "top", "top right", "left", "center", "right", "bottom left",
  "bottom", "bottom right"); a shape's bounding box is centred there, so two small
  shapes in neighbouring cells never touch (gap 0.06 of the side).

Captions: "a small red circle at the top left on a blue background"; for two
shapes (both small, in two different cells): "a red circle and a green square
on a blue background" (positions are omitted; `SyntheticConfig.two_shape_positions`
adds them: "a red circle at the top left and a green square at the right on ...").

Held-out combinations: certain (shape colour, background colour, shape) triples
(`SyntheticConfig.heldout`) never occur in `split="train"`; `split="heldout"`
produces only images whose (first) shape uses a held-out triple. Every single
colour, shape, background, and every pair of them still occurs in training, so a
model that composes attributes can render the held-out triples.

Everything is a pure function of (config, seed, split, index): `sample` is
deterministic across processes and platforms (NumPy PCG64 + PIL drawing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from sdjax.data.phrasing import TRAIN_FRAMES, phrase

# Far apart in RGB on purpose: a tiny model and a nearest-colour classifier must
# both tell them apart even after VAE blur.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (20, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (250, 230, 20),
    "purple": (140, 30, 170),
    "orange": (255, 130, 0),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Extent (bounding-box side) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.24, "large": 0.40}
# Bounding-box centre as (x, y) fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.2, 0.2),
    "top": (0.5, 0.2),
    "top right": (0.8, 0.2),
    "left": (0.2, 0.5),
    "center": (0.5, 0.5),
    "right": (0.8, 0.5),
    "bottom left": (0.2, 0.8),
    "bottom": (0.5, 0.8),
    "bottom right": (0.8, 0.8),
}
SPLITS = ("train", "heldout")
CAPTION_STYLES = ("template", "varied")


def default_heldout(colors: tuple[str, ...] = tuple(PALETTE), shapes: tuple[str, ...] = SHAPES
                    ) -> tuple[tuple[str, str, str], ...]:
    """Two held-out (shape colour, background colour, shape) triples per colour.

    For the 8-colour palette, colour i is held out on background i+3 with shape i,
    and on background i+5 with shape i+1 (indices modulo the palette / shape count).
    No (colour, background) pair loses all its shapes (given >= 3 shapes), so every
    pair of attributes is still seen in training.
    """
    n, m = len(colors), len(shapes)
    offsets = (1 + 2 % (n - 1), 1 + 4 % (n - 1))  # (3, 5) for 8 colours; never 0
    out = []
    for i, color in enumerate(colors):
        for k, offset in enumerate(offsets):
            triple = (color, colors[(i + offset) % n], shapes[(i + k) % m])
            if triple not in out:
                out.append(triple)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What the generator may draw. Defaults are the tiny model's training set.

    resolution: image side in pixels (square images, any size >= 16).
    colors / shapes / sizes / positions: names, each looked up in the module tables.
    two_shape_prob: probability that an image shows two (small) shapes.
    two_shape_positions: whether two-shape captions name the positions.
    antialias: draw at 4x and downsample (edges get blended colours).
    jitter: max random offset of a shape's centre, as a fraction of the side.
    heldout: (colour, background, shape) triples excluded from the train split;
      None means `default_heldout(colors, shapes)`.
    captions: "template" (every caption by `caption_for`) or "varied": single-shape
      captions as people write them (`sdjax.data.phrasing`, training frames only), except
      a `template_fraction` of them, which keep the template. Images do not depend on it.
    """

    resolution: int = 64
    colors: tuple[str, ...] = tuple(PALETTE)
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = tuple(SIZES)
    positions: tuple[str, ...] = tuple(POSITIONS)
    two_shape_prob: float = 0.0
    two_shape_positions: bool = False
    antialias: bool = False
    jitter: float = 0.0
    heldout: tuple[tuple[str, str, str], ...] | None = None
    captions: str = "template"
    template_fraction: float = 0.3

    def __post_init__(self):
        if self.captions not in CAPTION_STYLES:
            raise ValueError(f"SyntheticConfig.captions={self.captions!r}: use one of {CAPTION_STYLES}")
        if not 0.0 <= self.template_fraction <= 1.0:
            raise ValueError(f"SyntheticConfig.template_fraction={self.template_fraction}: must be in [0, 1]")
        for name, values, table in (("colors", self.colors, PALETTE), ("shapes", self.shapes, SHAPES),
                                    ("sizes", self.sizes, SIZES), ("positions", self.positions, POSITIONS)):
            unknown = [v for v in values if v not in table]
            if unknown or not values:
                raise ValueError(f"SyntheticConfig.{name}={values!r}: unknown {unknown}; "
                                 f"supported: {list(table)}")
        if len(self.colors) < 2 or (self.two_shape_prob > 0 and len(self.colors) < 3):
            raise ValueError("SyntheticConfig.colors needs 2 colours (3 with two-shape images)")
        if self.two_shape_prob > 0 and len(self.positions) < 2:
            raise ValueError("two-shape images need at least 2 positions")
        if self.resolution < 16:
            raise ValueError(f"SyntheticConfig.resolution={self.resolution}: use >= 16")
        if self.heldout is None:
            object.__setattr__(self, "heldout", default_heldout(self.colors, self.shapes))
        for triple in self.heldout:
            if (len(triple) != 3 or triple[0] == triple[1] or triple[0] not in self.colors
                    or triple[1] not in self.colors or triple[2] not in self.shapes):
                raise ValueError(f"held-out triple {triple!r} must be (colour, other background colour, shape) "
                                 f"from colors={self.colors} and shapes={self.shapes}")
        object.__setattr__(self, "heldout", tuple(tuple(t) for t in self.heldout))

    @classmethod
    def from_dict(cls, d: dict) -> "SyntheticConfig":
        """From JSON-style data (lists become tuples); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"SyntheticConfig: unknown keys {unknown}; supported: {sorted(names)}")
        tuples = lambda v: tuple(tuples(x) for x in v) if isinstance(v, list | tuple) else v  # noqa: E731
        return cls(**{k: tuples(v) for k, v in d.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def is_heldout(self, attributes: dict) -> bool:
        """Whether an attributes dict (as `sample` returns) uses a held-out triple."""
        held = set(self.heldout)
        return any((o["color"], attributes["background"], o["shape"]) in held
                   for o in attributes["objects"])


DEFAULT_CONFIG = SyntheticConfig()


def caption_for(attributes: dict, config: SyntheticConfig = DEFAULT_CONFIG) -> str:
    """The caption of an attributes dict (see `sample`)."""
    objects = attributes["objects"]
    background = f"on a {attributes['background']} background"
    if len(objects) == 1:
        o = objects[0]
        return f"a {o['size']} {o['color']} {o['shape']} at the {o['position']} {background}"
    parts = []
    for o in objects:
        text = f"a {o['color']} {o['shape']}"
        if config.two_shape_positions:
            text += f" at the {o['position']}"
        parts.append(text)
    return " and ".join(parts) + " " + background


def caption_vocabulary(config: SyntheticConfig = DEFAULT_CONFIG) -> list[str]:
    """Every word any caption of `config` can contain, sorted."""
    words = {"a", "at", "the", "on", "background", "and"}
    for group in (config.colors, config.shapes, config.sizes, config.positions):
        for name in group:
            words.update(name.split())
    return sorted(words)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    if index < 0 or seed < 0:
        raise ValueError(f"seed={seed}, index={index}: both must be >= 0")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLITS.index(split), index])))


def _draw_attributes(rng: np.random.Generator, config: SyntheticConfig, split: str) -> dict:
    two = config.two_shape_prob > 0 and rng.random() < config.two_shape_prob
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if split == "heldout" and not config.heldout:
        raise ValueError("split='heldout' needs SyntheticConfig.heldout triples; the config has none")
    while True:  # rejection sampling; the expected number of rounds is ~1.1
        if split == "heldout":
            color, background, shape = pick(config.heldout)
        else:
            color, shape = pick(config.colors), pick(config.shapes)
            background = pick([c for c in config.colors if c != color])
        objects = [{"shape": shape, "color": color,
                    "size": "small" if two and "small" in config.sizes else pick(config.sizes),
                    "position": pick(config.positions)}]
        if two:
            second_colors = [c for c in config.colors if c not in (color, background)]
            objects.append({"shape": pick(config.shapes), "color": pick(second_colors),
                            "size": objects[0]["size"],
                            "position": pick([p for p in config.positions if p != objects[0]["position"]])})
        attributes = {"background": background, "objects": objects}
        if split == "heldout" or not config.is_heldout(attributes):
            break
    if not two:  # flat copies for the common single-shape case
        attributes.update(objects[0])
    attributes["split"] = split
    return attributes


def _shape_polygon(shape: str, cx: float, cy: float, extent: float):
    """PIL xy for a shape whose bounding box (side `extent`) is centred at (cx, cy)."""
    h = extent / 2
    if shape in ("circle", "square"):
        return [cx - h, cy - h, cx + h, cy + h]
    return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]  # apex up, base = height


def render(attributes: dict, config: SyntheticConfig = DEFAULT_CONFIG,
           offsets: list[tuple[float, float]] | None = None) -> Image.Image:
    """Draw an attributes dict as an RGB PIL image of side `config.resolution`.

    offsets: per-object centre offsets in fractions of the side (jitter).
    """
    scale = 4 if config.antialias else 1
    side = config.resolution * scale
    image = Image.new("RGB", (side, side), PALETTE[attributes["background"]])
    draw = ImageDraw.Draw(image)
    for k, o in enumerate(attributes["objects"]):
        fx, fy = POSITIONS[o["position"]]
        if offsets is not None:
            fx, fy = fx + offsets[k][0], fy + offsets[k][1]
        # Pixel centres sit at i + 0.5; shift so the drawn box is centred on fx * side.
        xy = _shape_polygon(o["shape"], fx * side - 0.5, fy * side - 0.5, SIZES[o["size"]] * side)
        fill = PALETTE[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse(xy, fill=fill)
        elif o["shape"] == "square":
            draw.rectangle(xy, fill=fill)
        else:
            draw.polygon(xy, fill=fill)
    if scale > 1:
        image = image.resize((config.resolution, config.resolution), Image.Resampling.BOX)
    return image


def sample(seed: int, index: int, split: str = "train", config: SyntheticConfig = DEFAULT_CONFIG
           ) -> tuple[Image.Image, str, dict]:
    """The `index`-th image of the (seed, split) stream: (RGB PIL image, caption, attributes).

    attributes: {"background": colour, "objects": [{"shape", "color", "size", "position"}, ...],
    "split": split}, plus the object's keys at top level when there is a single shape.
    Deterministic in (seed, index, split, config); independent of any other index.
    """
    rng = _rng(seed, split, index)
    attributes = _draw_attributes(rng, config, split)
    offsets = None
    if config.jitter > 0:
        offsets = [tuple(rng.uniform(-config.jitter, config.jitter, size=2)) for _ in attributes["objects"]]
    return render(attributes, config, offsets), _caption(attributes, config, seed, split, index), attributes


def _caption(attributes: dict, config: SyntheticConfig, seed: int, split: str, index: int) -> str:
    """The caption of sample (seed, split, index): its own random stream, so images never change."""
    if config.captions == "template" or len(attributes["objects"]) != 1:
        return caption_for(attributes, config)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLITS.index(split), index, 1])))
    if rng.random() < config.template_fraction:
        return caption_for(attributes, config)
    return phrase(attributes, rng, TRAIN_FRAMES, p_color=0.95, p_background=0.95).caption


class SyntheticShapes:
    """A finite, indexable view of the synthetic stream.

    `ds[i]` -> {"image": uint8 HWC RGB array, "caption": str, "attributes": dict};
    the same (seed, split, config) always gives the same items.
    """

    def __init__(self, length: int, seed: int = 0, split: str = "train",
                 config: SyntheticConfig = DEFAULT_CONFIG):
        _rng(seed, split, 0)  # validates seed and split early
        self.length, self.seed, self.split, self.config = int(length), seed, split, config

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} synthetic images")
        index %= self.length
        image, caption, attributes = sample(self.seed, index, self.split, self.config)
        return {"image": np.asarray(image, dtype=np.uint8), "caption": caption, "attributes": attributes}

    def __iter__(self) -> Iterator[dict]:
        for i in range(self.length):
            yield self[i]
