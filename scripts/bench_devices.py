"""Per-image time against device count, and the memory arithmetic of replication vs FSDP.

    python scripts/bench_devices.py time [--model FOLDER] [--batch 8] [--devices 1,2,4,8]
    python scripts/bench_devices.py memory [--reference reference/] [--activations]

`time` runs on simulated CPU devices (jax_num_cpu_devices): every "device" is a slice of the
same CPU, so this measures the cost of sharding (padding, placement, partitioned programs),
not a speedup; real accelerators each bring their own compute. Without --model it builds the
tiny random model embedded in the package (sdjax/assets/tiny, the CLI's default).

`memory` counts the parameters of SD 1.5 and SD 2.1 from the reference configs (our models
built abstractly with nnx.eval_shape: shapes only, no weights) and prints bytes per device
for inference and full fine-tuning with AdamW, replicated vs FSDP over N devices.
--activations also compiles one UNet forward at 512x512 (batch 2: cond + uncond) on CPU and
reports XLA's temporary buffer size (slow: minutes).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from sdjax import runtime

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


def header(what: str) -> str:
    """The first line of an output: what, when, where (load average: other work on the cores)."""
    import platform

    import jax

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"# sdjax bench_devices {what}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} cores, load average {load}")


def bench_time(args) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", max(int(d) for d in args.devices.split(",")))
    import numpy as np

    import sdjax

    model = args.model
    if model is None:
        model = Path(sdjax.__file__).parent / "assets" / "tiny"
    pipe = sdjax.load_pipeline(model)
    kw = dict(steps=args.steps, width=args.size, height=args.size, sampler="euler", schedule="karras",
              batch_size=args.batch, seed=0)
    print(header("time"))
    print(f"{jax.device_count()} simulated CPU devices on {jax.devices()[0].platform}; batch {args.batch}, "
          f"{args.size}x{args.size}, {args.steps} steps; median of {args.repeats} after a warm-up\n")
    print("| devices | per-image time (ms) | batch time (ms) |\n|---|---|---|")
    ref = None
    for n in [int(d) for d in args.devices.split(",")]:
        devices = None if n == 1 else n
        pipe.generate(["a prompt"] * args.batch, devices=devices, **kw)  # compile
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = pipe.generate(["a prompt"] * args.batch, devices=devices, **kw)
            times.append(time.perf_counter() - t0)
        ref = out.latents if ref is None else ref
        assert np.abs(out.latents - ref).max() <= 1e-4 * np.abs(ref).max(), "sharded result differs"
        t = float(np.median(times))
        print(f"| {n} | {1000 * t / args.batch:.1f} | {1000 * t:.0f} |", flush=True)


def _count(tree) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def param_counts(ref: Path) -> dict[str, int]:
    """Parameter counts of the unet, vae and text_encoder of a reference folder (configs only)."""
    from flax import nnx

    from sdjax.weights import diffusers as d

    counts = {}
    for kind in ("unet", "vae", "text_encoder"):
        config_cls, model_cls, _ = d._table_entry(kind)
        abstract = d.abstract_model(model_cls, d.read_config(kind, ref / kind))
        counts[kind] = _count(nnx.state(abstract, nnx.Param))
    return counts


def unet_activation_bytes(ref: Path, batch: int = 2, latent: int = 64) -> int:
    """XLA's temporary buffers for one fp32 UNet forward (compiled on CPU, nothing run)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sdjax.weights import diffusers as d

    _, model_cls, _ = d._table_entry("unet")
    config = d.read_config("unet", ref / "unet")
    graph, state = nnx.split(d.abstract_model(model_cls, config))

    def fwd(state, x, t, ctx):
        return nnx.merge(graph, state)(x, t, ctx)

    sds = jax.ShapeDtypeStruct
    ctx_dim = config.cross_attention_dim
    compiled = jax.jit(fwd).lower(state, sds((batch, latent, latent, 4), jnp.float32), sds((batch,), jnp.float32),
                                  sds((batch, 77, ctx_dim), jnp.float32)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def bench_memory(args) -> None:
    ref_root = Path(args.reference)
    print(header("memory"))
    print("Bytes per device (GiB). N = devices in the fsdp axis; FSDP divides every line by N "
          "(weights are gathered layer by layer where used).\n")
    print("| model | UNet params | VAE params | text encoder params | total |\n|---|---|---|---|---|")
    counts = {}
    for name in args.models.split(","):
        c = counts[name] = param_counts(ref_root / name)
        print(f"| {name} | {c['unet']:,} | {c['vae']:,} | {c['text_encoder']:,} | {sum(c.values()):,} |")
    print("\n| model | what | replicated | FSDP N=4 | FSDP N=8 |\n|---|---|---|---|---|")
    for name, c in counts.items():
        total, unet, frozen = sum(c.values()), c["unet"], c["vae"] + c["text_encoder"]
        rows = {
            "inference weights, fp16/bf16 (2 B/param)": 2 * total,
            "inference weights, fp32 (4 B/param)": 4 * total,
            "fine-tune UNet: fp32 weights + grads + AdamW m, v (16 B/param)": 16 * unet,
            "  + EMA copy (4 B/param)": 4 * unet,
            "  + frozen VAE + text encoder, fp32": 4 * frozen,
            "fine-tune total (the three lines above)": 20 * unet + 4 * frozen,
        }
        for what, b in rows.items():
            print(f"| {name} | {what} | {b / GiB:.2f} | {b / 4 / GiB:.2f} | {b / 8 / GiB:.2f} |")
    if args.activations:
        for name in counts:
            t0 = time.perf_counter()
            b = unet_activation_bytes(ref_root / name)
            print(f"\n{name}: one fp32 UNet forward, batch 2 at 512x512 (64x64 latents): XLA temporaries "
                  f"{b / GiB:.2f} GiB per device (compiled in {time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("time")
    t.add_argument("--model")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--size", type=int, default=64)
    t.add_argument("--steps", type=int, default=4)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--devices", default="1,2,4,8")
    m = sub.add_parser("memory")
    m.add_argument("--reference", default=os.environ.get("SDJAX_REFERENCE", str(ROOT / "reference")))
    m.add_argument("--models", default="sd15,sd21")
    m.add_argument("--activations", action="store_true")
    args = p.parse_args()
    runtime.configure()  # process-wide XLA settings, before JAX starts
    bench_time(args) if args.what == "time" else bench_memory(args)


if __name__ == "__main__":
    main()
