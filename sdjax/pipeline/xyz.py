"""X/Y/Z plot (A1111 `scripts/xyz_grid.py`): axes of values -> cells -> as few compiled calls as
the axes allow -> one labelled grid per Z value.

Axes are written as A1111 writes them, "LABEL: v1, v2, ..." with A1111's (case-insensitive)
labels and its range syntax: for whole numbers `1-5` (1..5), `1-5 (+2)` (1, 3, 5), `10-1 (-3)`
(10, 7, 4: A1111 adds 1 to the end whatever the step's sign),
`1-10 [5]` (5 values spread evenly, made whole); for decimals `4-10 (+2.5)` and `4-10 [4]`;
values are comma separated (CSV: quote a value holding a comma).

Every cell is one image with the base options, changed by its X, Y and Z values. Cells whose
options differ only in per-image values -- seed, CFG scale, prompt (Prompt S/R), negative
prompt -- run as one batch through one compiled call (`Request` takes per-image seeds and CFG
scales); any other difference (sampler, steps, schedule, size, ...) is another call
(`group_cells`). As in A1111 every cell has the same seed unless Seed is an axis.

The grid of Z value k has the X values as columns and the Y values as rows
(`sdjax.annotate.labelled_grid`); its infotext is the first cell's with A1111's "Script",
"X Type", "X Values", ... pairs appended (A1111 stores the same in its grid PNG). Cells keep
their own infotexts (A1111 saves each cell's image as a normal sample).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from sdjax.annotate import GridLayout, labelled_grid
from sdjax.errors import UsageError
from sdjax.metadata import quote

# Options that may differ between the images of one batch (one compiled call).
PER_IMAGE = ("seed", "cfg_scale", "prompt", "negative_prompt")


@dataclasses.dataclass(frozen=True)
class Axis:
    """label: A1111's; kind: int, float or str; option: the generate option it sets ("" for the
    special Prompt S/R and Size); labelled: cells are captioned "Label: value" (else the value)."""

    label: str
    kind: type
    option: str
    aliases: tuple[str, ...] = ()
    labelled: bool = True


AXES = (
    Axis("Nothing", str, ""),
    Axis("Seed", int, "seed"),
    Axis("Var. seed", int, "subseed", ("variation seed",)),
    Axis("Var. strength", float, "subseed_strength", ("variation strength",)),
    Axis("Steps", int, "steps"),
    Axis("CFG Scale", float, "cfg_scale"),
    Axis("Prompt S/R", str, "", ("prompt sr",), labelled=False),
    Axis("Negative prompt", str, "negative_prompt", labelled=False),
    Axis("Sampler", str, "sampler", ("sampler name",), labelled=False),
    Axis("Schedule type", str, "schedule", ("scheduler", "schedule")),
    Axis("Denoising", float, "strength", ("denoising strength",)),
    Axis("Size", str, ""),
    Axis("Clip skip", int, "clip_skip"),
    Axis("Eta", float, "eta"),
)


def _key(name: str) -> str:
    return re.sub(r"[\s_.]+", " ", name.strip().lower()).strip()


_BY_NAME = {_key(n): a for a in AXES for n in (a.label, *a.aliases)}

_INT_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_INT_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*\])?\s*")
_FLOAT_RANGE = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_FLOAT_COUNT = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)(?:\s*\[(\d+(?:\.\d*)?)\s*\])?\s*")


def _num(text: str, kind: type):
    return kind(text.replace(" ", ""))


def parse_values(axis: Axis, text: str) -> list:
    """A1111's value list: CSV items, int / float ranges expanded, each converted to the axis's kind."""
    items = [v.strip() for v in next(csv.reader(io.StringIO(text), skipinitialspace=True), []) if v.strip()]
    out: list = []
    for item in items:
        if axis.kind is int:
            m, mc = _INT_RANGE.fullmatch(item), _INT_COUNT.fullmatch(item)
            if m is not None:
                step = int(m.group(3)) if m.group(3) is not None else 1
                out += list(range(_num(m.group(1), int), _num(m.group(2), int) + 1, step))
                continue
            if mc is not None:
                num = int(mc.group(3)) if mc.group(3) is not None else 1
                out += [int(v) for v in np.linspace(_num(mc.group(1), int), _num(mc.group(2), int), num).tolist()]
                continue
        elif axis.kind is float:
            m, mc = _FLOAT_RANGE.fullmatch(item), _FLOAT_COUNT.fullmatch(item)
            if m is not None:
                start, end = _num(m.group(1), float), _num(m.group(2), float)
                step = float(m.group(3)) if m.group(3) is not None else 1.0
                out += np.arange(start, end + step, step).tolist()
                continue
            if mc is not None:
                num = int(float(mc.group(3))) if mc.group(3) is not None else 1
                out += np.linspace(_num(mc.group(1), float), _num(mc.group(2), float), num).tolist()
                continue
        try:
            out.append(axis.kind(item) if axis.kind is not str else item)
        except ValueError:
            raise UsageError(f"X/Y/Z axis {axis.label!r}: {item!r} is not a {axis.kind.__name__} "
                             f"(ranges: 1-5, 1-5 (+2), 1-10 [5])") from None
    if not out:
        raise UsageError(f"X/Y/Z axis {axis.label!r} has no values")
    if axis.label == "Size":
        for v in out:
            if not re.fullmatch(r"\d+x\d+", v):
                raise UsageError(f"X/Y/Z axis Size: {v!r} is not WIDTHxHEIGHT (e.g. 512x768)")
    return out


def parse_axis(spec: str) -> tuple[Axis, list]:
    """"LABEL: values" -> (the axis, its values). UsageError names unknown labels and bad values."""
    if ":" not in spec:
        raise UsageError(f"--xyz {spec!r}: write an axis as 'LABEL: v1, v2, ...' (e.g. 'CFG Scale: 4, 7, 10')")
    name, values = spec.split(":", 1)
    axis = _BY_NAME.get(_key(name))
    if axis is None:
        raise UsageError(f"--xyz: unknown axis {name.strip()!r}; axes: {', '.join(a.label for a in AXES)}")
    return axis, parse_values(axis, values)


def _fmt(value) -> str:
    return str(round(value, 8)) if isinstance(value, float) else str(value)


def caption(axis: Axis, value) -> str:
    """The cell label A1111 draws: "Label: value", or the bare value (Sampler, Prompt S/R, ...)."""
    return _fmt(value) if not axis.labelled else f"{axis.label}: {_fmt(value)}"


def apply_value(options: dict, axis: Axis, value, first) -> dict:
    """options with the axis set to value. Prompt S/R replaces its first value (`first`) in the
    prompt and negative prompt (A1111: an error when neither contains it)."""
    options = dict(options)
    if axis.label == "Nothing":
        return options
    if axis.label == "Prompt S/R":
        prompt, negative = options.get("prompt", ""), options.get("negative_prompt", "") or ""
        if first not in prompt and first not in negative:
            raise UsageError(f"Prompt S/R did not find {first!r} in the prompt or the negative prompt")
        options["prompt"], options["negative_prompt"] = prompt.replace(first, value), negative.replace(first, value)
    elif axis.label == "Size":
        options["width"], options["height"] = (int(v) for v in value.split("x"))
    else:
        options[axis.option] = value
    return options


@dataclasses.dataclass(frozen=True)
class Cell:
    """One image of the plot: its (x, y, z) indices and complete generate options."""

    x: int
    y: int
    z: int
    options: dict


def plan(base: dict, axes: Sequence[tuple[Axis, list]]) -> list[Cell]:
    """Cells in A1111's order (z, then y, then x). axes: up to three (axis, values), X first;
    missing ones are "Nothing"."""
    if not 1 <= len(axes) <= 3:
        raise UsageError(f"--xyz takes one to three axes (X, Y, Z), got {len(axes)}")
    axes = list(axes) + [(_BY_NAME["nothing"], [""])] * (3 - len(axes))
    cells = []
    for iz, vz in enumerate(axes[2][1]):
        for iy, vy in enumerate(axes[1][1]):
            for ix, vx in enumerate(axes[0][1]):
                options = dict(base)
                for (axis, values), v in zip(axes, (vx, vy, vz)):
                    options = apply_value(options, axis, v, values[0])
                cells.append(Cell(ix, iy, iz, options))
    return cells


def group_cells(cells: Sequence[Cell], max_batch: int = 8) -> list[list[Cell]]:
    """Cells that may run as one batch (equal options but for PER_IMAGE), in chunks of at most
    max_batch, in first-appearance order."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        key = tuple(sorted((k, repr(v)) for k, v in cell.options.items() if k not in PER_IMAGE))
        groups.setdefault(key, []).append(cell)
    return [g[i:i + max_batch] for g in groups.values() for i in range(0, len(g), max_batch)]


