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

  # 5. By phrasing family (template / trained paraphrases / held-out phrasings, --n prompts
  #    each, `sdjax.data.phrasing`), and what a negative prompt naming a colour does:
  python scripts/eval_tiny.py --model embedded --families --n 200 --negative 64 --json out.json

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
from sdjax.data.analysis import (FAMILIES, analyze, evaluate, evaluation_prompts, family_prompts, format_report,
                                 parse_caption, parse_prompt)
from sdjax.data.phrasing import TRAIN_FRAMES, phrase
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


def _generate_all(generate, prompts: list[dict], batch_size: int, negatives: list[str] | None = None) -> list:
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        args = ([p["caption"] for p in chunk], [p["seed"] for p in chunk])
        if negatives is None:
            out = list(generate(*args))
        else:
            out = list(generate(*args, negatives=negatives[start:start + batch_size]))
        if len(out) != len(chunk):
            raise ValueError(f"generator returned {len(out)} images for {len(chunk)} prompts")
        images += out
    return images


def evaluate_families(generate, n: int = 200, seed: int = 1, batch_size: int = 16,
                      families: tuple[str, ...] = FAMILIES, save_dir: str | Path | None = None) -> dict:
    """Accuracy per phrasing family (`sdjax.data.analysis.family_prompts`, n prompts each):
    {"template": {"n", "background", "color", ...}, "paraphrase": {...}, "heldout": {...}}.
    Size is judged only where a prompt states it; every prompt states colour, background, position."""
    report = {}
    for family in families:
        prompts = family_prompts(family, n, seed)
        images = _generate_all(generate, prompts, batch_size)
        if save_dir is not None:
            _save(Path(save_dir) / family, images, prompts)
        report.update(evaluate(images, [p["attributes"] for p in prompts], [family] * n))
    return report


def negative_prompt_effect(generate, n: int = 64, seed: int = 2, batch_size: int = 16) -> dict:
    """Does a negative prompt naming a colour move the image away from it?

    For the shape colour: n prompts that state shape, position and background but no shape
    colour ("a circle at the left on a blue background"); each is generated three times at its
    seed: with no negative prompt (the model picks a colour X), with the negative prompt "X",
    and with a control negative naming another colour Y (neither X nor the background). Same
    for the background: prompts without one ("a red circle at the left"), negatives "X
    background" / "Y background". Reports, per part, the fraction of images whose colour is
    no longer X with the negative naming X ("moved_away") and with the control ("moved_control"),
    and the mean RGB distance of the part's new colour from X's palette colour with the negative
    and with the control (0 where it stayed X; `sdjax.data.analysis.analyze` finds the parts).
    Prompts whose first image shows no shape are left out ("n" counts the rest).
    """
    import numpy as np

    from sdjax.data.synthetic import PALETTE, SPLITS, _draw_attributes, _rng

    report = {}
    for part, drop in (("color", {"p_color": 0.0}), ("background", {"p_background": 0.0})):
        prompts = []
        for i in range(n):
            attributes = _draw_attributes(_rng(seed, "train", i), DEFAULT_CONFIG, "train")
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLITS.index("train"), i, 3])))
            phrased = phrase(attributes, rng, TRAIN_FRAMES, p_position=1.0, **drop)
            prompts.append({"caption": phrased.caption, "seed": seed * 1_000_003 + 7919 * (part == "color") + i,
                            "attributes": attributes, "rng": rng})
        base = [analyze(im) for im in _generate_all(generate, prompts, batch_size, [""] * n)]
        # X: what the model drew. Images without a shape are generated again (batches need
        # consecutive seeds) but left out of the figures.
        keep = [i for i, b in enumerate(base) if b[part] is not None]
        picked = [b[part] or next(c for c in PALETTE if c != b["background"]) for b in base]
        others = []
        for p, b, x in zip(prompts, base, picked):
            choices = [c for c in PALETTE if c not in (x, b["background"], b["color"])]
            others.append(choices[int(p["rng"].integers(len(choices)))])
        suffix = " background" if part == "background" else ""
        neg = [analyze(im) for im in _generate_all(generate, prompts, batch_size, [x + suffix for x in picked])]
        ctl = [analyze(im) for im in _generate_all(generate, prompts, batch_size, [y + suffix for y in others])]
        prompts, base, picked, others, neg, ctl = ([seq[i] for i in keep]
                                                  for seq in (prompts, base, picked, others, neg, ctl))

        def distance(result, x):
            rgb = np.asarray(PALETTE[result[part]] if result[part] else PALETTE[result["background"]], np.float32)
            return float(np.linalg.norm(rgb - np.asarray(PALETTE[x], np.float32)))

        report[part] = {
            "n": len(prompts),
            "moved_away": float(np.mean([r[part] != x for r, x in zip(neg, picked)])),
            "moved_control": float(np.mean([r[part] != x for r, x in zip(ctl, picked)])),
            "distance_negative": float(np.mean([distance(r, x) for r, x in zip(neg, picked)])),
            "distance_control": float(np.mean([distance(r, x) for r, x in zip(ctl, picked)])),
            "examples": [{"prompt": p["caption"], "seed": p["seed"], "drew": x, "negative": x + suffix,
                          "then": r[part], "control": y + suffix, "control_then": c[part]}
                         for p, x, r, y, c in list(zip(prompts, picked, neg, others, ctl))[:8]],
        }
    return report


