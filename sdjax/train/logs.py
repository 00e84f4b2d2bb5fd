"""Training logs a user wants: loss as JSONL, and a PNG loss plot (drawn with PIL, no matplotlib)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw


class MetricsLog:
    """Appends one JSON object per logged step to `<dir>/metrics.jsonl`.

    On resume, records at or after the resumed step are dropped first, so the file
    reads as if the run had never stopped.
    """

    def __init__(self, directory: str | Path, resume_step: int = 0):
        self.path = Path(directory) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in self.read() if r["step"] <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        return records

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def plot_loss(records: list[dict], path: str | Path, size=(640, 360), key: str = "loss") -> None:
    """Draw loss against step (log-scaled loss axis) into a PNG, written atomically."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    pts = [(r["step"], r[key]) for r in records if key in r and r[key] > 0 and math.isfinite(r[key])]
    margin = 40
    draw.rectangle([margin, 10, w - 10, h - margin], outline="black")
    draw.text((margin, h - margin + 8), f"step ->   {key} (log scale)", fill="black")
    if len(pts) >= 2:
        s0, s1 = pts[0][0], pts[-1][0]
        ys = [math.log10(v) for _, v in pts]
        y0, y1 = min(ys), max(ys)
        span_s, span_y = max(s1 - s0, 1), max(y1 - y0, 1e-6)
        xy = [(margin + (s - s0) / span_s * (w - margin - 10),
               10 + (y1 - y) / span_y * (h - margin - 10)) for (s, _), y in zip(pts, ys)]
        draw.line(xy, fill="navy", width=2)
        draw.text((2, 10), f"{10 ** y1:.3g}", fill="black")
        draw.text((2, h - margin - 10), f"{10 ** y0:.3g}", fill="black")
        draw.text((w - 80, h - margin + 8), f"{s1}", fill="black")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
