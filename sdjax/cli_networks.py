"""CLI flags for LoRAs, embeddings and ControlNets, and `sdjax convert` (used by `sdjax.cli`).

    sdjax generate "a cat <lora:style:0.8>" --lora-dir loras/ [--lora extra.safetensors:0.5]
    sdjax generate "a shinytok cat" --embeddings-dir embeddings/
    sdjax generate "a house" --controlnet cn_canny/ --control-image photo.png \
        --control-preprocessor canny --control-scale 0.9 --control-start 0 --control-end 0.8
    sdjax convert model.safetensors model_diffusers/ [--prediction-type v_prediction]
    sdjax convert model_diffusers/ model.safetensors [--dtype float16]
    (SD 1.x, 2.x and SDXL base / refiner: the single file in the original LDM / SGM layout)

--controlnet, --control-image, --control-scale, --control-start, --control-end,
--control-preprocessor and --control-guess-mode are repeatable and matched by position
(a single value of the per-unit options applies to every unit).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdjax.errors import NetworkUsageError, SdjaxError
from sdjax.pipeline.control import ControlNetUnit
from sdjax.pipeline.networks import parse_lora_arg
from sdjax.weights import single_file


def add_network_arguments(s: argparse.ArgumentParser) -> None:
    """--lora-dir, --lora, --lora-nonstrict, --embeddings-dir, --embedding and the ControlNet flags."""
    g = s.add_argument_group("LoRA, embeddings, ControlNet")
    g.add_argument("--lora-dir", help="folder where <lora:NAME:M> prompt tags are looked up (NAME.safetensors...)")
    g.add_argument("--lora", action="append", metavar="PATH[:MULT]", help="apply this LoRA file (repeatable)")
    g.add_argument("--lora-nonstrict", action="store_true",
                   help="warn about LoRA keys that match no weight instead of failing")
    g.add_argument("--embeddings-dir", help="textual-inversion embeddings, used by file name in prompts")
    g.add_argument("--embedding", action="append", metavar="PATH", help="one embedding file (repeatable)")
    g.add_argument("--controlnet", action="append", metavar="PATH", help="ControlNet folder or file (repeatable)")
    g.add_argument("--control-image", action="append", metavar="IMAGE", help="control image, one per --controlnet")
    g.add_argument("--control-scale", action="append", type=float, metavar="S", help="conditioning scale (default 1)")
    g.add_argument("--control-start", action="append", type=float, metavar="A", help="start fraction (default 0)")
    g.add_argument("--control-end", action="append", type=float, metavar="B", help="end fraction (default 1)")
    g.add_argument("--control-preprocessor", action="append", choices=("none", "canny"),
                   help="preprocess the control image (default none: use it as is)")
    g.add_argument("--control-low-threshold", type=float, default=100.0, help="Canny low threshold (default 100)")
    g.add_argument("--control-high-threshold", type=float, default=200.0, help="Canny high threshold (default 200)")
    g.add_argument("--control-guess-mode", action="store_true", help="diffusers' guess mode for every unit")
    g.add_argument("--save-control-image", metavar="DIR",
                   help="write each preprocessed control image there (control-0.png, ...)")


def _per_unit(values, n: int, default, flag: str) -> list:
    if not values:
        return [default] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise NetworkUsageError(f"{flag} was given {len(values)} times for {n} --controlnet; give it once or "
                                "once per --controlnet")
    return list(values)


def network_kwargs(o: dict) -> dict:
    """`Pipeline.generate` keyword arguments from the parsed options `o` (flags as dict keys)."""
    kw: dict = {}
    if o.get("lora_dir"):
        kw["lora_dir"] = o["lora_dir"]
    if o.get("lora"):
        for item in o["lora"]:
            parse_lora_arg(item)  # a bad multiplier is refused before the model loads
        kw["loras"] = list(o["lora"])
    if o.get("lora_nonstrict"):
        kw["lora_strict"] = False
    if o.get("embeddings_dir"):
        kw["embeddings_dir"] = o["embeddings_dir"]
    if o.get("embedding"):
        kw["embeddings"] = list(o["embedding"])
    nets = o.get("controlnet") or []
    if not nets:
        if o.get("control_image"):
            raise NetworkUsageError("--control-image needs --controlnet")
        return kw
    images = o.get("control_image") or []
    if len(images) != len(nets):
        raise NetworkUsageError(f"{len(nets)} --controlnet but {len(images)} --control-image: give one image each")
    for path in list(nets) + list(images):
        if not Path(path).exists():
            raise NetworkUsageError(f"{path} does not exist")
    n = len(nets)
    scales = _per_unit(o.get("control_scale"), n, 1.0, "--control-scale")
    starts = _per_unit(o.get("control_start"), n, 0.0, "--control-start")
    ends = _per_unit(o.get("control_end"), n, 1.0, "--control-end")
    pres = _per_unit(o.get("control_preprocessor"), n, "none", "--control-preprocessor")
    save = o.get("save_control_image")
    units = []
    for i in range(n):
        if not 0.0 <= starts[i] < ends[i] <= 1.0:
            raise NetworkUsageError(f"ControlNet {i}: need 0 <= --control-start < --control-end <= 1, got "
                                    f"{starts[i]} and {ends[i]}")
        units.append(ControlNetUnit(
            model=nets[i], image=images[i], scale=scales[i], start=starts[i], end=ends[i], preprocessor=pres[i],
            low_threshold=o.get("control_low_threshold", 100.0), high_threshold=o.get("control_high_threshold", 200.0),
            guess_mode=bool(o.get("control_guess_mode")),
            save_path=None if save is None else Path(save) / f"control-{i}.png"))
    kw["controlnets"] = units
    return kw


def add_convert_parser(sub) -> None:
    c = sub.add_parser("convert", help="single file <-> diffusers folder")
    c.add_argument("src", help="a .safetensors/.ckpt single file, or a diffusers folder")
    c.add_argument("dst", help="a diffusers folder (from a file), or a .safetensors file (from a folder)")
    c.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="override the single file's detected prediction type")
    c.add_argument("--config-dir", help="a diffusers folder whose configs (and tokenizers) replace the shipped SD1/SD2/SDXL ones")
    c.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="cast the weights (default: copy them bit-exactly)")
    c.add_argument("--no-ema", action="store_true", help="use the non-EMA weights of a single file")


def run_convert(args) -> int:
    """`sdjax convert SRC DST`: prints DST; exit 2 (via SdjaxError) on bad input."""
    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise NetworkUsageError(f"{src} does not exist")
    if src.is_dir():
        if args.prediction_type or args.config_dir or args.no_ema:
            raise NetworkUsageError("--prediction-type, --config-dir and --no-ema apply to single-file sources only")
        out = single_file.convert_diffusers_to_single_file(src, dst, dtype=args.dtype)
    else:
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise NetworkUsageError(f"{dst} exists and is not an empty folder")
        out = single_file.convert_single_file_to_diffusers(src, dst, prediction_type=args.prediction_type,
                                                           config_dir=args.config_dir, prefer_ema=not args.no_ema,
                                                           dtype=args.dtype)
    print(out)
    return 0


__all__ = ["add_network_arguments", "network_kwargs", "add_convert_parser", "run_convert", "NetworkUsageError"]
