"""Prompts-file runs: one image file per (line, batch, index), resumable, with a manifest.

A prompts file holds one prompt per line, or JSON objects (JSONL) with per-line options
(`{"prompt": ..., "negative_prompt": ..., "seed": ..., "steps": ..., ...}`, any keyword of
`Pipeline.generate`). Blank lines and lines starting with `#` are skipped.

Every image is written atomically (`images.save_png`) as `NNNNN-SEED.png` in the output
folder, and a line is appended to `manifest.jsonl` after it. A rerun skips images whose
file exists and reads back (a crash between the PNG and its manifest line is repaired by
re-adding the line), so an interrupted run, rerun, ends with each image exactly once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdjax.errors import SdjaxError
from sdjax.images import append_jsonl, make_grid, read_infotext, read_jsonl, save_png

MANIFEST = "manifest.jsonl"


class BatchError(SdjaxError, ValueError):
    """A malformed prompts file or an unusable output folder."""


@dataclass
class Job:
    """One generate call: `options` for `Pipeline.generate`, the files of its images."""

    line: int
    options: dict[str, Any]
    names: list[str] = field(default_factory=list)


def read_prompts_file(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """[(line number, options)] from a plain or JSONL prompts file (see the module docstring)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise BatchError(f"cannot read prompts file {os.fspath(path)!r}: {e}") from e
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                options = json.loads(line)
            except ValueError as e:
                raise BatchError(f"{os.fspath(path)} line {number}: not valid JSON: {e}") from e
            if not isinstance(options.get("prompt"), str):
                raise BatchError(f"{os.fspath(path)} line {number}: a JSON line needs a \"prompt\" string")
        else:
            options = {"prompt": line}
        out.append((number, options))
    if not out:
        raise BatchError(f"prompts file {os.fspath(path)!r} has no prompts")
    return out


def plan(entries, defaults: dict[str, Any], batch_count: int = 1) -> list[Job]:
    """Expand prompts into jobs: each line runs `batch_count` batches of `batch_size`.

    Seeds: a line without its own seed continues from the previous image's seed (A1111's
    "seed + i" across the whole run), so a rerun gives every file the same name and content.
    """
    jobs, index = [], 0
    next_seed = int(defaults.get("seed", 0))
    for number, line_options in entries:
        options = {**defaults, **line_options}
        size = int(options.get("batch_size", 1))
        seed = int(line_options["seed"]) if "seed" in line_options else next_seed
        for b in range(int(options.pop("batch_count", batch_count))):
            job_options = {**options, "seed": seed + b * size}
            names = [f"{index + i:05d}-{seed + b * size + i}.png" for i in range(size)]
            index += size
            jobs.append(Job(number, job_options, names))
        next_seed = seed + size * int(options.get("batch_count", batch_count))
    return jobs


def _complete(path: Path) -> bool:
    try:
        return read_infotext(path) is not None
    except SdjaxError:
        return False


def check_output_folder(out: Path, create: bool = True) -> None:
    """Check that `out` can be written (BatchError otherwise); create it when `create`.

    With create=False nothing is made: the nearest existing ancestor must be a writable folder,
    so a run that fails later (a bad model) leaves no empty output folder behind."""
    out = Path(out)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BatchError(f"output folder {os.fspath(out)!r} is not writable ({os.fspath(probe)!r} is not a "
                         "writable folder)")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BatchError(f"cannot create output folder {os.fspath(out)!r}: {e}") from e


def run_jobs(generate: Callable[..., Any], jobs: list[Job], out: Path, *, grid: bool = False,
             on_image: Callable[[str, bool], None] | None = None) -> list[Path]:
    """Run the jobs whose images are missing; returns the paths of all images, in order.

    generate(**options) -> result with .images and .infotexts. on_image(name, skipped) reports
    progress. The manifest gets one record per image: file, line, seed, prompt, infotext.
    """
    check_output_folder(out)
    manifest = out / MANIFEST
    recorded = {r.get("file") for r in read_jsonl(manifest)} if manifest.exists() else set()
    paths = []
    for job in jobs:
        targets = [out / n for n in job.names]
        if all(_complete(p) for p in targets):
            for name, p in zip(job.names, targets):
                if name not in recorded:  # killed between the PNG and its manifest line
                    append_jsonl(manifest, {"file": name, "line": job.line, "infotext": read_infotext(p)})
                    recorded.add(name)
                if on_image:
                    on_image(name, True)
            paths += targets
            continue
        result = generate(**job.options)
        for i, (name, p) in enumerate(zip(job.names, targets)):
            save_png(result.images[i], p, result.infotexts[i])
            if name not in recorded:
                append_jsonl(manifest, {"file": name, "line": job.line, "seed": result.seeds[i],
                                        "prompt": job.options.get("prompt"), "infotext": result.infotexts[i]})
                recorded.add(name)
            if on_image:
                on_image(name, False)
        paths += targets
    if grid and paths:
        from PIL import Image

        save_png(make_grid([Image.open(p) for p in paths]), out / "grid.png")
    return paths