def batch_options(group: Sequence[Cell]) -> dict:
    """generate options for one group: shared options, per-image lists (batch_size = len)."""
    options = dict(group[0].options)
    if len(group) > 1:
        for k in PER_IMAGE:
            options[k] = [c.options.get(k, "" if k == "negative_prompt" else None) for c in group]
        options["seeds"], options["seed"] = options["seed"], options["seed"][0]  # `Request.seeds`
        options["batch_size"] = len(group)
    return options


@dataclasses.dataclass
class XYZResult:
    """cells: in plan order; images, infotexts: per cell; grids: per Z value (image, layout,
    infotext); calls: how many generate calls ran."""

    cells: list[Cell]
    images: list[Image.Image]
    infotexts: list[str]
    grids: list[tuple[Image.Image, GridLayout, str]]
    calls: int


def script_params(axes: Sequence[tuple[Axis, list]], specs: Sequence[str]) -> str:
    """A1111's grid parameters: Script: X/Y/Z plot, X Type: ..., X Values: ..., per axis given."""
    parts = ["Script: X/Y/Z plot"]
    for letter, (axis, _), spec in zip("XYZ", axes, specs):
        parts += [f"{letter} Type: {quote(axis.label)}", f"{letter} Values: {quote(spec.split(':', 1)[1].strip())}"]
    return ", ".join(parts)


