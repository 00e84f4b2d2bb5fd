"""The `sdjax serve` command: parse, load the model, serve with uvicorn (process 0) or follow.

    sdjax serve --model model.safetensors --port 7860 --devices all --max-batch 32 --batch-wait-ms 50
    sdjax serve --api-auth user:secret --host 0.0.0.0 --models-dir models/ --outdir outputs/
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

import jax

from sdjax import parallel, runtime, serve
from sdjax.errors import UsageError
from sdjax.models.kernels import ATTENTION, CONV
from sdjax.pipeline.load import load_pipeline
from sdjax.pipeline.request import Limits
from sdjax.serve import a1111
from sdjax.serve.scheduler import Scheduler


def add_serve_parser(sub, add_device_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    s = sub.add_parser("serve", help="serve AUTOMATIC1111's web API (see sdjax serve --help)")
    s.add_argument("--model", help="diffusers folder or .safetensors file (default: the embedded tiny model)")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    s.add_argument("--attention", choices=ATTENTION, help="attention implementation (as sdjax generate)")
    s.add_argument("--conv", choices=CONV, help="convolution implementation (as sdjax generate)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--max-batch", type=int, default=32, help="most images per compiled call (default 32)")
    s.add_argument("--batch-wait-ms", type=float, default=50.0,
                   help="how long a request waits for batch-mates (default 50 ms)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 503 (default 64)")
    s.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MB; more get 413")
    s.add_argument("--api-auth", help="user:password[,user2:password2]: HTTP basic auth on every route")
    s.add_argument("--models-dir", help="checkpoints for sd_model_checkpoint (POST /sdapi/v1/options)")
    s.add_argument("--lora-dir", help="LoRA files for <lora:name:w> tags (default MODELS_DIR/Lora)")
    s.add_argument("--controlnet-dir", help="ControlNet models for the ControlNet extension's units "
                                            "(default MODELS_DIR/ControlNet)")
    s.add_argument("--outdir", help="also save every image there (PNG with parameters)")
    s.add_argument("--max-pixels", type=int, help="largest width x height per image (default 4096x4096)")
    s.add_argument("--max-steps", type=int, help="most sampling steps (default 1000)")
    s.add_argument("--max-batch-size", type=int, help="most images per request (default 64)")
    add_device_flags(s)


def _folder(value: str | None, default: Path | None, flag: str) -> Path | None:
    if value is None:
        return default if default is not None and default.is_dir() else None
    path = Path(value)
    if not path.is_dir():
        raise UsageError(f"{flag} {value!r} is not a folder")
    return path


def run_serve(args, model: Path, device_kw: dict) -> int:
    """Serve until stopped (SIGINT / SIGTERM: the running batch finishes, queued requests get 503)."""
    for flag in ("port", "max_batch", "max_queue"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.batch_wait_ms < 0 or args.max_body_mb <= 0:
        raise UsageError("--batch-wait-ms must be >= 0 and --max-body-mb > 0")
    limits = Limits(**{k: getattr(args, k) for k in ("max_pixels", "max_steps", "max_batch_size")
                       if getattr(args, k) is not None})
    models_dir = _folder(args.models_dir, None, "--models-dir")
    ctx = a1111.Context(lora_dir=_folder(args.lora_dir, models_dir and models_dir / "Lora", "--lora-dir"),
                        controlnet_dir=_folder(args.controlnet_dir, models_dir and models_dir / "ControlNet",
                                               "--controlnet-dir"), limits=limits)
    outdir = Path(args.outdir) if args.outdir else None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
    runtime.configure(compilation_cache=runtime.default_cache_dir())
    try:
        parallel.distributed_init(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as e:
        raise UsageError(str(e)) from None

    def load(path: Path):
        return load_pipeline(path, args.dtype, attention=args.attention, conv=args.conv)

    sched = Scheduler(load(model), ctx, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
                      max_queue=args.max_queue, device_kw=device_kw, outdir=outdir, load=load, models_dir=models_dir)
    if jax.process_index() != 0:
        sched.follow()  # the HTTP server is process 0's; this one runs its share of each batch
        return 0
    try:
        import uvicorn
    except ImportError:
        raise UsageError("sdjax serve needs FastAPI and uvicorn: pip install 'sdjax[serve]'") from None
    app = serve.create_app(sched.pipe, ctx=ctx, api_auth=args.api_auth, max_body_bytes=int(args.max_body_mb * 2**20),
                           models_dir=models_dir, scheduler=sched)
    print(f"sdjax serve: {os.fspath(model)} on http://{args.host}:{args.port} "
          f"({jax.process_count()} process(es), {jax.device_count()} device(s))", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=600)
    return 0


__all__ = ["add_serve_parser", "run_serve"]