def format_negative(report: dict) -> str:
    lines = [f"{'negative':<12}{'n':>6}{'moved_away':>12}{'control':>12}{'dist_neg':>10}{'dist_ctl':>10}"]
    for part, row in report.items():
        lines.append(f"{part:<12}{row['n']:>6}{row['moved_away']:>12.3f}{row['moved_control']:>12.3f}"
                     f"{row['distance_negative']:>10.1f}{row['distance_control']:>10.1f}")
    return "\n".join(lines)


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
    """The synthetic renderer as a generator: draws exactly what each caption asks for (what a
    free-form prompt leaves open: large, centred, red on blue, or the first other colour)."""
    from sdjax.data.synthetic import PALETTE, render

    def attributes(caption):
        try:
            return parse_caption(caption, config)
        except ValueError:
            stated = parse_prompt(caption)
        o = {"size": "large", "position": "center", **stated["objects"][0]}
        background = stated.get("background") or next(c for c in ("blue", "red") if c != o.get("color"))
        o.setdefault("color", next(c for c in PALETTE if c != background))
        return {"background": background, "objects": [o], **o}

    return lambda captions, seeds, negatives=None: [render(attributes(c), config) for c in captions]


def _model_generator(model: str, steps: int, sampler: str, cfg_scale: float, resolution: int):
    """A generator over an sdjax model: each call's captions as one batch, each image at its own
    seed (the image made alone, up to float rounding)."""
    import sdjax
    from sdjax.cli import EMBEDDED_MODEL

    path = EMBEDDED_MODEL if model == "embedded" else model
    pipe = sdjax.load_pipeline(path)
    return model_generator(pipe, steps, sampler, cfg_scale, resolution)


def model_generator(pipe, steps: int = 20, sampler: str = "Euler", cfg_scale: float = 5.0, resolution: int = 64):
    """`generate(captions, seeds, negatives=None)` over a loaded sdjax pipeline."""

    def generate(captions, seeds, negatives=None):
        # One batch, each image at its own seed: the images made one at a time, up to float
        # rounding (1/255), in about half the time. (Evaluations up to 2026-12-02 made
        # non-consecutive seeds one at a time.)
        negatives = list(negatives) if negatives is not None else [""] * len(captions)
        return pipe.generate(list(captions), negative_prompt=negatives, seeds=[int(s) for s in seeds],
                             steps=steps, sampler=sampler, cfg_scale=cfg_scale, width=resolution,
                             height=resolution).images

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
    parser.add_argument("--n", type=int, default=64,
                        help="number of prompts (half seen, half held-out; with --families: per family)")
    parser.add_argument("--families", action="store_true",
                        help="score by phrasing family: template, trained paraphrases, held-out phrasings")
    parser.add_argument("--negative", type=int, default=0, metavar="N",
                        help="also measure what a negative prompt naming a colour does, over N prompts")
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
        if args.families:
            report = evaluate_families(generate, args.n, args.seed or 1, args.batch_size, save_dir=args.save_dir)
        else:
            report = evaluate_generator(generate, args.n, args.seed, config, args.batch_size, args.save_dir)
    print(format_report(report))
    if args.negative:
        if args.images_dir:
            parser.error("--negative needs a generator (--model or --generator)")
        report = {"accuracy": report, "negative_prompt": negative_prompt_effect(generate, args.negative,
                                                                                batch_size=args.batch_size)}
        print(format_negative(report["negative_prompt"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
