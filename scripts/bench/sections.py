"""The benchmark's measurements: one function per section, over a shared `Context`. See `bench.run`."""

from __future__ import annotations

import dataclasses
import functools
import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench import parts
from bench.parts import PROMPT, measure
from bench.report import Plan, Row


class Context:
    """Models built once, on first use, and values shared between sections."""

    def __init__(self, plan: Plan, reference: Path, log: Callable[[str], None]):
        self.plan, self.reference, self.log = plan, Path(reference), log
        self.configs = parts.reference_configs(self.reference, plan.tiny)
        self.cache: dict[Any, Any] = {}

    @functools.cached_property
    def tokenizer(self):
        from transformers import CLIPTokenizer
        return CLIPTokenizer.from_pretrained(str(self.reference / "tokenizer"))

    @functools.cached_property
    def torch(self) -> dict:
        t = time.perf_counter()
        models = parts.torch_models(self.configs, dtype=self.plan.dtype, seed=self.plan.seed)
        self.log(f"built torch models ({self.plan.dtype}) in {time.perf_counter() - t:.1f} s")
        return models

    @functools.cached_property
    def pipe(self):
        t = time.perf_counter()
        models = parts.sdjax_from_torch(self.torch, self.configs, self.plan.dtype)
        self.log(f"copied the weights into sdjax in {time.perf_counter() - t:.1f} s")
        return parts.sdjax_pipeline(models, self.configs, self.tokenizer, self.plan.dtype)

    @functools.cached_property
    def dpipe(self):
        return parts.diffusers_pipeline(self.torch, self.tokenizer, self.configs["scheduler"])

    @functools.cached_property
    def gen(self) -> parts.Txt2Img:
        return parts.Txt2Img(self.pipe, guidance=self.plan.guidance)

    def release(self) -> None:
        """Drop the in-process models before the subprocess sections, so they have the memory."""
        for name in ("gen", "dpipe", "pipe", "torch"):
            self.__dict__.pop(name, None)
        self.cache = {k: v for k, v in self.cache.items() if not (isinstance(k, tuple) and k[0] == "compiled")}
        gc.collect()

    def worker(self, **spec) -> dict:
        xla_flags = spec.pop("xla_flags", None)
        full = dict(reference=str(self.reference), tiny=self.plan.tiny, seed=self.plan.seed,
                    guidance=self.plan.guidance, repeats=self.plan.repeats, budget_s=self.plan.budget_s, **spec)
        return parts.run_worker(full, xla_flags=xla_flags, timeout_s=self.plan.worker_timeout_s)


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _unet_inputs(ctx: Context, latent: int, batch: int = 2):
    rng = np.random.default_rng(ctx.plan.seed)
    x = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
    context = rng.standard_normal((batch, 77, ctx.configs["unet"]["cross_attention_dim"])).astype(np.float32)
    return x, np.full((batch,), 500.0, np.float32), context


def _sdjax_unet_args(ctx: Context, latent: int) -> tuple:
    """(state, x, t, context) of sdjax's UNet forward, batch 2 at `latent`."""
    import jax.numpy as jnp
    x, t, c = _unet_inputs(ctx, latent)
    return ctx.pipe.unet.state, jnp.asarray(x, ctx.pipe.dtype), jnp.asarray(t), jnp.asarray(c, ctx.pipe.dtype)


def _sdjax_unet(ctx: Context, latent: int):
    """(compiled UNet forward, its args, compile seconds) for batch 2 at `latent`, cached."""
    key = ("compiled", "unet", latent)
    if key not in ctx.cache:
        unet, args = ctx.pipe.unet, _sdjax_unet_args(ctx, latent)
        start = time.perf_counter()
        compiled = unet.apply.lower(*args).compile()
        ctx.cache[key] = (compiled, args, time.perf_counter() - start)
    return ctx.cache[key]


