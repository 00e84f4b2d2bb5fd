"""sdjax against diffusers on one accelerator: the issue #23 table in one command.

    python scripts/benchmark.py --device gpu --json r.json --table r.md     # SD 1.5 config, 512 px
    python scripts/benchmark.py --device gpu --quick                        # tiny config, CPU is fine (CI)

Same random weights (the SD 1.5 config from the reference folder) on both sides, the same
dtype (bfloat16 by default), prompt, Euler sampler, guidance 7.5 and initial noise. Measured:
- the device's dense matmul peak in that dtype (jax and torch, n x n);
- the UNet forward (cond + uncond batches of 2 x images, 64x64 latents): ms, TFLOP/s of
  sdjax's plain FLOP count and the share of the measured peak; diffusers eager beside it;
- txt2img per call and images/s at batch 1, 8 and 32: sdjax (its default kernels: cuDNN flash
  attention on NVIDIA GPUs), diffusers eager, diffusers with `torch.compile` on the UNet; the
  largest pixel difference of sdjax's images from diffusers eager's, same noise;
- sdjax's cold compile of each generate function and, in a fresh process with the
  persistent compilation cache, the time from the call until the sampler can start (text
  encoding, tracing, loading the executable): the warm start;
- levers: the UNet forward with other attention implementations and in float16.

Times are medians of `--repeats` runs after a warm-up, with the device synchronised. Rows go to
the JSON file as they come (a run cut short keeps what it measured); `--budget-s` skips the
optional items (torch.compile beyond the first batch, levers) once that many seconds have
passed. On a machine without torch's CUDA, the diffusers columns run on torch's CPU; on TPU
they are left out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="gpu", choices=("gpu", "tpu", "any"),
                   help="the accelerator to measure; without one, only --quick runs (on CPU)")
    p.add_argument("--quick", action="store_true", help="tiny config, 64 px, 2 steps: a smoke test")
    p.add_argument("--reference", help="SD 1.5 reference folder (configs + tokenizer)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--batches", type=_ints, help="txt2img batch sizes (default 1,8,32)")
    p.add_argument("--compile-batches", type=_ints, help="batches for diffusers + torch.compile (default 8,32,1)")
    p.add_argument("--unet-batches", type=_ints, help="UNet forward batch sizes, cond+uncond (default 16,64)")
    p.add_argument("--size", type=int, help="image size in px (default 512)")
    p.add_argument("--steps", type=int, help="sampler steps (default 20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention", help="sdjax attention implementation (default: its own choice)")
    p.add_argument("--levers", default="xla,softmax,float16",
                   help="UNet-forward variants to time: attention names and/or float16 ('' for none)")
    p.add_argument("--sections", default="peak,unet,txt2img,warm,levers")
    p.add_argument("--budget-s", type=float, default=330.0)
    p.add_argument("--json", help="write the rows and machine description here")
    p.add_argument("--table", help="write the markdown table here")
    p.add_argument("--profile", help="write a jax.profiler trace (with a Perfetto JSON) of two UNet "
                                      "forwards at the first UNet batch into this folder")
    p.add_argument("--dump-hlo", help="write the optimized HLO of the UNet forward at the first UNet batch here "
                                      "(to map a profile's fusion names to operations)")
    p.add_argument("--ready-worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.batches = a.batches or ((1, 2) if q else (1, 8, 32))
    a.compile_batches = a.compile_batches if a.compile_batches is not None else (() if q else (8, 32, 1))
    a.unet_batches = a.unet_batches or ((2,) if q else (16, 64))
    a.size = a.size or (64 if q else 512)
    a.steps = a.steps or (2 if q else 20)
    return a


class Bench:
    """Rows, timing and output of one run."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.info: dict = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def row(self, section: str, item: str, unit: str, **values) -> dict:
        r = {"section": section, "item": item, "unit": unit, **values}
        self.rows.append(r)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        print(f"[{self.elapsed():6.1f}s] {section:8s} {item:44s} {unit:9s} {shown}", flush=True)
        self.save()
        return r

    def save(self) -> None:
        if self.args.json:
            _atomic_write(self.args.json, json.dumps({"machine": self.info, "rows": self.rows}, indent=1))
        if self.args.table:
            _atomic_write(self.args.table, self.table())

    def table(self) -> str:
        cols = ("sdjax", "diffusers", "diffusers_compile", "ratio", "note")
        lines = [f"sdjax vs diffusers on {self.info.get('device', '?')}, {self.info.get('date', '')}; "
                 f"{self.info.get('dtype', '')}, {self.info.get('size', '')} px, {self.info.get('steps', '')} "
                 f"Euler steps, guidance {GUIDANCE}; jax {self.info.get('jax')}, torch {self.info.get('torch')}, "
                 f"diffusers {self.info.get('diffusers')}",
                 "", "| section | item | unit | sdjax | diffusers eager | diffusers + torch.compile | ratio | note |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append("| " + " | ".join([r["section"], r["item"], r["unit"]] + [_fmt(r.get(c)) for c in cols]) + " |")
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _atomic_write(path: str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _median_time(fn, sync, repeats: int, warmup: bool = True) -> tuple[float, object]:
    """(median seconds, last result) of fn() over `repeats` synchronised runs."""
    if warmup:
        sync(fn())
    times, result = [], None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        result = fn()
        sync(result)
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


# ---- setup -------------------------------------------------------------------------------

def _torch_device():
    import torch
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _torch_sync(_=None):
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _jax_sync(x=None):
    import jax
    jax.block_until_ready(x)


def machine_info(args) -> dict:
    import jax
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "jax": jax.__version__, "backend": jax.default_backend(), "devices": len(jax.devices()),
            "device": jax.devices()[0].device_kind, "python": platform.python_version(),
            "dtype": args.dtype, "size": args.size, "steps": args.steps, "quick": args.quick}
    for name in ("flax", "torch", "diffusers", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    try:
        import torch
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def build(args, configs, dtype: str, with_torch: bool):
    """(torch models on torch's device or None, sdjax Pipeline with the same weights, tokenizer)."""
    from transformers import CLIPTokenizer

    from bench import parts
    from sdjax.models.kernels import Kernels

    tokenizer = CLIPTokenizer.from_pretrained(str(Path(args.reference) / "tokenizer"))
    if with_torch:
        import torch
        torch_models = parts.torch_models(configs, dtype=dtype, seed=0)
        # Copies to numpy on the host before the torch models move to the GPU.
        models = parts.sdjax_from_torch(torch_models, configs, dtype)
        for m in torch_models.values():
            m.to(_torch_device())
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    else:
        torch_models, models = None, parts.sdjax_random(configs, dtype=dtype, seed=0)
    pipe = parts.sdjax_pipeline(models, configs, tokenizer, dtype)
    pipe.use_kernels(kernels=Kernels.resolve(attention=args.attention))
    return torch_models, pipe, tokenizer


# ---- sections ----------------------------------------------------------------------------

def section_peak(b: Bench, with_torch: bool) -> float:
    import jax
    import jax.numpy as jnp
    n = 512 if b.args.quick else 8192
    dt = b.args.dtype
    rng = np.random.default_rng(0)
    a, c = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    aj, cj = jnp.asarray(a, dt), jnp.asarray(c, dt)
    dot = jax.jit(jnp.dot)
    tj, _ = _median_time(lambda: dot(aj, cj), _jax_sync, 10)
    tt = None
    if with_torch:
        import torch
        from bench import parts
        at, ct = (torch.from_numpy(m).to(parts.torch_dtype(dt)).to(_torch_device()) for m in (a, c))
        tt, _ = _median_time(lambda: torch.mm(at, ct), _torch_sync, 10)
    pj, pt = 2 * n**3 / tj / 1e12, (2 * n**3 / tt / 1e12 if tt else None)
    peak = max(pj, pt or 0.0)
    b.row("peak", f"matmul {n}x{n} {dt}", "TFLOP/s", sdjax=pj, diffusers=pt,
          note=f"jax.jit(jnp.dot) vs torch.mm; shares below are of the larger, {peak:.0f}")
    return peak


def _unet_flops(pipe, args_) -> float:
    """FLOPs of one UNet call in its plain formulation (softmax attention, lax convs), by XLA's
    cost analysis of the program lowered for the CPU (the fused kernels are opaque to it, and a
    GPU lowering offers no analysis before compiling). NaN if no analysis is to be had."""
    import jax
    from flax import nnx

    from sdjax.models.kernels import Kernels
    from sdjax.models.layers import apply_kernels
    plain = apply_kernels(pipe.unet.module(), Kernels(attention="softmax", conv="xla", backend="cpu"))
    graph = nnx.graphdef(plain)
    fn = jax.jit(lambda s, x, t, c: nnx.merge(graph, s)(x, t, c))
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args_)
    attempts = (lambda: fn.lower(*abstract).cost_analysis(), lambda: fn.lower(*args_).compile().cost_analysis())
    for attempt in attempts:
        try:
            cost = attempt()
            if isinstance(cost, (list, tuple)):
                cost = cost[0]
            if cost and cost.get("flops"):
                return float(cost["flops"])
        except Exception as e:  # noqa: BLE001 - try the next way
            print(f"flop count: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return float("nan")


def _unet_inputs(pipe, configs, batch: int, latent: int, dtype: str):
    import jax.numpy as jnp
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
    ctx = rng.standard_normal((batch, 77, configs["unet"]["cross_attention_dim"])).astype(np.float32)
    t = np.full((batch,), 500.0, np.float32)
    return (pipe.unet.state, jnp.asarray(x, dtype), jnp.asarray(t), jnp.asarray(ctx, dtype)), (x, t, ctx)


def section_unet(b: Bench, pipe, configs, torch_models, peak: float) -> None:
    latent = b.args.size // 8
    unet_cfg = configs["unet"]
    heads = unet_cfg["attention_head_dim"]
    heads = heads[0] if isinstance(heads, list) else heads
    width = unet_cfg["block_out_channels"][0]
    attention = pipe.kernels.attention_for(b.args.dtype, (1, latent * latent, heads, width // heads),
                                           (1, latent * latent, heads, width // heads))
    for batch in b.args.unet_batches:
        args_, (x, t, ctx) = _unet_inputs(pipe, configs, batch, latent, b.args.dtype)
        start = time.perf_counter()
        compiled = pipe.unet.apply.lower(*args_).compile()
        compile_s = time.perf_counter() - start
        ts, _ = _median_time(lambda: compiled(*args_), _jax_sync, b.args.repeats)
        td = None
        if torch_models is not None:
            import torch
            from bench import parts
            dev, tdt = _torch_device(), parts.torch_dtype(b.args.dtype)
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev, tdt)
            tt, ct = torch.from_numpy(t).to(dev), torch.from_numpy(ctx).to(dev, tdt)
            with torch.inference_mode():
                td, _ = _median_time(lambda: torch_models["unet"](xt, tt, ct).sample, _torch_sync, b.args.repeats)
        flops = _unet_flops(pipe, args_)
        tflops = flops / ts / 1e12
        b.row("unet", f"forward batch {batch}, {latent}x{latent} latents", "ms", sdjax=ts * 1e3,
              diffusers=td * 1e3 if td else None, ratio=td / ts if td else None,
              note=f"{tflops:.0f} TFLOP/s = {tflops / peak:.0%} of the measured peak; "
                   f"{flops / batch / 1e12:.3f} TFLOP per latent; compile {compile_s:.1f} s; "
                   f"attention {attention} (first level)")
        if b.args.dump_hlo and batch == b.args.unet_batches[0]:
            _atomic_write(b.args.dump_hlo, compiled.as_text())
        if b.args.profile and batch == b.args.unet_batches[0]:
            import jax
            with jax.profiler.trace(b.args.profile, create_perfetto_trace=True):
                for _ in range(2):
                    jax.block_until_ready(compiled(*args_))
            b.row("unet", f"profile of 2 forwards, batch {batch}", "-", note=f"trace in {b.args.profile}")
            print(trace_summary(b.args.profile), flush=True)


def trace_summary(folder: str, top: int = 30) -> str:
    """Device time by kernel name from the newest Perfetto trace under `folder`: each device
    process's `top` kernels with their total milliseconds and share, then the shares by kind."""
    import collections
    import gzip
    files = sorted(Path(folder).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        return "no perfetto_trace.json.gz found"
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, n in names.items() if "/device:" in n} or set(names)
    lines = []
    for pid in sorted(devices):
        totals: collections.Counter = collections.Counter()
        for e in events:
            if e.get("ph") == "X" and e.get("pid") == pid:
                totals[e["name"]] += e.get("dur", 0.0)
        if not totals:
            continue
        total = sum(totals.values())
        lines.append(f"-- {names.get(pid, pid)}: {total / 1e3:.2f} ms in {len(totals)} distinct events")
        for name, us in totals.most_common(top):
            lines.append(f"{us / 1e3:9.3f} ms {us / total:6.1%}  {name[:110]}")
        kinds: collections.Counter = collections.Counter()
        for name, us in totals.items():
            low = name.lower()
            kind = next((k for k, keys in (("attention", ("flash", "fmha", "attention", "sdpa")),
                                           ("conv", ("conv", "implicit", "xmma_fprop", "dgrad", "wgrad")),
                                           ("matmul", ("gemm", "cutlass", "sm90_xmma", "matmul", "dot")),
                                           ("fusion", ("fusion", "loop_", "input_", "reduce", "triton")),
                                           ("copy", ("copy", "memcpy", "memset", "transpose")))
                         if any(key in low for key in keys)), "other")
            kinds[kind] += us
        lines.append("   by kind: " + ", ".join(f"{k} {v / total:.0%}" for k, v in kinds.most_common()))
    return "\n".join(lines)


def section_levers(b: Bench, pipe, configs, peak: float) -> None:
    """The UNet forward at the first UNet batch with other kernels or dtypes: what each buys."""
    from sdjax.models.kernels import Kernels
    latent, batch = b.args.size // 8, b.args.unet_batches[0]
    for lever in [x for x in b.args.levers.split(",") if x]:
        if b.over_budget():
            b.row("levers", f"{lever}", "ms", note="skipped: over --budget-s")
            continue
        try:
            if lever in ("float16", "bfloat16", "float32"):
                import jax
                args_, _ = _unet_inputs(pipe, configs, batch, latent, lever)
                args_ = (jax.tree.map(lambda a: a.astype(lever), pipe.unet.state),) + args_[1:]
                fn = jax.jit(_with_dtype(pipe.unet, lever))
            else:
                unet = type(pipe.unet)(pipe.unet.module(), pipe.unet.config, None,
                                       Kernels(attention=lever, conv=pipe.kernels.conv, backend=pipe.kernels.backend))
                args_, _ = _unet_inputs(pipe, configs, batch, latent, b.args.dtype)
                fn = unet.apply
            compiled = fn.lower(*args_).compile()
            ts, _ = _median_time(lambda: compiled(*args_), _jax_sync, b.args.repeats)
            flops = _unet_flops(pipe, _unet_inputs(pipe, configs, batch, latent, b.args.dtype)[0])
            b.row("levers", f"UNet batch {batch}: {lever}", "ms", sdjax=ts * 1e3,
                  note=f"{flops / ts / 1e12:.0f} TFLOP/s = {flops / ts / 1e12 / peak:.0%} of the measured peak")
        except Exception as e:  # a lever that cannot run here is a finding, not a crash
            b.row("levers", f"UNet batch {batch}: {lever}", "ms", note=f"ERROR {type(e).__name__}: {str(e)[:160]}")


def _with_dtype(unet, dtype: str):
    """A pure function running `unet`'s module rebuilt with `dtype` compute and parameters."""
    import jax.numpy as jnp
    from flax import nnx

    from sdjax.models.layers import apply_kernels
    from sdjax.weights.diffusers import abstract_model
    model = abstract_model(type(unet.module()), unet.config, jnp.dtype(dtype))
    if unet.kernels is not None:
        apply_kernels(model, unet.kernels)
    graph = nnx.graphdef(model)
    return lambda s, x, t, c: nnx.merge(graph, s)(x, t, c)


def _diffusers_latents(noise_nhwc, sigma0: float, dpipe):
    """Unit noise as diffusers' `latents`, scaled so its x_T equals sdjax's noise * sigmas[0]."""
    import torch
    init = float(dpipe.scheduler.init_noise_sigma)
    return torch.from_numpy(np.ascontiguousarray(noise_nhwc.transpose(0, 3, 1, 2)) * (sigma0 / init))


def section_txt2img(b: Bench, pipe, configs, torch_models, tokenizer) -> dict:
    import jax
    from bench import parts
    from sdjax import sampling

    a = b.args
    gen = parts.Txt2Img(pipe, guidance=GUIDANCE, sampler="euler")
    dpipe = None
    if torch_models is not None:
        dpipe = parts.diffusers_pipeline(torch_models, tokenizer, configs["scheduler"])
        dpipe.scheduler.set_timesteps(a.steps)
    sigma0 = float(sampling.diffusers_schedule(gen.model, a.steps, solver="euler")[1][0])
    results = {}
    for batch in a.batches:
        prompts, seeds = [PROMPT] * batch, list(range(batch))
        inputs = gen.inputs(prompts, a.size, a.steps, seeds)
        gen.compile(inputs)
        compile_s = gen.compile_s[(inputs.noise.shape, inputs.sigmas.shape)]
        ts, (images, noise) = _median_time(lambda: gen(prompts, a.size, a.steps, seeds), _jax_sync, a.repeats)
        td = diff_max = diff_mean = None
        if dpipe is not None:
            import torch
            latents = _diffusers_latents(noise, sigma0, dpipe)

            def run_d():
                with torch.inference_mode():
                    return dpipe(prompt=prompts, height=a.size, width=a.size, num_inference_steps=a.steps,
                                 guidance_scale=GUIDANCE, latents=latents.to(dpipe.unet.dtype),
                                 output_type="np").images
            td, ref = _median_time(run_d, _torch_sync, a.repeats)
            diff = np.abs(np.asarray(images, np.float32) - np.asarray(ref, np.float32)) * 255
            diff_max, diff_mean = float(diff.max()), float(diff.mean())
        b.row("txt2img", f"batch {batch}", "s/call", sdjax=ts, diffusers=td, ratio=td / ts if td else None,
              note=f"sdjax {batch / ts:.2f} images/s" + (f", diffusers {batch / td:.2f}" if td else "")
              + f"; compile {compile_s:.1f} s"
              + (f"; images differ by max {diff_max:.2f}/255, mean {diff_mean:.3f}/255" if td else ""))
        results[batch] = {"sdjax_s": ts, "diffusers_s": td, "compile_s": compile_s}
    return results, dpipe, sigma0


def _compiled_diffusers(b: Bench, dpipe, torch_models, results: dict, sigma0: float) -> None:
    import torch
    a = b.args
    eager = torch_models["unet"]
    dpipe.unet = torch.compile(eager)
    try:
        for i, batch in enumerate(a.compile_batches):
            if i and b.over_budget():
                b.row("txt2img", f"batch {batch} torch.compile", "s/call", note="skipped: over --budget-s")
                continue
            prompts = [PROMPT] * batch
            noise = np.random.default_rng(batch).standard_normal((batch, a.size // 8, a.size // 8, 4)).astype(np.float32)
            latents = _diffusers_latents(noise, sigma0, dpipe).to(eager.dtype)

            def run_c():
                with torch.inference_mode():
                    return dpipe(prompt=prompts, height=a.size, width=a.size, num_inference_steps=a.steps,
                                 guidance_scale=GUIDANCE, latents=latents, output_type="np").images
            start = time.perf_counter()
            run_c()
            _torch_sync()
            first = time.perf_counter() - start
            tc, _ = _median_time(run_c, _torch_sync, a.repeats, warmup=False)
            ts = results.get(batch, {}).get("sdjax_s")
            b.row("txt2img", f"batch {batch} vs torch.compile", "s/call", sdjax=ts,
                  diffusers=results.get(batch, {}).get("diffusers_s"), diffusers_compile=tc,
                  ratio=tc / ts if ts else None,
                  note=f"diffusers + torch.compile {batch / tc:.2f} images/s; its first call {first:.1f} s")
    finally:
        dpipe.unet = eager


def section_warm(b: Bench, cache_dir: str) -> None:
    """A fresh process, the persistent cache filled by this one: seconds until the sampler starts."""
    a = b.args
    spec = {"reference": a.reference, "quick": a.quick, "dtype": a.dtype, "size": a.size, "steps": a.steps,
            "attention": a.attention, "cache_dir": cache_dir, "batch": 1}
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=f"{ROOT}{os.pathsep}"
               + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    # Twice: the first fresh process also pays one-time costs outside JAX's cache (driver and
    # library start-up, files not yet in the page cache); the second is the steady warm start.
    for attempt in (1, 2):
        proc = subprocess.run([sys.executable, str(Path(__file__)), "--ready-worker", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            b.row("compile", f"warm start, batch 1, process {attempt}", "s",
                  note=f"ERROR exit {proc.returncode}: {proc.stderr[-300:]}")
            return
        r = json.loads(lines[-1][len("RESULT "):])
        log = [ln for ln in proc.stderr.splitlines() if "persistent compilation cache" in ln.lower()]
        hits = sum("cache hit" in ln for ln in log)
        b.row("compile", f"warm start to the first step, batch 1, process {attempt}", "s", sdjax=r["ready_s"],
              note=f"fresh process, persistent cache: text {r['inputs_s']:.2f} s, trace {r['trace_s']:.2f} s, "
                   f"load {r['compile_s']:.2f} s; cache hits {hits} of {len(log)} logged lookups")
        for ln in log:
            if "cache hit" not in ln:
                print("  cache:", ln[:300], flush=True)
        if hits < len(log):  # a miss: show why, as JAX explains it
            print("  worker stderr tail:", proc.stderr[-1500:], flush=True)


def ready_worker(spec: dict) -> dict:
    """In a fresh process: random weights (no torch), then the generate call's work up to its
    first sampler step -- text encoding and noise, tracing, the executable from the cache."""
    import logging

    import jax
    logging.basicConfig(level=logging.WARNING)
    jax.config.update("jax_explain_cache_misses", True)  # logs each persistent-cache miss
    jax.config.update("jax_log_compiles", True)  # ... and each hit
    jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from bench import parts
    args = argparse.Namespace(reference=spec["reference"], attention=spec["attention"])
    configs = parts.reference_configs(Path(spec["reference"]), spec["quick"])
    _, pipe, _ = build(args, configs, spec["dtype"], with_torch=False)
    gen = parts.Txt2Img(pipe, guidance=GUIDANCE, sampler="euler")
    return parts.time_until_ready(gen, [PROMPT] * spec["batch"], spec["size"], spec["steps"],
                                  list(range(spec["batch"])))


def main(argv=None) -> int:
    args = parse_args(argv)
    # Both frameworks share the device: JAX takes 60% of its memory, torch the rest.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    if args.reference is None:
        from bench import parts
        args.reference = str(parts.default_reference())
    if args.ready_worker:
        print("RESULT " + json.dumps(ready_worker(json.loads(args.ready_worker))), flush=True)
        return 0
    import jax

    backend = jax.default_backend()
    if args.device in ("gpu", "tpu") and backend != args.device and not args.quick:
        print(f"--device {args.device}: JAX's backend here is {backend}; only --quick runs without it", file=sys.stderr)
        return 2
    cache_dir = tempfile.mkdtemp(prefix="sdjax_bench_cache_")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    from bench import parts
    b = Bench(args)
    b.info = machine_info(args)
    print(json.dumps(b.info), flush=True)
    sections = set(args.sections.split(","))
    with_torch = backend != "tpu"
    configs = parts.reference_configs(Path(args.reference), tiny=args.quick)
    start = time.perf_counter()
    torch_models, pipe, tokenizer = build(args, configs, args.dtype, with_torch)
    b.row("setup", "random weights, both sides", "s", sdjax=time.perf_counter() - start,
          note=f"sdjax kernels: {pipe.kernels}")
    def guarded(name, fn, *a, default=None):
        """A section that fails adds an ERROR row; the others still run."""
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            b.row(name, "ERROR", "-", note=f"{type(e).__name__}: {str(e)[:300]}")
            return default

    peak = guarded("peak", section_peak, b, with_torch, default=float("nan")) if "peak" in sections else float("nan")
    if "unet" in sections:
        guarded("unet", section_unet, b, pipe, configs, torch_models, peak)
    results, dpipe, sigma0 = {}, None, 0.0
    if "txt2img" in sections:
        results, dpipe, sigma0 = guarded("txt2img", section_txt2img, b, pipe, configs, torch_models, tokenizer,
                                         default=({}, None, 0.0))
    if "warm" in sections and "txt2img" in sections and 1 in args.batches:
        guarded("compile", section_warm, b, cache_dir)
    if "levers" in sections:
        guarded("levers", section_levers, b, pipe, configs, peak)
    if dpipe is not None and args.compile_batches:  # last: each torch.compile takes the longest
        guarded("txt2img", _compiled_diffusers, b, dpipe, torch_models, results, sigma0)
    print(b.table(), flush=True)
    b.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
