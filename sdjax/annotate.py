"""Labelled image grids, as A1111's X/Y/Z plot draws them (`modules/images.draw_grid_annotations`):
column labels above the columns, row labels left of the rows, an optional title line above
all; black text in PIL's default font on white. Cells sit at whole-pixel offsets given by the
returned `GridLayout`, so each cell can be cropped back out unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

PAD = 6


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Where the cells are: left / top margins (px, label space), the cell size, cols x rows."""

    left: int
    top: int
    cell_width: int
    cell_height: int
    cols: int
    rows: int

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of cell (row, col), for `Image.crop`."""
        x0, y0 = self.left + col * self.cell_width, self.top + row * self.cell_height
        return x0, y0, x0 + self.cell_width, y0 + self.cell_height


def _font():
    return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width` px wide (a long word stays whole)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def _line_height(draw: ImageDraw.ImageDraw, font) -> int:
    box = draw.textbbox((0, 0), "Ag", font=font)
    return box[3] - box[1] + 3


def labelled_grid(cells: Sequence[Sequence[Image.Image]], col_labels: Sequence[str] = (),
                  row_labels: Sequence[str] = (), title: str | None = None) -> tuple[Image.Image, GridLayout]:
    """cells[row][col] (PIL images of one size) -> (the annotated RGB grid, its layout).

    col_labels: one per column (or none); row_labels: one per row (or none); title: a line above
    everything (the Z value). Margins are 0 where there are no labels."""
    rows, cols = len(cells), len(cells[0])
    w, h = cells[0][0].size
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font()
    lh = _line_height(scratch, font)
    col_lines = [_wrap(scratch, t, w - PAD, font) for t in col_labels]
    row_lines = [_wrap(scratch, t, max(w, 64), font) for t in row_labels]
    title_lines = _wrap(scratch, title, cols * w, font) if title else []
    left = (max(scratch.textlength(line, font=font) for lines in row_lines for line in lines) + 2 * PAD
            if row_lines else 0)
    left = int(round(left))
    col_block = max((len(lines) for lines in col_lines), default=0) * lh
    top = (len(title_lines) * lh + (PAD if title_lines else 0)) + (col_block + 2 * PAD if col_lines else 0)
    grid = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    y = PAD // 2
    for line in title_lines:
        draw.text((left + (cols * w - draw.textlength(line, font=font)) / 2, y), line, fill="black", font=font)
        y += lh
    for c, lines in enumerate(col_lines):
        y0 = top - PAD - len(lines) * lh
        for k, line in enumerate(lines):
            x = left + c * w + (w - draw.textlength(line, font=font)) / 2
            draw.text((x, y0 + k * lh), line, fill="black", font=font)
    for r, lines in enumerate(row_lines):
        y0 = top + r * h + (h - len(lines) * lh) / 2
        for k, line in enumerate(lines):
            draw.text((left - PAD - draw.textlength(line, font=font), y0 + k * lh), line, fill="black", font=font)
    layout = GridLayout(left, top, w, h, cols, rows)
    for r in range(rows):
        for c in range(cols):
            grid.paste(cells[r][c].convert("RGB"), layout.cell_box(r, c)[:2])
    return grid, layout


__all__ = ["GridLayout", "labelled_grid"]
