"""sdjax against diffusers (PyTorch) on one machine: same weights, dtype, sizes, sampler, guidance.

    from sdjax import bench
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
subprocesses (`sdjax.bench_parts.worker`).

Times are wall-clock seconds, medians of up to `Plan.repeats` runs after a warm-up (an item stops
repeating once it has used `Plan.budget_s`). sdjax's warm-up is its ahead-of-time compile
(not executed); diffusers' is the same call (a 1-step call for txt2img). Each row's ratio is
sdjax's advantage: diffusers / sdjax for times and memory, sdjax / diffusers for FLOP/s (>1:
sdjax better).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sdjax import bench_parts as parts
from sdjax.bench_parts import PROMPT, measure

SECTIONS = ("unet", "encode", "txt2img", "flops", "scaling", "compile", "memory", "levers")
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "levers")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to measure. Sizes are pixels for images and latent pixels (image / 8) for the UNet."""

    tiny: bool = False
    dtype: str = "float32"                    # the dtype of every comparison but memory/levers
    unet_latents: tuple[int, ...] = (32, 64)  # UNet forward, batch 2 (cond + uncond)
    images: tuple[int, ...] = (256,)          # txt2img measured end to end, per image, batch 1
    # txt2img estimated as text encoding + steps x UNet forward + VAE decode, all measured
    # (512 x 20 steps takes ~10 min per side on 2 cores; `--images 256,512` measures it).
    estimate_images: tuple[int, ...] = (512,)
    steps: int = 20
    guidance: float = 7.0
    repeats: int = 3
    budget_s: float = 30.0                    # stop repeating an item after this much time
    user_path: bool = False                   # also time Pipeline.generate (warm-up: a full call)
    batches: tuple[int, ...] = (1, 2, 4)      # scaling with batch size (at `steps`)
    step_counts: tuple[int, ...] = (10, 20, 40)  # scaling with steps (batch 1)
    scaling_image: int = 64
    compile_image: int = 512                  # compiled ahead of time, cold and from the cache
    compile_steps: int = 20
    start_image: int = 256                    # time to the first result in a fresh process
    start_steps: int = 1
    memory_image: int = 256
    memory_steps: int = 1                     # peak memory does not grow with steps
    lever_latent: int = 32
    matmul_n: int = 4096
    levers: str = "all"                       # "all", or "smoke": the first three of LEVERS
    seed: int = 0
    worker_timeout_s: int = 1800


# FULL takes ~20-25 min on 2 cores (AMD EPYC, float32); --levers adds ~10 min.
FULL = Plan()
QUICK = Plan(tiny=True, unet_latents=(8, 16), images=(64,), estimate_images=(128,), steps=3, repeats=2,
             budget_s=5.0, user_path=True, batches=(1, 2), step_counts=(2, 4), scaling_image=64,
             compile_image=128, compile_steps=3, start_image=64, start_steps=2, memory_image=64,
             memory_steps=2, lever_latent=8, matmul_n=256, levers="smoke", worker_timeout_s=300)


@dataclasses.dataclass
class Row:
    """One measured item. `higher_is_better` for throughputs; times and memory are lower-is-better."""

    section: str
    item: str
    unit: str
    sdjax: float | None
    diffusers: float | None = None
    note: str = ""
    higher_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        """sdjax's advantage (>1: sdjax better), or None without both values."""
        if self.sdjax is None or self.diffusers is None or not (self.sdjax > 0 and self.diffusers > 0):
            return None
        return self.sdjax / self.diffusers if self.higher_is_better else self.diffusers / self.sdjax


