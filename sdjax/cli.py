"""`sdjax` command line: generate, img2img, inpaint, outpaint, info. Thin: parse, call, report.

    sdjax generate "a red circle on a blue background" --steps 20 --seed 1 --out out/
    sdjax img2img --image in.png --strength 0.6 --prompt "..." --out out.png
    sdjax inpaint --image in.png --mask mask.png --prompt "..."
    sdjax outpaint --image in.png --right 64 --prompt "..."
    sdjax generate --prompts-file prompts.txt --out folder/      (resumable, manifest.jsonl)
    sdjax generate --from-png image.png --out again.png          (same image, same machine)
    sdjax info image.png                                         (parameters, watermark, XMP source type)
    sdjax generate "..." --xyz "CFG Scale: 4, 7, 10" "Steps: 10, 20"   (X/Y/Z plot, sdjax.cli_xyz)
    sdjax generate "..." --preview-every 5 [--taesd PATH]        (live previews, sdjax.cli_outputs)
    sdjax serve --port 7860 --devices all                        (AUTOMATIC1111's web API, sdjax.serve)
    sdjax generate --prompts-file p.txt --batch-size 8 --devices all [--fsdp 2]   (batch over devices)
    sdjax generate --prompts-file p.txt --out shared/ --coordinator-address HOST:PORT \
        --num-processes 2 --process-id 0   (one process per host; each writes only its images)

Errors in the input (sizes, strength, sampler names, model path, output folder) print one
line on stderr and exit with status 2; nothing is written. Every number goes through
`sdjax.pipeline.request.Request` (the same check `Pipeline.generate` makes), with --max-pixels,
--max-steps and --max-batch-size to raise its limits. Existing files are never replaced
(`--out FILE` needs --overwrite for that). Written PNGs carry the IPTC digital source type in
XMP and, unless --no-watermark, the invisible watermark (`sdjax.cli_outputs`). SIGINT / SIGTERM
stop the run after the current compiled call, leave no partial file, and exit with 130 / 143; a
rerun resumes. JAX's persistent compilation
cache lives in $SDJAX_CACHE_DIR, else $XDG_CACHE_HOME/sdjax/jax, else ~/.cache/sdjax/jax
(`sdjax.runtime`).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

from sdjax import parallel, runtime
from sdjax.cli_outputs import (add_output_arguments, check_output_options, make_previewer, print_info,
                               provenance_xmp, wrap_generate)
from sdjax.cli_networks import add_convert_parser, add_network_arguments, network_kwargs, run_convert
from sdjax.cli_sdxl import INFOTEXT_KEYS, add_sdxl_arguments, sdxl_options
from sdjax.cli_train import add_train_parser, run_train
from sdjax.cli_xyz import add_xyz_argument, plan_xyz, run_xyz
from sdjax.errors import SdjaxError, UsageError
from sdjax.images import make_grid, read_infotext, save_png
from sdjax.interrupt import Interrupted, handle_signals
from sdjax.metadata import parse_infotext
from sdjax.models.kernels import ATTENTION, CONV
from sdjax.pipeline import batch
from sdjax.pipeline.generator import model_hash
from sdjax.pipeline.inpaint import to_pil_mask, to_pil_rgb
from sdjax.pipeline.load import load_pipeline
from sdjax.pipeline.request import HiresFix, Limits, Request, check_request
from sdjax.serve.main import add_serve_parser, run_serve

DEFAULTS = dict(negative_prompt="", steps=20, sampler="DPM++ 2M", schedule="Automatic", cfg_scale=7.0,
                seed=-1, batch_size=1, batch_count=1, strength=0.75, clip_skip=1, dtype="float32",
                mask_blur=4, masked_content="original", padding=32)
EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "tiny"
_OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print an image's generation parameters")
    info.add_argument("image")
    add_convert_parser(sub)
    add_train_parser(sub)
    add_serve_parser(sub, add_parallel_flags)
    for name in ("generate", "img2img", "inpaint", "outpaint"):
        s = sub.add_parser(name, help=f"{name} (see sdjax {name} --help)")
        s.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or use --prompt)")
        s.add_argument("--model", help="diffusers folder or .safetensors file (default: the embedded tiny model)")
        s.add_argument("--prompt")
        s.add_argument("--negative-prompt")
        s.add_argument("--steps", type=int)
        s.add_argument("--sampler", help="A1111 or ComfyUI sampler name (default DPM++ 2M)")
        s.add_argument("--schedule", help="schedule type (default: the sampler's, as A1111 'Automatic')")
        s.add_argument("--cfg-scale", type=float)
        s.add_argument("--seed", type=int, help="-1 = random")
        s.add_argument("--subseed", type=int, help="variation seed")
        s.add_argument("--subseed-strength", type=float, default=0.0)
        s.add_argument("--width", type=int)
        s.add_argument("--height", type=int)
        s.add_argument("--batch-size", type=int)
        s.add_argument("--batch-count", type=int)
        s.add_argument("--clip-skip", type=int)
        s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
        s.add_argument("--attention", choices=ATTENTION,
                       help="attention implementation (default auto: cuDNN flash on NVIDIA GPUs, Pallas flash "
                            "on TPU, chunked on CPU; env SDJAX_ATTENTION)")
        s.add_argument("--conv", choices=CONV, help="convolution implementation (default auto; env SDJAX_CONV)")
        s.add_argument("--out", default="outputs", help="output folder, or a .png file for one image")
        s.add_argument("--overwrite", action="store_true", help="let --out FILE.png replace an existing file")
        s.add_argument("--max-pixels", type=int, help="largest width x height per image (default 4096x4096)")
        s.add_argument("--max-steps", type=int, help="most sampling steps (default 1000)")
        s.add_argument("--max-batch-size", type=int, help="largest batch size (default 64)")
        s.add_argument("--prompts-file", help="one prompt per line, or JSONL with per-line options")
        s.add_argument("--grid", action="store_true", help="also write grid-KEY.png (named by its images)")
        s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: when stderr is a terminal)")
        add_parallel_flags(s)
        add_network_arguments(s)
        add_output_arguments(s)
        if name in ("generate", "img2img"):
            add_xyz_argument(s)
        add_sdxl_arguments(s)
        if name == "generate":
            s.add_argument("--from-png", help="regenerate from the parameters stored in this PNG")
            s.add_argument("--image", help=argparse.SUPPRESS)
            add_hires_flags(s)
        else:
            s.add_argument("--image", required=True, help="the init image")
        s.add_argument("--strength", type=float, help="denoising strength in (0, 1] (default 0.75)")
        if name in ("inpaint", "outpaint"):
            s.add_argument("--mask-blur", type=float)
            s.add_argument("--masked-content", choices=("fill", "original", "latent noise", "latent nothing"))
        if name == "inpaint":
            s.add_argument("--mask", required=True, help="white = repaint, same size as the image")
            s.add_argument("--only-masked", action="store_true", help="inpaint only the masked area")
            s.add_argument("--padding", type=int, help="only-masked padding in px (default 32)")
        else:
            s.add_argument("--mask", help=argparse.SUPPRESS)
        if name == "outpaint":
            for side in ("left", "right", "up", "down"):
                s.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
    return p


def add_hires_flags(s: argparse.ArgumentParser) -> None:
    """A1111's hires fix: on when any --hr-* flag is given (`sdjax.pipeline.hires`)."""
    s.add_argument("--hr-scale", type=float, help="hires fix: upscale by this factor (default 2)")
    s.add_argument("--hr-resize-x", type=int, help="hires fix: target width (0 = from the height)")
    s.add_argument("--hr-resize-y", type=int, help="hires fix: target height (0 = from the width)")
    s.add_argument("--hr-steps", type=int, help="hires fix: second-pass steps (default 0 = --steps)")
    s.add_argument("--hr-upscaler", help="hires fix: Latent (default), Latent (antialiased), Latent (bicubic), "
                                         "Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact), "
                                         "Lanczos, Nearest or None (a plain Lanczos resize)")
    s.add_argument("--hr-denoise", type=float, help="hires fix: second-pass denoising strength (default 0.7)")
    s.add_argument("--hr-sampler", help="hires fix: second-pass sampler (default: --sampler)")
    s.add_argument("--hr-prompt", help="hires fix: second-pass prompt (default: the prompt)")
    s.add_argument("--hr-negative-prompt", help="hires fix: second-pass negative prompt (default: the negative)")