def run(generate: Callable[..., Any], base: dict, specs: Sequence[str], *, max_batch: int = 8) -> XYZResult:
    """Parse `specs` ("LABEL: values", X first), run every cell through `generate(**options)`
    (a `Pipeline.generate`-like function returning .images and .infotexts) group by group, and
    draw one grid per Z value."""
    axes = [parse_axis(s) for s in specs]
    cells = plan(base, axes)
    by_cell: dict[int, tuple[Image.Image, str]] = {}
    index = {id(c): i for i, c in enumerate(cells)}
    groups = group_cells(cells, max_batch)
    for group in groups:
        result = generate(**batch_options(group))
        for cell, image, info in zip(group, result.images, result.infotexts):
            by_cell[index[id(cell)]] = (image, info)
    images = [by_cell[i][0] for i in range(len(cells))]
    infotexts = [by_cell[i][1] for i in range(len(cells))]
    full = axes + [(_BY_NAME["nothing"], [""])] * (3 - len(axes))
    nx, ny, nz = (len(v) for _, v in full)
    grids = []
    extra = script_params(axes, specs)
    for iz in range(nz):
        rows = [[images[(iz * ny + iy) * nx + ix] for ix in range(nx)] for iy in range(ny)]
        col_labels = [caption(full[0][0], v) for v in full[0][1]]
        row_labels = [caption(full[1][0], v) for v in full[1][1]] if len(axes) > 1 else []
        title = caption(full[2][0], full[2][1][iz]) if len(axes) > 2 else None
        grid, layout = labelled_grid(rows, col_labels, row_labels, title)
        grids.append((grid, layout, f"{infotexts[iz * ny * nx]}, {extra}"))
    return XYZResult(cells, images, infotexts, grids, len(groups))


__all__ = ["AXES", "Axis", "Cell", "PER_IMAGE", "XYZResult", "apply_value", "batch_options", "caption",
           "group_cells", "parse_axis", "parse_values", "plan", "run", "script_params"]
