"""Prompts-file runs: one image file per (line, batch, index), resumable, with a manifest.

A prompts file holds one prompt per line, or JSON objects (JSONL) with per-line options
(`{"prompt": ..., "negative_prompt": ..., "seed": ..., "steps": ..., ...}`, any keyword of
`Pipeline.generate`). Blank lines and lines starting with `#` are skipped.

Every image is written atomically and exclusively (`images.save_png(exclusive=True)`: an
existing file is never replaced) as `NNNNN-SEED-KEY.png` in the output folder, where KEY is
`request_key`: a hash of everything that makes the image (model identity, prompt, negative
prompt, sampler, schedule, steps, CFG, size, seed, strength, networks, init image file...).
Two different requests therefore never share a file name, whichever runs write into the
folder at once; a rerun reuses an existing image only when its request is identical (same
name), and a changed request makes a new file. A line is appended to `manifest.jsonl` after
each image, under a file lock and only if that file has no record yet, so concurrent runs
(even identical ones) leave one record per file. A rerun skips images whose file exists and
reads back (a crash between the PNG and its manifest line is repaired by re-adding the
line), so an interrupted run, rerun, ends with each image exactly once. A SIGINT / SIGTERM
is held while an image and its record are written (`sdjax.interrupt.critical`); a SIGKILL
mid-write leaves a temp file beside the image, removed once the image is written.

Many hosts: `host_share(jobs, index, count)` gives host `index` of `count` a contiguous block
of the run's images in their global order (host h: images [h*N//count, (h+1)*N//count)), so
the hosts together make every image exactly once; a job cut by a block edge becomes a smaller
job with the same seeds (image i of a batch depends only on its own seed). Each host appends
to its own manifest (`manifest_name`), since a manifest has one writer; a rerun reads all of
them and, as above, skips the images already written by any host.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdjax.errors import BatchError, SdjaxError
from sdjax.images import append_jsonl, make_grid, read_infotext, read_jsonl, remove_stale_temp_files, save_png
from sdjax.interrupt import critical

MANIFEST = "manifest.jsonl"


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


# Options that do not change an image (where it runs, how progress is shown, limits).
_NOT_IN_KEY = ("batch_size", "batch_count", "devices", "fsdp", "mesh", "progress", "limits")


def _file_identity(value: Any) -> Any:
    """A path option as (path, size, mtime): an edited init image or mask is a new request."""
    if isinstance(value, (str, os.PathLike)) and Path(value).is_file():
        st = Path(value).stat()
        return [os.fspath(Path(value).resolve()), st.st_size, st.st_mtime_ns]
    return value


def request_key(options: dict[str, Any], index: int = 0, identity: str = "") -> str:
    """12 hex digits naming image `index` of a job with `options` made by model `identity`:
    equal exactly when everything that makes that image is equal (`seed + index`, the
    index-th prompt of a list, ...), independent of batch size and devices."""
    one = {k: v for k, v in options.items() if k not in _NOT_IN_KEY}
    one["seed"] = int(options.get("seed", 0)) + index
    if one.get("subseed") is not None:
        one["subseed"] = int(one["subseed"]) + index
    for k in ("prompt", "negative_prompt"):
        if isinstance(one.get(k), (list, tuple)):
            one[k] = list(one[k])[index]
    for k in ("init_image", "mask", "image"):
        if k in one:
            one[k] = _file_identity(one[k])
    text = json.dumps({"model": identity, "options": one}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def plan(entries, defaults: dict[str, Any], batch_count: int = 1, identity: str = "") -> list[Job]:
    """Expand prompts into jobs: each line runs `batch_count` batches of `batch_size`.

    Seeds: a line without its own seed continues from the previous image's seed (A1111's
    "seed + i" across the whole run), so a rerun gives every file the same name and content.
    identity: the model's identity (hash), part of every image's `request_key`.
    """
    jobs, index = [], 0
    next_seed = int(defaults.get("seed", 0))
    for number, line_options in entries:
        options = {**defaults, **line_options}
        size = int(options.get("batch_size", 1))
        if size < 1:
            raise BatchError(f"prompts line {number}: batch_size must be at least 1, got {size}")
        seed = int(line_options["seed"]) if "seed" in line_options else next_seed
        for b in range(int(options.pop("batch_count", batch_count))):
            job_options = {**options, "seed": seed + b * size}
            names = [f"{index + i:05d}-{seed + b * size + i}-{request_key(job_options, i, identity)}.png"
                     for i in range(size)]
            index += size
            jobs.append(Job(number, job_options, names))
        next_seed = seed + size * int(options.get("batch_count", batch_count))
    return jobs


def _sub_job(job: Job, a: int, b: int) -> Job:
    """Images [a, b) of `job` as a job of their own: same seeds, prompts and files."""
    options = {**job.options, "batch_size": b - a, "seed": int(job.options["seed"]) + a}
    if options.get("subseed") is not None:
        options["subseed"] = int(options["subseed"]) + a
    for key in ("prompt", "negative_prompt"):
        if isinstance(options.get(key), (list, tuple)):
            options[key] = list(options[key])[a:b]
    return Job(job.line, options, job.names[a:b])


def host_share(jobs: list[Job], index: int, count: int) -> list[Job]:
    """The jobs host `index` of `count` runs: images [index*N//count, (index+1)*N//count) of
    the N images of `jobs` in order (see the module docstring). Deterministic: every host
    computes the same split from the same prompts file and options."""
    if count < 1 or not 0 <= index < count:
        raise BatchError(f"host index {index} is not in [0, {count})")
    total = sum(len(j.names) for j in jobs)
    lo, hi = index * total // count, (index + 1) * total // count
    out, start = [], 0
    for job in jobs:
        n = len(job.names)
        a, b = max(lo - start, 0), min(hi - start, n)
        if a < b:
            out.append(job if (a, b) == (0, n) else _sub_job(job, a, b))
        start += n
    return out


def manifest_name(index: int = 0, count: int = 1) -> str:
    """The manifest file of host `index` of `count`: manifest.jsonl for a single host."""
    return MANIFEST if count == 1 else f"manifest-{index:05d}-of-{count:05d}.jsonl"


def read_manifests(out: Path) -> list[dict]:
    """The records of every manifest in `out` (all hosts, any host count), file by file."""
    out = Path(out)
    files = sorted(set(out.glob("manifest-*-of-*.jsonl")) | ({out / MANIFEST} if (out / MANIFEST).exists() else set()))
    return [r for f in files for r in read_jsonl(f)]


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


def grid_name(paths: list[Path]) -> str:
    """grid-KEY.png: named by its images, so a grid of other images never replaces it."""
    return f"grid-{hashlib.sha256(' '.join(p.name for p in paths).encode()).hexdigest()[:12]}.png"


def run_jobs(generate: Callable[..., Any], jobs: list[Job], out: Path, *, grid: bool = False,
             on_image: Callable[[str, bool], None] | None = None, manifest: str = MANIFEST,
             xmp: str | None = None) -> list[Path]:
    """Run the jobs whose images are missing; returns the paths of all images, in order.

    generate(**options) -> result with .images and .infotexts. on_image(name, skipped) reports
    progress. The manifest (file name `manifest` in `out`; one per host, see `manifest_name`)
    gets one record per image: file, line, seed, prompt, infotext. Images recorded in any
    host's manifest are not recorded again. xmp: the XMP packet each image's PNG gets
    (`sdjax.images.save_png`).
    """
    check_output_folder(out)
    recorded = {r.get("file") for r in read_manifests(out)}
    manifest = out / manifest

    def record(entry: dict) -> None:
        if entry["file"] not in recorded:
            append_jsonl(manifest, entry, unique_key="file")  # locked: once, even with concurrent runs
            recorded.add(entry["file"])

    paths = []
    for job in jobs:
        targets = [out / n for n in job.names]
        done = [_complete(p) for p in targets]
        for name, p, ok in zip(job.names, targets, done):
            if ok:
                # killed between the PNG and its manifest line, or made by a concurrent run
                with critical():
                    record({"file": name, "line": job.line, "infotext": read_infotext(p)})
                    remove_stale_temp_files(p)  # a run killed while writing it
                if on_image:
                    on_image(name, True)
        # Only the missing images are made again: each run of consecutive missing images is
        # one smaller job with the same seeds (see `_sub_job`).
        a = 0
        while a < len(targets):
            if done[a]:
                a += 1
                continue
            b = a
            while b < len(targets) and not done[b]:
                b += 1
            sub = job if (a, b) == (0, len(targets)) else _sub_job(job, a, b)
            result = generate(**sub.options)
            for i, name in enumerate(sub.names):
                with critical():
                    try:
                        save_png(result.images[i], out / name, result.infotexts[i], exclusive=True, xmp=xmp)
                        entry = {"file": name, "line": job.line, "seed": result.seeds[i],
                                 "prompt": sub.options.get("prompt"), "infotext": result.infotexts[i]}
                    except FileExistsError:  # the same request, finished first by a concurrent run
                        entry = {"file": name, "line": job.line, "infotext": read_infotext(out / name)}
                    record(entry)
                    remove_stale_temp_files(out / name)  # a killed earlier run's half-written file
                if on_image:
                    on_image(name, False)
            a = b
        paths += targets
    if grid and paths:
        from PIL import Image

        save_png(make_grid([Image.open(p) for p in paths]), out / grid_name(paths))
    return paths