def section_unet(ctx: Context) -> list[Row]:
    import torch
    rows = []
    for lat in ctx.plan.unet_latents:
        compiled, args, compile_s = _sdjax_unet(ctx, lat)
        ts, n, out_s = measure(lambda: compiled(*args), repeats=ctx.plan.repeats, budget_s=ctx.plan.budget_s)
        x, t, c = _unet_inputs(ctx, lat)
        dt = parts.torch_dtype(ctx.plan.dtype)
        xt, ct = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dt), torch.from_numpy(c).to(dt)
        with torch.inference_mode():
            run = lambda: ctx.torch["unet"](xt, torch.from_numpy(t), encoder_hidden_states=ct).sample  # noqa: E731
            td, _, out_d = measure(run, repeats=ctx.plan.repeats, budget_s=ctx.plan.budget_s)
        diff = _maxdiff(out_s, out_d.float().numpy().transpose(0, 2, 3, 1))
        ctx.cache[("unet_s", lat)] = (ts, td)
        rows.append(Row("unet", f"forward b2 {lat}x{lat} latents", "s", ts, td,
                        f"n={n}; compile {compile_s:.1f}s; max|diff| {diff:.1e}"))
    return rows


def section_encode(ctx: Context) -> list[Row]:
    import jax.numpy as jnp
    import torch
    rows = []
    ids = parts.token_ids(ctx.tokenizer, [PROMPT, ""])
    te = ctx.pipe.text_encoder
    ids_t = torch.from_numpy(ids.astype(np.int64))
    with torch.inference_mode():
        run_t = lambda: ctx.torch["text_encoder"](ids_t).last_hidden_state  # noqa: E731
        ts, _, out_s = measure(lambda: te(ids), repeats=ctx.plan.repeats, budget_s=ctx.plan.budget_s)
        td, _, out_d = measure(run_t, repeats=ctx.plan.repeats, budget_s=ctx.plan.budget_s)
    diff = _maxdiff(out_s, out_d.float().numpy())
    ctx.cache["text_s"] = (ts, td)
    rows.append(Row("encode", "text encoder b2 (cond+uncond) x 77 tokens", "s", ts, td, f"max|diff| {diff:.1e}"))
    rng = np.random.default_rng(ctx.plan.seed)
    for size in sorted(set(ctx.plan.images) | set(ctx.plan.estimate_images)):
        z = rng.standard_normal((1, size // 8, size // 8, 4)).astype(np.float32)
        zj = jnp.asarray(z, ctx.pipe.dtype)
        zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).to(parts.torch_dtype(ctx.plan.dtype))
        with torch.inference_mode():
            run_t = lambda: ctx.torch["vae"].decode(zt).sample  # noqa: E731
            ts, _, out_s = measure(lambda: ctx.pipe.vae.decode(zj), repeats=ctx.plan.repeats,
                                   budget_s=ctx.plan.budget_s)
            td, _, out_d = measure(run_t, repeats=ctx.plan.repeats, budget_s=ctx.plan.budget_s)
        diff = _maxdiff(out_s, out_d.float().numpy().transpose(0, 2, 3, 1))
        ctx.cache[("decode_s", size)] = (ts, td)
        rows.append(Row("encode", f"VAE decode b1 -> {size}x{size}", "s", ts, td, f"max|diff| {diff:.1e}"))
    return rows


def _txt2img_pair(ctx: Context, size: int, steps: int, batch: int) -> tuple[float, float, str]:
    """Per-image seconds (sdjax, diffusers) of txt2img; both start from the same noise."""
    key = ("txt2img", size, steps, batch)
    if key in ctx.cache:
        return ctx.cache[key]
    prompts, seeds = [PROMPT] * batch, list(range(ctx.plan.seed, ctx.plan.seed + batch))
    gen = ctx.gen
    compile_first = lambda: gen.compile(gen.inputs(prompts, size, steps, seeds)) and None  # noqa: E731
    ts, n, (images, noise) = measure(lambda: gen(prompts, size, steps, seeds), repeats=ctx.plan.repeats,
                                     budget_s=ctx.plan.budget_s, warmup=compile_first)
    compile_s = gen.compile_s[(noise.shape, (steps + 1,))]
    # diffusers' warm-up is a 1-step call at the same size (a full one would double the cost).
    run_d = lambda: parts.diffusers_txt2img(ctx.dpipe, prompts, size, steps, ctx.plan.guidance, noise)  # noqa: E731
    td, _, images_d = measure(run_d, repeats=ctx.plan.repeats, budget_s=ctx.plan.budget_s,
                              warmup=lambda: parts.diffusers_txt2img(ctx.dpipe, prompts, size, 1,
                                                                     ctx.plan.guidance, noise))
    note = f"n={n}; compile {compile_s:.1f}s; image max|diff| {_maxdiff(images, images_d):.1e}"
    ctx.cache[key] = (ts / batch, td / batch, note)
    return ctx.cache[key]


def section_txt2img(ctx: Context) -> list[Row]:
    rows, steps = [], ctx.plan.steps
    for size in ctx.plan.images:
        ts, td, note = _txt2img_pair(ctx, size, steps, 1)
        rows.append(Row("txt2img", f"{size}x{size} {steps} Euler steps cfg {ctx.plan.guidance:g}",
                        "s/image", ts, td, note))
    for size in ctx.plan.estimate_images:
        parts_ = [ctx.cache.get(k) for k in ("text_s", ("unet_s", size // 8), ("decode_s", size))]
        if None in parts_ or size in ctx.plan.images:
            continue
        (xs, xd), (us, ud), (ds, dd) = parts_
        rows.append(Row("txt2img", f"{size}x{size} {steps} steps: ESTIMATE", "s/image", xs + steps * us + ds,
                        xd + steps * ud + dd, f"text + {steps} x UNet b2 {size // 8}x{size // 8} + decode, "
                        f"each measured above; sampler overhead not included"))
    if ctx.plan.user_path:
        rows.append(_user_path(ctx, min(ctx.plan.images), steps))
    return rows


def _user_path(ctx: Context, size: int, steps: int) -> Row:
    """Pipeline.generate (A1111 prompt parsing, the same jitted core, PIL, infotext) at `size`.
    Its warm-up is a full call: a jitted function's first call compiles."""
    from sdjax import sampling
    sigmas = sampling.diffusers_schedule(ctx.gen.model, steps, solver="euler")[1]
    call = lambda: ctx.pipe.generate(PROMPT, steps=steps, sampler="euler", sigmas=sigmas,  # noqa: E731
                                     cfg_scale=ctx.plan.guidance, seed=ctx.plan.seed, width=size, height=size)
    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    tg, n, _ = measure(call, repeats=ctx.plan.repeats, budget_s=ctx.plan.budget_s, warmup=lambda: None)
    return Row("txt2img", f"{size}x{size} via Pipeline.generate", "s/image", tg,
               ctx.cache[("txt2img", size, steps, 1)][1],
               f"n={n}; first call {first:.1f}s; PIL output, A1111 prompt parsing, infotext")


def section_scaling(ctx: Context) -> list[Row]:
    rows, size = [], ctx.plan.scaling_image
    for batch in ctx.plan.batches:
        ts, td, note = _txt2img_pair(ctx, size, ctx.plan.steps, batch)
        rows.append(Row("scaling", f"batch {batch}, {size}x{size}, {ctx.plan.steps} steps", "s/image", ts, td, note))
    for steps in ctx.plan.step_counts:
        ts, td, note = _txt2img_pair(ctx, size, steps, 1)
        rows.append(Row("scaling", f"{steps} steps, batch 1, {size}x{size}", "s/image", ts, td, note))
    return rows


def matmul_peak(n: int, dtype: str, repeats: int = 3) -> tuple[float, float]:
    """Measured (jax, torch) GFLOP/s of an n x n @ n x n matmul in `dtype`: the machine's practical peak."""
    import jax
    import jax.numpy as jnp
    import torch
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    aj, bj = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    dot = jax.jit(jnp.dot)
    tj, _, _ = measure(lambda: dot(aj, bj), repeats=repeats, budget_s=30)
    at, bt = (torch.from_numpy(m).to(parts.torch_dtype(dtype)) for m in (a, b))
    tt, _, _ = measure(lambda: torch.mm(at, bt), repeats=repeats, budget_s=30)
    return 2 * n**3 / tj / 1e9, 2 * n**3 / tt / 1e9


def _cost_flops(staged) -> float:
    cost = staged.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per device program
        cost = cost[0]
    return float(cost["flops"])


def _unet_flops(ctx: Context, lat: int) -> float:
    """FLOPs of one UNet b2 call in its plain formulation (lax convs, softmax attention), by
    XLA's cost analysis of the lowered program. The CPU forms run loops (per-head attention)
    whose bodies the analysis counts once, and skip taps of tiny convs that only read padding,
    so their own program would under-count the work diffusers does too."""
    import jax
    from flax import nnx
    from sdjax.models.kernels import Kernels
    from sdjax.models.layers import apply_kernels

    args = _sdjax_unet_args(ctx, lat)
    plain = apply_kernels(ctx.pipe.unet.module(), Kernels(attention="softmax", conv="xla"))
    graph = nnx.graphdef(plain)
    return _cost_flops(jax.jit(lambda s, x, t, c: nnx.merge(graph, s)(x, t, c)).lower(*args))


def section_flops(ctx: Context) -> list[Row]:
    rows, n = [], ctx.plan.matmul_n
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        pj, pt = matmul_peak(n, dtype)
        peaks[dtype] = pj
        rows.append(Row("flops", f"matmul peak {dtype} {n}x{n}", "GFLOP/s", pj, pt, "jax.jit(jnp.dot) vs torch.mm",
                        higher_is_better=True))
    for lat in ctx.plan.unet_latents:
        flops = _unet_flops(ctx, lat)
        if ("unet_s", lat) not in ctx.cache:
            section_unet_one = dataclasses.replace(ctx.plan, unet_latents=(lat,))
            saved, ctx.plan = ctx.plan, section_unet_one
            try:
                section_unet(ctx)
            finally:
                ctx.plan = saved
        ts, td = ctx.cache[("unet_s", lat)]
        gs, gd = flops / ts / 1e9, flops / td / 1e9
        peak = peaks.get(ctx.plan.dtype, peaks["float32"])
        rows.append(Row("flops", f"UNet b2 {lat}x{lat} achieved", "GFLOP/s", gs, gd,
                        f"{flops / 1e9:.1f} GFLOP/call (XLA cost analysis, plain formulation); {100 * gs / peak:.0f}% / "
                        f"{100 * gd / peak:.0f}% of the jax {ctx.plan.dtype} matmul peak", higher_is_better=True))
    return rows


def _check(result: dict, what: str) -> dict:
    if "error" in result:
        raise RuntimeError(f"{what}: {result['error']}")
    return result


def section_compile(ctx: Context) -> list[Row]:
    """Fresh processes, twice with one persistent cache dir: time to the first result at
    start_image x start_steps, and the ahead-of-time compile (not run) at compile_image x
    compile_steps; twice more with another cache: the time a compile_image x compile_steps
    generate call takes until its first sampler step starts (text encoding, trace, compile or
    cache load). diffusers' start (nothing to compile) for comparison."""
    p = ctx.plan
    cache_dir, ready_cache = (tempfile.mkdtemp(prefix="sdjax-bench-cache-") for _ in range(2))
    try:
        spec = dict(task="generate", dtype=p.dtype, size=p.start_image, steps=p.start_steps)
        aot = dict(aot_size=p.compile_image, aot_steps=p.compile_steps)
        cold = _check(ctx.worker(side="sdjax", cache_dir=cache_dir, **spec, **aot), "sdjax cold start")
        warm = _check(ctx.worker(side="sdjax", cache_dir=cache_dir, **spec, **aot), "sdjax warm start")
        dif = _check(ctx.worker(side="diffusers", **spec), "diffusers start")
        ready = dict(task="ready", dtype=p.dtype, size=p.compile_image, steps=p.compile_steps)
        ready_runs = [_check(ctx.worker(side="sdjax", cache_dir=ready_cache, **ready), f"sdjax {state} ready")
                      for state in ("cold", "warm")]
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        shutil.rmtree(ready_cache, ignore_errors=True)
    what = f"generate {p.compile_image}x{p.compile_image} {p.compile_steps} steps"
    rows = [Row("compile", f"{what}: compile, cold", "s", cold["aot_compile_s"], None,
                f"trace+lower {cold['aot_trace_s']:.1f}s; fresh process, empty cache"),
            Row("compile", f"{what}: compile, persistent cache", "s", warm["aot_compile_s"], None,
                f"trace+lower {warm['aot_trace_s']:.1f}s; jax_compilation_cache_dir ({cold.get('cache_files')} "
                f"files)")]
    for run, state in zip(ready_runs, ("cold cache", "warm cache")):
        rows.append(Row("compile", f"{what}: to its first step, {state}", "s", run["ready_s"], None,
                        f"text+noise {run['inputs_s']:.1f}s, trace+lower {run['trace_s']:.1f}s, compile "
                        f"{run['compile_s']:.1f}s; fresh process, weights in memory; from process start "
                        f"{run['ready_from_start_s']:.1f}s without building weights"))
    start = f"{p.start_image}x{p.start_image} {p.start_steps} step(s)"
    d_ready = dif["first_result_s"] - dif["weights_s"]
    for run, state in ((cold, "cold cache"), (warm, "warm cache")):
        rows.append(Row("compile", f"first result {start} after weights ready, {state}", "s",
                        run["first_result_s"] - run["weights_s"], d_ready,
                        f"compile {run['compile_s']:.1f}s; from process start {run['first_result_s']:.1f}s vs "
                        f"{dif['first_result_s']:.1f}s (import {run['import_s']:.1f}/{dif['import_s']:.1f}s, "
                        f"random weights {run['weights_s'] - run['import_s']:.1f}/"
                        f"{dif['weights_s'] - dif['import_s']:.1f}s); diffusers' first step at "
                        f"{dif['first_step_s'] - dif['weights_s']:.1f}s"))
    return rows


def section_memory(ctx: Context) -> list[Row]:
    p, rows = ctx.plan, []
    for dtype in ("float32", "bfloat16"):
        spec = dict(task="generate", dtype=dtype, size=p.memory_image, steps=p.memory_steps)
        s = _check(ctx.worker(side="sdjax", **spec), f"sdjax memory {dtype}")
        d = _check(ctx.worker(side="diffusers", **spec), f"diffusers memory {dtype}")
        rows.append(Row("memory", f"peak RSS {dtype}, txt2img {p.memory_image}x{p.memory_image}", "GiB",
                        s["peak_rss_gib"], d["peak_rss_gib"],
                        f"after weights {s['weights_rss_gib']:.2f} / {d['weights_rss_gib']:.2f} GiB; "
                        f"finite {s['finite']}/{d['finite']}"))
    return rows


# (label, sdjax spec, diffusers spec or None): one fresh process each, the UNet forward, batch 2.
LEVERS: tuple[tuple[str, dict, dict | None], ...] = (
    ("float32 (default)", {}, {}),
    ("bfloat16", {"dtype": "bfloat16"}, {"dtype": "bfloat16"}),
    ("f32, --xla_cpu_multi_thread_eigen=false", {"xla_flags": "--xla_cpu_multi_thread_eigen=false"}, None),
    ("f32, attention = einsum + f32 softmax", {"attention": "softmax"}, None),
    ("bf16, attention = jax.nn.dot_product_attention", {"dtype": "bfloat16", "attention": "xla"}, None),
    ("f32, 1 core (affinity; torch 1 thread)", {"cores": 1}, {"cores": 1}),
    ("f32, --xla_cpu_use_thunk_runtime=false", {"xla_flags": "--xla_cpu_use_thunk_runtime=false"}, None),
    ("f32, --xla_cpu_use_onednn=true", {"xla_flags": "--xla_cpu_use_onednn=true"}, None),
    ("f32, --xla_cpu_use_xnnpack=true", {"xla_flags": "--xla_cpu_use_xnnpack=true"}, None),
    ("f32, --xla_cpu_enable_fast_math=true", {"xla_flags": "--xla_cpu_enable_fast_math=true"}, None),
)


def section_levers(ctx: Context) -> list[Row]:
    lat, rows, base = ctx.plan.lever_latent, [], None
    for label, s_spec, d_spec in LEVERS if ctx.plan.levers == "all" else LEVERS[:3]:
        s = ctx.worker(**{"side": "sdjax", "task": "unet", "dtype": ctx.plan.dtype, "latent": lat, **s_spec})
        d = None if d_spec is None else ctx.worker(
            **{"side": "diffusers", "task": "unet", "dtype": ctx.plan.dtype, "latent": lat, **d_spec})
        if "error" in s:
            rows.append(Row("levers", f"UNet b2 {lat}x{lat} {label}", "s", None, None, f"failed: {s['error']}"))
            continue
        base = base or s["median_s"]
        note = f"compile {s['compile_s']:.1f}s; {base / s['median_s']:.2f}x vs sdjax default"
        if d is not None and "error" in d:
            note += f"; diffusers failed: {d['error']}"
        rows.append(Row("levers", f"UNet b2 {lat}x{lat} {label}", "s", s["median_s"],
                        None if d is None or "error" in d else d["median_s"], note))
    return rows


SECTION_FUNCTIONS: dict[str, Callable[[Context], list[Row]]] = {
    "unet": section_unet, "encode": section_encode, "txt2img": section_txt2img, "flops": section_flops,
    "scaling": section_scaling, "compile": section_compile, "memory": section_memory, "levers": section_levers}
# These run in subprocesses: the in-process models are released first to leave them the memory.
SUBPROCESS_SECTIONS = ("compile", "memory", "levers")
