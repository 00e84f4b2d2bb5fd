"""`sdjax generate ... --xyz "Sampler: Euler a, DPM++ 2M" "CFG Scale: 4, 7, 10" "Steps: 10, 20"`:
the X/Y/Z plot from the command line. Thin: `sdjax.pipeline.xyz` plans, batches and draws.

Writes into `OUT/xyz-KEY/` (KEY: a hash of the axes and options, so another plot never
replaces this one): every cell as `cell-zZ-yY-xX.png` with its own infotext, and one
`grid-zZ.png` per Z value whose infotext is the first cell's plus A1111's "Script: X/Y/Z plot,
X Type, X Values, ..." pairs. All PNGs get the XMP digital source type and, unless
--no-watermark, the invisible watermark (the cells before the grid is drawn).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from sdjax import watermark
from sdjax.errors import UsageError
from sdjax.images import save_png
from sdjax.metadata import provenance_xmp
from sdjax.pipeline import xyz


def add_xyz_argument(s: argparse.ArgumentParser) -> None:
    s.add_argument("--xyz", nargs="+", metavar="AXIS",
                   help="X/Y/Z plot: one to three 'LABEL: v1, v2, ...' axes in A1111's names and range syntax "
                        "(Seed, Steps, CFG Scale, Sampler, Schedule type, Prompt S/R, Negative prompt, ...)")


def plan_xyz(o: dict, base: dict, single_file: bool, check: Callable[[dict], None]) -> list[xyz.Cell]:
    """The plot's cells, each checked as a request (`check`) before any model loads."""
    if single_file:
        raise UsageError("--xyz writes a folder of cells and grids: --out must be a folder, not a .png file")
    if o.get("prompts_file"):
        raise UsageError("--xyz cannot be combined with --prompts-file")
    if (o.get("batch_size") or 1) > 1 or (o.get("batch_count") or 1) > 1:
        raise UsageError("--xyz makes one image per cell: drop --batch-size / --batch-count")
    cells = xyz.plan(base, [xyz.parse_axis(s) for s in o["xyz"]])
    for cell in cells:
        check(cell.options)
    return cells


def run_xyz(generate: Callable, o: dict, base: dict, out: Path) -> list[Path]:
    """Run the plot through `generate` and write its files; returns the written paths."""
    key = hashlib.sha256(json.dumps([o["xyz"], sorted((k, repr(v)) for k, v in base.items())]).encode())
    folder = out / f"xyz-{key.hexdigest()[:12]}"
    result = xyz.run(generate, base, o["xyz"])
    xmp, paths = provenance_xmp(), []
    try:
        for cell, image, info in zip(result.cells, result.images, result.infotexts):
            paths.append(save_png(image, folder / f"cell-z{cell.z}-y{cell.y}-x{cell.x}.png", info, exclusive=True,
                                  xmp=xmp))
        for iz, (grid, _, info) in enumerate(result.grids):
            if o.get("watermark", True):
                grid = watermark.apply_watermark([grid])[0]
            paths.append(save_png(grid, folder / f"grid-z{iz}.png", info, exclusive=True, xmp=xmp))
    except FileExistsError as e:
        raise UsageError(f"{os.fspath(e.filename or folder)} exists (the same plot was made before); remove "
                         f"{os.fspath(folder)} to make it again") from None
    return paths


__all__ = ["add_xyz_argument", "plan_xyz", "run_xyz"]