_HIRES_OPTIONS = {"hr_scale": "scale", "hr_resize_x": "resize_x", "hr_resize_y": "resize_y", "hr_steps": "steps",
                  "hr_upscaler": "upscaler", "hr_denoise": "denoising_strength", "hr_sampler": "sampler",
                  "hr_prompt": "prompt", "hr_negative_prompt": "negative_prompt"}


def _hires(o: dict) -> HiresFix | None:
    """The HiresFix the --hr-* options ask for; None when none is given."""
    given = {field: o[k] for k, field in _HIRES_OPTIONS.items() if o.get(k) is not None}
    return HiresFix(**given) if given else None


def add_parallel_flags(s: argparse.ArgumentParser) -> None:
    """--devices, --fsdp and the multi-host flags (see README "Running on many devices and hosts")."""
    g = s.add_argument_group("devices and hosts")
    g.add_argument("--devices", help="split each batch over 'all' local devices or the first N (default: one)")
    g.add_argument("--fsdp", help="shard the weights over N of those devices ('all' = every one) "
                                  "instead of replicating them (default 1)")
    g.add_argument("--coordinator-address", help="multi-host: HOST:PORT of process 0, or 'auto' for JAX's "
                                                 "cluster detection (env SDJAX_COORDINATOR)")
    g.add_argument("--num-processes", type=int, help="multi-host: number of processes (env SDJAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="multi-host: this process's index (env SDJAX_PROCESS_ID)")


def start_distributed(o: dict) -> tuple[int, int]:
    """Start jax.distributed from the flags / environment when this is a multi-process run;
    returns (process index, process count), (0, 1) for a single process."""
    try:
        parallel.distributed_init(o.get("coordinator_address"), o.get("num_processes"), o.get("process_id"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    import jax

    return jax.process_index(), jax.process_count()


def _device_kwargs(o: dict) -> dict:
    """devices / fsdp options for Pipeline.generate from --devices / --fsdp."""
    kw = {}
    for k in ("devices", "fsdp"):
        v = o.get(k)
        if v is not None:
            if v != "all" and not (v.isdigit() and int(v) >= 1):
                raise UsageError(f"--{k} must be 'all' or a positive integer, got {v!r}")
            kw[k] = v if v == "all" else int(v)
    if "fsdp" in kw and "devices" not in kw:
        raise UsageError("--fsdp needs --devices (the devices to shard the weights over)")
    return kw


def _shared_seed(seed: int, count: int) -> int:
    """Process 0's seed on every process (a random --seed -1 must be the same everywhere)."""
    if count == 1:
        return seed
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.uint32(seed)))


def _from_png(path: str) -> dict:
    text = read_infotext(path)
    if text is None:
        raise UsageError(f"{path} has no generation parameters")
    p = parse_infotext(text)
    out = {"prompt": p["Prompt"], "negative_prompt": p["Negative prompt"]}
    conv = {"Steps": ("steps", int), "Sampler": ("sampler", str), "Schedule type": ("schedule", str),
            "CFG scale": ("cfg_scale", float), "Seed": ("seed", int), "Size-1": ("width", int),
            "Size-2": ("height", int), "Clip skip": ("clip_skip", int), "Variation seed": ("subseed", int),
            "Variation seed strength": ("subseed_strength", float), "Denoising strength": ("strength", float),
            "Mask blur": ("mask_blur", float), "Eta": ("eta", float),
            "Hires upscale": ("hr_scale", float), "Hires resize-1": ("hr_resize_x", int),
            "Hires resize-2": ("hr_resize_y", int), "Hires steps": ("hr_steps", int),
            "Hires upscaler": ("hr_upscaler", str), "Hires sampler": ("hr_sampler", str),
            "Hires prompt": ("hr_prompt", str), "Hires negative prompt": ("hr_negative_prompt", str),
            **INFOTEXT_KEYS}
    for key, (name, fn) in conv.items():
        if key in p:
            try:
                out[name] = fn(p[key])
            except ValueError:
                raise UsageError(f"{path}: {key} = {p[key]!r} is not a valid {fn.__name__}") from None
    if "hr_upscaler" in out and "strength" in out:  # a hires fix image: the second pass's strength
        out["hr_denoise"] = out.pop("strength")
    return out


def _options(args) -> dict:
    """Merge: explicit flags > --from-png > defaults."""
    opts = dict(DEFAULTS)
    if getattr(args, "from_png", None):
        opts.update(_from_png(args.from_png))
    flags = {k: v for k, v in vars(args).items() if v is not None}
    if args.prompt_pos is not None and args.prompt is not None:
        raise UsageError("give the prompt either as an argument or with --prompt, not both")
    if args.prompt_pos is not None:
        flags["prompt"] = args.prompt_pos
    opts.update({k: v for k, v in flags.items() if k not in ("prompt_pos", "command", "from_png")})
    return opts


def _limits(o: dict):
    given = {k: o[k] for k in ("max_pixels", "max_steps", "max_batch_size") if o.get(k) is not None}
    for k, v in given.items():
        if v < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be at least 1, got {v}")
    return Limits(**given)


# CLI options that are fields of the same name of a generation `Request`.
_REQUEST_OPTIONS = ("negative_prompt", "steps", "sampler", "schedule", "cfg_scale", "seed", "batch_size", "width",
                    "height", "subseed", "subseed_strength", "clip_skip")


def _check_request(options: dict, limits, where: str = "") -> Request:
    """The `Request` that CLI / prompts-file options make, built (so checked) before the model
    loads, exactly as `Pipeline.generate` builds it: one validation, one message for a bad value."""
    kw = {k: options[k] for k in _REQUEST_OPTIONS if options.get(k) is not None}
    image = options.get("image") if options.get("image") is not None else options.get("init_image")
    if image is not None:
        kw["init_image"] = image
        if options.get("strength") is not None:
            kw["strength"] = options["strength"]
    knobs = {k: options[k] for k in ("eta",) if options.get(k) is not None}
    try:
        if _hires(options) is not None:
            kw["hires"] = _hires(options)
        kw.update(sdxl_options(options))
        check_request(batch_count=options.get("batch_count"))  # a CLI option, not part of a request
        return Request(options.get("prompt", ""), **kw, knobs=knobs, limits=limits)
    except SdjaxError as e:
        raise UsageError(f"{where}{e}") from None


def _validate(o: dict, command: str) -> None:
    if "prompt" not in o and not o.get("prompts_file"):
        raise UsageError("no prompt: give PROMPT, --prompt, --prompts-file or --from-png")
    _check_request(o, _limits(o))
    if command == "generate" and o.get("image") is None and o["strength"] != DEFAULTS["strength"] \
            and "strength" in o.get("_explicit", ()):
        raise UsageError("--strength needs an init image (use sdjax img2img)")
    if o.get("image") is not None:
        image = to_pil_rgb(o["image"])
        if o.get("mask") is not None:
            mask = to_pil_mask(o["mask"])
            if mask.size != image.size:
                raise UsageError(f"mask {o['mask']} is {mask.size[0]}x{mask.size[1]} but image {o['image']} is "
                                 f"{image.size[0]}x{image.size[1]}; they must be the same size")
        if command != "outpaint" and (o.get("width") is None or o.get("height") is None) \
                and (image.width % 8 or image.height % 8):
            raise UsageError(f"image is {image.width}x{image.height}, not a multiple of 8: pass --width/--height")


def _model_path(o: dict) -> Path:
    path = Path(o["model"]) if o.get("model") else EMBEDDED_MODEL
    if not path.exists():
        hint = "" if o.get("model") else " (the embedded model is missing; pass --model)"
        raise UsageError(f"model path {os.fspath(path)!r} does not exist{hint}")
    return path


def _generate_kwargs(o: dict, command: str) -> dict:
    kw = {k: o[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "schedule", "cfg_scale",
                            "seed", "batch_size", "clip_skip") if k in o}
    for k in ("width", "height", "subseed"):
        if o.get(k) is not None:
            kw[k] = o[k]
    if o.get("subseed") is not None:
        kw["subseed_strength"] = o.get("subseed_strength", 0.0)
    if o.get("eta") is not None:
        kw["eta"] = o["eta"]
    if o.get("image") is not None and command != "outpaint":
        kw["init_image"] = o["image"]
        kw["strength"] = o["strength"]
    if command == "inpaint" or (o.get("mask") is not None and command != "outpaint"):
        kw.update(mask=o["mask"], mask_blur=o["mask_blur"], inpainting_fill=o["masked_content"],
                  inpaint_full_res=bool(o.get("only_masked")), inpaint_full_res_padding=o["padding"])
    if command == "outpaint":
        kw.update(mask_blur=o["mask_blur"], strength=o["strength"] if "strength" in o.get("_explicit", ()) else 1.0)
        kw["inpainting_fill"] = o["masked_content"] if "masked_content" in o.get("_explicit", ()) else "fill"
    if _hires(o) is not None:
        kw["hires"] = _hires(o)
    kw.update(network_kwargs(o))  # LoRA, embeddings, ControlNet (sdjax.cli_networks)
    kw.update(sdxl_options(o))  # size conditioning, refiner switch (sdjax.cli_sdxl)
    return kw


def _run(args) -> int:
    o = _options(args)
    o["_explicit"] = {k for k, v in vars(args).items() if v is not None}
    if o["seed"] == -1:
        o["seed"] = random.randrange(2**32 - 1 - 10**6)
    command = args.command
    _validate(o, command)
    check_output_options(o)
    defaults = _generate_kwargs(o, command)  # network flags checked here, before any output check
    defaults.pop("prompt", None)
    out = Path(o["out"])
    if out.suffix.lower() in _OTHER_IMAGE_SUFFIXES:
        raise UsageError(f"--out {os.fspath(out)}: sdjax writes PNG files (the parameters live in PNG text); "
                         f"use --out {os.fspath(out.with_suffix('.png'))} or a folder")
    single_file = out.suffix.lower() == ".png" and not o.get("prompts_file")
    if single_file and out.exists() and not o.get("overwrite"):
        raise UsageError(f"--out {os.fspath(out)} exists; pass --overwrite to replace it, or choose another name")
    if o.get("xyz"):  # every cell checked as a request before the model loads
        plan_xyz(o, {**defaults, "prompt": o.get("prompt", "")}, single_file,
                 lambda cell: _check_request({**o, **cell}, _limits(o)))
    model = _model_path(o)
    batch.check_output_folder(out.parent if single_file else out, create=False)

    entries = batch.read_prompts_file(o["prompts_file"]) if o.get("prompts_file") else [(0, {"prompt": o["prompt"]})]
    limits = _limits(o)
    for number, line_options in entries:  # prompts-file lines: checked before the model loads
        merged = {**o, **line_options}
        _check_request(merged, limits, f"{o['prompts_file']} line {number}: " if o.get("prompts_file") else "")
    device_kw = _device_kwargs(o)
    runtime.configure(compilation_cache=runtime.default_cache_dir())
    host, hosts = start_distributed(o)
    if hosts > 1 and single_file:
        raise UsageError("a multi-host run writes a folder: --out must not be a .png file")
    if hosts > 1 and o.get("xyz"):
        raise UsageError("--xyz runs on one host: drop the multi-host flags")
    o["seed"] = _shared_seed(o["seed"], hosts)
    if "seed" in defaults:  # the plan must use process 0's seed on every process
        defaults["seed"] = o["seed"]
    pipe = load_pipeline(model, o["dtype"], attention=o.get("attention"), conv=o.get("conv"))
    defaults.update(device_kw)
    defaults["limits"] = limits
    identity = f"{model_hash(pipe)}:{o['dtype']}:{os.fspath(Path(model).resolve())}"
    refiner = None
    if o.get("refiner"):
        if not Path(o["refiner"]).exists():
            raise UsageError(f"--refiner {o['refiner']!r} does not exist")
        refiner = load_pipeline(o["refiner"], o["dtype"], attention=o.get("attention"), conv=o.get("conv"))
        identity += f":refiner={model_hash(refiner)}:{os.fspath(Path(o['refiner']).resolve())}"
    all_jobs = batch.plan(entries, defaults, o["batch_count"], identity)
    if single_file:
        n = sum(len(j.names) for j in all_jobs)
        targets = [out] if n == 1 else [out.with_name(f"{out.stem}-{i:05d}.png") for i in range(n)]
        clash = [t for t in targets if t.exists()] if not o.get("overwrite") else []
        if clash:
            raise UsageError(f"{os.fspath(clash[0])} exists; pass --overwrite to replace it, or choose another --out")
    jobs = batch.host_share(all_jobs, host, hosts)  # this host's images only
    show = o["progress"] if o.get("progress") is not None else sys.stderr.isatty()
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(j.names) for j in jobs), unit="img", file=sys.stderr)

    def generate(**kw):
        if refiner is not None:
            kw["refiner"] = refiner
        if command == "outpaint":
            sides = {s: o[s] for s in ("left", "right", "up", "down")}
            return pipe.outpaint(o["image"], kw.pop("prompt"), **sides, **kw,
                                 **({"progress": _step_bar(bar, kw)} if bar is not None else {}))
        if bar is not None:
            kw["progress"] = _step_bar(bar, kw)
        return pipe.generate(**kw)

    previews = make_previewer(o, pipe, (out.parent if single_file else out) / "previews")
    generate = wrap_generate(generate, o, previews)  # previews; the watermark on what is written
    if o.get("xyz"):
        paths = run_xyz(generate, o, {**defaults, "prompt": o["prompt"]}, out)
    elif single_file:
        paths = []
        for job in jobs:
            result = generate(**job.options)
            for i, (image, info) in enumerate(zip(result.images, result.infotexts)):
                target = targets[len(paths)]
                try:
                    paths.append(save_png(image, target, info, exclusive=not o.get("overwrite"), xmp=provenance_xmp()))
                except FileExistsError:
                    raise UsageError(f"{os.fspath(target)} appeared while generating; pass --overwrite to "
                                     "replace it, or choose another --out") from None
                if bar is not None:
                    bar.update(1)
    else:
        paths = batch.run_jobs(generate, jobs, out, grid=o.get("grid", False) and hosts == 1,
                               on_image=(lambda name, skipped: bar.update(1)) if bar is not None else None,
                               manifest=batch.manifest_name(host, hosts), xmp=provenance_xmp())
        if hosts > 1:
            grid_path = _finish_hosts(out, all_jobs, host, o.get("grid", False))
            paths = paths + ([grid_path] if grid_path is not None else [])
    if bar is not None:
        bar.close()
    for p in paths:
        print(p)
    return 0


