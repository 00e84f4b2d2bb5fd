#!/usr/bin/env python
"""Score images of the synthetic-shapes world: accuracy per attribute, seen vs held-out.

Three ways in:

  # 1. Images already on disk: PNGs + a JSONL of their intended attributes
  #    ({"image": path relative to the JSONL, "attributes": {...} and/or "caption": ...,
  #      optional "split": "seen"/"train"/"heldout"}). write_synthetic_folder's
  #    metadata.jsonl has this format.
  python scripts/eval_tiny.py --images-dir out/ [--metadata out/metadata.jsonl]

  # 2. A generator function `module:function`, called as
  #    function(captions: list[str], seeds: list[int]) -> list of images
  #    (PIL, uint8 HWC, or float HWC in [-1, 1]); prompts come from evaluation_prompts.
  python scripts/eval_tiny.py --generator mypkg.gen:generate --n 64 --seed 0 [--save-dir out/]

  # 3. An sdjax model ("embedded" = the model shipped in the package)
  python scripts/eval_tiny.py --model embedded --n 200 --steps 20 --cfg-scale 5

  # 4. A self-check: the synthetic renderer itself as the generator (should print 1.000).
  python scripts/eval_tiny.py --self-check --n 64

From Python: `evaluate_generator(fn, n, seed)` returns the report dict.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from PIL import Image

from sdjax import runtime
from sdjax.data.analysis import evaluate, evaluation_prompts, format_report, parse_caption
from sdjax.data.synthetic import DEFAULT_CONFIG, SyntheticConfig


def evaluate_generator(generate, n: int = 64, seed: int = 0, config: SyntheticConfig = DEFAULT_CONFIG,
                       batch_size: int = 16, save_dir: str | Path | None = None) -> dict:
    """Generate `n` prompts (half seen, half held-out combinations) with `generate` and score them."""
    prompts = evaluation_prompts(n, seed, config)
    images = []
    for start in range(0, n, batch_size):
        chunk = prompts[start:start + batch_size]
        out = list(generate([p["caption"] for p in chunk], [p["seed"] for p in chunk]))
        if len(out) != len(chunk):
            raise ValueError(f"generator returned {len(out)} images for {len(chunk)} prompts")
        images += out
    if save_dir is not None:
        _save(Path(save_dir), images, prompts)
    return evaluate(images, [p["attributes"] for p in prompts], [p["split"] for p in prompts], config)


def _save(folder: Path, images, prompts) -> None:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, p) in enumerate(zip(images, prompts)):
        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.dtype != np.uint8:
                array = np.clip(np.round((array.astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)
            image = Image.fromarray(array)
        image.save(folder / f"{i:05d}.png")
        lines.append(json.dumps({"image": f"{i:05d}.png", **p}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def evaluate_folder(images_dir: str | Path, metadata: str | Path | None = None,
                    config: SyntheticConfig = DEFAULT_CONFIG) -> dict:
    """Score the images listed in a metadata JSONL (default: images_dir/metadata.jsonl)."""
    images_dir = Path(images_dir)
    metadata = Path(metadata) if metadata else images_dir / "metadata.jsonl"
    images, attributes, splits = [], [], []
    for lineno, line in enumerate(metadata.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "attributes" in record:
            attrs = record["attributes"]
        elif "caption" in record:
            attrs = parse_caption(record["caption"], config)
        else:
            raise ValueError(f"{metadata}:{lineno}: needs \"attributes\" or \"caption\"")
        with Image.open(metadata.parent / record["image"]) as im:
            images.append(im.convert("RGB"))
        attributes.append(attrs)
        split = record.get("split")
        splits.append(split if split is not None else ("heldout" if config.is_heldout(attrs) else "seen"))
    return evaluate(images, attributes, splits, config)


def _renderer(config: SyntheticConfig):
    """The synthetic renderer as a generator: draws exactly what each caption asks for."""
    from sdjax.data.synthetic import render

    return lambda captions, seeds: [render(parse_caption(c, config), config) for c in captions]


def _model_generator(model: str, steps: int, sampler: str, cfg_scale: float, resolution: int):
    """A generator over an sdjax model: each caption with its own seed (batch of 1, exact per seed)."""
    import sdjax
    from sdjax.cli import EMBEDDED_MODEL

    path = EMBEDDED_MODEL if model == "embedded" else model
    pipe = sdjax.load_pipeline(path)

    def generate(captions, seeds):
        return [pipe.generate(c, steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=int(s),
                              width=resolution, height=resolution).images[0] for c, s in zip(captions, seeds)]

    return generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images-dir", help="folder of PNGs (with metadata.jsonl unless --metadata)")
    source.add_argument("--generator", help="module:function(captions, seeds) -> images")
    source.add_argument("--self-check", action="store_true", help="score the synthetic renderer itself")
    source.add_argument("--model", help="generate with this sdjax model ('embedded' = the shipped one)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (with --model)")
    parser.add_argument("--sampler", default="Euler", help="sampler name (with --model)")
    parser.add_argument("--cfg-scale", type=float, default=5.0, help="guidance scale (with --model)")
    parser.add_argument("--metadata", help="JSONL of intended attributes (with --images-dir)")
    parser.add_argument("--n", type=int, default=64, help="number of prompts (half seen, half held-out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--two-shape-prob", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--save-dir", help="also write the generated images + metadata.jsonl here")
    parser.add_argument("--json", help="write the report as JSON to this file")
    args = parser.parse_args(argv)
    runtime.configure()  # process-wide XLA settings, before JAX starts

    config = SyntheticConfig(resolution=args.resolution, two_shape_prob=args.two_shape_prob,
                             two_shape_positions=args.two_shape_prob > 0)
    if args.images_dir:
        report = evaluate_folder(args.images_dir, args.metadata, config)
    else:
        if args.model:
            generate = _model_generator(args.model, args.steps, args.sampler, args.cfg_scale, args.resolution)
        elif args.generator:
            module, _, name = args.generator.partition(":")
            generate = getattr(importlib.import_module(module), name or "generate")
        else:
            generate = _renderer(config)
        report = evaluate_generator(generate, args.n, args.seed, config, args.batch_size, args.save_dir)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