@dataclasses.dataclass
class Report:
    machine: dict
    plan: Plan
    rows: list[Row] = dataclasses.field(default_factory=list)

    def table(self) -> str:
        """A fixed-width text table: section, item, sdjax, diffusers, unit, sdjax advantage, note."""
        head = ("section", "item", "sdjax", "diffusers", "unit", "ratio", "note")
        body = [(r.section, r.item, _fmt(r.sdjax), _fmt(r.diffusers), r.unit,
                 "" if r.ratio is None else f"{r.ratio:.2f}x", r.note) for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (head, *body)]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def ratio_line(self) -> str:
        parts = [f"{r.section}/{r.item}={r.ratio:.2f}x" for r in self.rows if r.ratio is not None]
        return "ratios (sdjax advantage: diffusers/sdjax time or memory, sdjax/diffusers FLOP/s; >1 = sdjax " \
               "better): " + (" ".join(parts) if parts else "none")

    def to_json(self) -> dict:
        return {"machine": self.machine, "plan": dataclasses.asdict(self.plan),
                "rows": [dict(dataclasses.asdict(r), ratio=r.ratio) for r in self.rows]}


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x != x or abs(x) == float("inf"):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


# ---- the measurements ---------------------------------------------------------------------

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


def _sdjax_unet(ctx: Context, latent: int):
    """(compiled UNet forward, its args, compile seconds) for batch 2 at `latent`, cached."""
    import jax.numpy as jnp
    key = ("compiled", "unet", latent)
    if key not in ctx.cache:
        x, t, c = _unet_inputs(ctx, latent)
        unet = ctx.pipe.unet
        args = (unet.state, jnp.asarray(x, ctx.pipe.dtype), jnp.asarray(t), jnp.asarray(c, ctx.pipe.dtype))
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


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per device program
        cost = cost[0]
    return float(cost["flops"])


def section_flops(ctx: Context) -> list[Row]:
    rows, n = [], ctx.plan.matmul_n
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        pj, pt = matmul_peak(n, dtype)
        peaks[dtype] = pj
        rows.append(Row("flops", f"matmul peak {dtype} {n}x{n}", "GFLOP/s", pj, pt, "jax.jit(jnp.dot) vs torch.mm",
                        higher_is_better=True))
    for lat in ctx.plan.unet_latents:
        compiled, args, _ = _sdjax_unet(ctx, lat)
        flops = _cost_flops(compiled)
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
                        f"{flops / 1e9:.1f} GFLOP/call (XLA cost analysis); {100 * gs / peak:.0f}% / "
                        f"{100 * gd / peak:.0f}% of the jax {ctx.plan.dtype} matmul peak", higher_is_better=True))
    return rows


def _check(result: dict, what: str) -> dict:
    if "error" in result:
        raise RuntimeError(f"{what}: {result['error']}")
    return result


def section_compile(ctx: Context) -> list[Row]:
    """Fresh processes, twice with one persistent cache dir: time to the first result at
    start_image x start_steps, and the ahead-of-time compile (not run) at compile_image x
    compile_steps. diffusers' start (nothing to compile) for comparison."""
    p = ctx.plan
    cache_dir = tempfile.mkdtemp(prefix="sdjax-bench-cache-")
    try:
        spec = dict(task="generate", dtype=p.dtype, size=p.start_image, steps=p.start_steps)
        aot = dict(aot_size=p.compile_image, aot_steps=p.compile_steps)
        cold = _check(ctx.worker(side="sdjax", cache_dir=cache_dir, **spec, **aot), "sdjax cold start")
        warm = _check(ctx.worker(side="sdjax", cache_dir=cache_dir, **spec, **aot), "sdjax warm start")
        dif = _check(ctx.worker(side="diffusers", **spec), "diffusers start")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    what = f"generate {p.compile_image}x{p.compile_image} {p.compile_steps} steps"
    rows = [Row("compile", f"{what}: compile, cold", "s", cold["aot_compile_s"], None,
                f"trace+lower {cold['aot_trace_s']:.1f}s; fresh process, empty cache"),
            Row("compile", f"{what}: compile, persistent cache", "s", warm["aot_compile_s"], None,
                f"trace+lower {warm['aot_trace_s']:.1f}s; jax_compilation_cache_dir ({cold.get('cache_files')} "
                f"files)")]
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
    ("f32, attention = einsum + f32 softmax", {"attention": "einsum"}, None),
    ("bf16, attention = jax.nn.dot_product_attention", {"dtype": "bfloat16", "attention": "dpa"}, None),
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
    parser.add_argument("--levers", action="store_true", help="add the performance-levers section")
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
    if args.levers and "levers" not in sections:
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
