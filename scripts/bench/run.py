"""sdjax against diffusers (PyTorch) on one machine: same weights, dtype, sizes, sampler, guidance.

    import bench.run as bench            # scripts/ on sys.path
    report = bench.run(bench.QUICK, sections=("unet", "txt2img"))
    print(report.table()); print(report.ratio_line())

    python scripts/benchmark.py [--quick] [--sections unet,txt2img,...] [--json OUT]

Both sides use one set of random weights at the real SD 1.5 config (or, for `QUICK`, a tiny
config derived from it): torch builds them (diffusers `from_config`, transformers
`CLIPTextModel`) and `sdjax.weights.mapping.load_state` copies them into the NNX models, so no
files are needed. Sections (`SECTIONS`): UNet forward (batch 2 = cond + uncond), text encoding
and VAE decode, txt2img per image (Euler, diffusers' sigmas, classifier-free guidance), compile
time cold and with JAX's persistent cache, peak resident memory per dtype, achieved FLOP/s
against a measured matmul peak, scaling with batch size and steps, and performance levers
(XLA flags, bf16, attention kernel, one core). Compile, memory and levers run in fresh
subprocesses (`bench.parts.worker`).

Times are wall-clock seconds, medians of up to `Plan.repeats` runs after a warm-up (an item stops
repeating once it has used `Plan.budget_s`). sdjax's warm-up is its ahead-of-time compile
(not executed); diffusers' is the same call (a 1-step call for txt2img). Each row's ratio is
sdjax's advantage: diffusers / sdjax for times and memory, sdjax / diffusers for FLOP/s (>1:
sdjax better).

Modules: `bench.report` (Plan, Row, Report table), `bench.sections` (the measurements),
`bench.parts` (models, timing, subprocess workers); this one runs them and holds the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from bench import parts
from bench.report import DEFAULT_SECTIONS, FULL, QUICK, SECTIONS, Plan, Report, Row, _fmt
from bench.sections import SECTION_FUNCTIONS, SUBPROCESS_SECTIONS, Context, matmul_peak

__all__ = ["DEFAULT_SECTIONS", "FULL", "QUICK", "SECTIONS", "Plan", "Report", "Row", "matmul_peak", "run", "main"]


def run(plan: Plan = FULL, sections=DEFAULT_SECTIONS, *, reference: str | Path | None = None,
        log: Callable[[str], None] = print) -> Report:
    """Measure `sections` (names from SECTIONS, run in SECTIONS' order) under `plan`.

    Rows are logged as they come (a long run shows partial results). A section that raises adds
    a row whose note starts with "ERROR" and the others still run. Returns the Report.
    """
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    ctx = Context(plan, Path(reference) if reference else parts.default_reference(), log)
    report = Report(parts.machine_info(), plan)
    released = False
    for name in SECTIONS:
        if name not in sections:
            continue
        if name in SUBPROCESS_SECTIONS and not released:
            ctx.release()
            released = True
        start = time.perf_counter()
        try:
            rows = SECTION_FUNCTIONS[name](ctx)
        except Exception as e:  # report and go on: one broken section must not lose the others
            traceback.print_exc()
            rows = [Row(name, "(section)", "", None, None, f"ERROR {type(e).__name__}: {e}"[:400])]
        for row in rows:
            log(f"  {row.section:8s} {row.item}: sdjax {_fmt(row.sdjax)} diffusers {_fmt(row.diffusers)} "
                f"{row.unit}  {row.note}")
        log(f"[{name}: {time.perf_counter() - start:.0f} s]")
        report.rows.extend(rows)
    return report


# ---- command line -------------------------------------------------------------------------

def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared by scripts/benchmark.py and a future `sdjax bench`)."""
    parser.add_argument("--quick", action="store_true", help="tiny config derived from SD 1.5: seconds, for CI")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated, from {','.join(SECTIONS)}, or 'all' (default: all but levers)")
    # dest differs from Plan.levers ("all"/"smoke"): a shared name let `--levers` set it to True,
    # which ran only the smoke subset.
    parser.add_argument("--levers", action="store_true", dest="add_levers", help="add the performance-levers section")
    parser.add_argument("--reference", default=None, help="SD 1.5 reference folder (configs + tokenizer)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the results as JSON")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="dtype of the comparisons")
    parser.add_argument("--unet-latents", type=_ints, help="UNet latent sizes, e.g. 32,64")
    parser.add_argument("--images", type=_ints, help="txt2img image sizes measured end to end, e.g. 256,512")
    parser.add_argument("--estimate-images", type=_ints,
                        help="txt2img sizes estimated from measured parts (default 512; '' for none)")
    parser.add_argument("--user-path", action="store_true", default=None,
                        help="also time Pipeline.generate at the smallest image size")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--repeats", type=int, help="timed runs per item (median reported)")
    parser.add_argument("--budget-s", type=float, help="stop repeating an item after this many seconds")
    parser.add_argument("--batches", type=_ints, help="scaling: batch sizes, e.g. 1,2,4")
    parser.add_argument("--step-counts", type=_ints, help="scaling: step counts, e.g. 10,20,40")
    parser.add_argument("--scaling-image", type=int)
    parser.add_argument("--compile-image", type=int)
    parser.add_argument("--compile-steps", type=int)
    parser.add_argument("--start-image", type=int)
    parser.add_argument("--start-steps", type=int)
    parser.add_argument("--memory-image", type=int)
    parser.add_argument("--memory-steps", type=int)
    parser.add_argument("--lever-latent", type=int)
    parser.add_argument("--matmul-n", type=int)


def plan_from_args(args: argparse.Namespace) -> tuple[Plan, tuple[str, ...]]:
    plan = QUICK if args.quick else FULL
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Plan)
                 if getattr(args, f.name, None) is not None}
    plan = dataclasses.replace(plan, **overrides)
    sections = SECTIONS if args.sections == "all" else tuple(s for s in args.sections.split(",") if s)
    if args.add_levers and "levers" not in sections:
        sections = (*sections, "levers")
    return plan, sections


def main(argv: list[str] | None = None) -> int:
    """Parse flags, print the machine and date, run, print the table and (last) the ratio line.
    Exit status 1 if a section failed."""
    parser = argparse.ArgumentParser(description="sdjax vs diffusers (PyTorch) on this machine.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    plan, sections = plan_from_args(args)
    info = parts.machine_info()
    print(f"# sdjax benchmark, {info['date']}")
    print(f"# {info['cpu']}, {info['cores']} cores, {info.get('memory_gib')} GiB; jax {info['jax']} "
          f"({info['jax_backend']}), flax {info['flax']}, torch {info['torch']} ({info['torch_threads']} threads), "
          f"diffusers {info['diffusers']}, transformers {info['transformers']}; load average "
          f"{' '.join(map(str, info['load_average']))} (>1 means other work competes for the cores)")
    print(f"# {'quick (tiny config)' if plan.tiny else 'SD 1.5 config'}, {plan.dtype}; sections: {','.join(sections)}")
    sys.stdout.flush()
    report = run(plan, sections, reference=args.reference, log=lambda m: print(m, flush=True))
    print()
    print(report.table())
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report.to_json(), indent=1))
        print(f"# results written to {args.json_out}")
    print(report.ratio_line(), flush=True)
    return 1 if any(r.note.startswith("ERROR") for r in report.rows) else 0