def _finish_hosts(out: Path, all_jobs, host: int, grid: bool) -> Path | None:
    """Wait for every host; then process 0 writes the grid when all images are visible to it
    (the run's images in plan order) and returns its path; other processes write nothing."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("sdjax generate done")
    if grid and host == 0:
        from PIL import Image

        paths = [out / n for job in all_jobs for n in job.names]
        if all(p.exists() for p in paths):  # else the folder is not shared between hosts
            return save_png(make_grid([Image.open(p) for p in paths]), out / batch.grid_name(paths))
    return None


def _step_bar(bar, kw):
    from tqdm import tqdm

    inner = tqdm(total=None, unit="step", leave=False, file=sys.stderr)

    def on_step(i):
        inner.update(1)

    return on_step


def _quiet_third_party() -> None:
    """Keep third-party notices off a CLI user's terminal. sdjax uses transformers only for the
    CLIP tokenizer, yet importing it without PyTorch (the README's install) prints "PyTorch was
    not found. Models won't be available..." on every run. A TRANSFORMERS_VERBOSITY the user
    set wins; errors still show."""
    if "TRANSFORMERS_VERBOSITY" in os.environ:
        return
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read when transformers is first imported
    if "transformers" in sys.modules:  # main() called from a program that already imported it
        sys.modules["transformers"].logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sdjax` script; returns the exit status (2 for input errors)."""
    args = _parser().parse_args(argv)
    runtime.configure()  # XLA flags, before JAX starts; each command enables the cache itself
    _quiet_third_party()
    try:
        with handle_signals():
            if args.command == "convert":
                return run_convert(args)
            if args.command == "train":
                return run_train(args)
            if args.command == "serve":
                o = vars(args)
                return run_serve(args, _model_path(o), _device_kwargs(o))
            return print_info(args.image) if args.command == "info" else _run(args)
    except SdjaxError as e:
        print(f"sdjax: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"sdjax: interrupted (signal {e.signum}); rerun the same command to resume", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
