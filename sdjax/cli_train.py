"""`sdjax train CONFIG.json`: fine-tuning and LoRA training from a JSON run config (used by `sdjax.cli`).

    sdjax train configs/finetune_sd15.json
    sdjax train configs/lora_sd15.json --override data=my_images/ --override max_steps=2000
    sdjax train configs/finetune_tiny.json -o model=path/to/model -o output_dir=runs/x --no-resume

The config's keys are `sdjax.train.config.TrainConfig` fields (keys starting with `_` are
comments). `--override KEY=VALUE` replaces one; VALUE is read as JSON when it parses
(numbers, true/false/null, lists), else taken as a string. A run resumes from the newest
checkpoint in output_dir/checkpoints (the default, --resume); with --no-resume an
output_dir that already holds checkpoints is an error rather than silently continued
(or overwritten). Config errors print one line and exit with status 2 before anything is
loaded. At the end the exported model folder (or LoRA file) is printed on stdout. A run that
fails before its first checkpoint removes the output_dir it created; a NaN / inf loss stops
the run keeping the last good checkpoint (exit 2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from sdjax import runtime
from sdjax.errors import ConfigError
from sdjax.train.config import TrainConfig


def add_train_parser(sub) -> None:
    """Register the `train` subcommand on an argparse subparsers object."""
    t = sub.add_parser("train", help="fine-tune or train a LoRA from a JSON run config (see configs/)")
    t.add_argument("config", help="a JSON file of TrainConfig fields")
    t.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="replace one config value (JSON, or a bare string); repeatable")
    t.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the newest checkpoint in output_dir (default); --no-resume refuses "
                        "an output_dir that already has checkpoints")
    t.add_argument("--export-dtype", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the exported weights (default float32)")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")


def parse_overrides(items: list[str]) -> dict:
    """['max_steps=10', 'data=synthetic'] -> {'max_steps': 10, 'data': 'synthetic'}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--override {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def load_config(path: str | Path, overrides: dict):
    """The TrainConfig of a run: the JSON file with `overrides` applied (ConfigError on any problem)."""

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read training config {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"training config {path}: expected a JSON object of options")
    d.update(overrides)
    cfg = TrainConfig.from_dict({k: v for k, v in d.items() if not k.startswith("_")})
    if not Path(cfg.model).exists():
        raise ConfigError(f"model {cfg.model!r} does not exist (a diffusers folder or .safetensors/.ckpt file)")
    return cfg


def run_train(args) -> int:
    """Parse, check, train (or resume), export; prints the exported path on stdout."""
    cfg = load_config(args.config, parse_overrides(args.override))
    ckpts = Path(cfg.output_dir) / "checkpoints"
    existing = sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
    if existing and not args.resume:
        raise ConfigError(f"output_dir {cfg.output_dir} already has checkpoints (steps {', '.join(existing)}); "
                          "resume with --resume, or choose a new output_dir")


    runtime.configure(compilation_cache=runtime.default_cache_dir())
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    kind = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "full fine-tune"
    log(f"sdjax train: {kind} of {cfg.model} on {cfg.data}, {cfg.max_steps} steps -> {cfg.output_dir}")
    fresh = not Path(cfg.output_dir).exists()
    try:
        # Imported here: the trainer pulls in orbax (~0.3 s), which no other subcommand needs.
        from sdjax.train.trainer import train

        trainer = train(cfg, log=log, progress=show, export_dtype=args.export_dtype)
    except BaseException:
        if fresh and not any((Path(cfg.output_dir) / "checkpoints").glob("[0-9]*")):
            shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a run that made nothing leaves nothing
        raise
    records = trainer.metrics.read()
    if records:
        log(f"step {records[-1]['step']}: loss {records[-1]['loss']:.5f}")
    print(trainer.exported)
    return 0
