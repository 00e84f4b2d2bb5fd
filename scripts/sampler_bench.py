"""Sampler bench on a real model: error of the final latents and images against NFE.

    python scripts/sampler_bench.py [--model DIR] [--quick] [--out bench_results/sampler_bench_DATE]

For fixed prompts x seeds (same noise for every sampler), each sampler x schedule x NFE x CFG
scale runs a txt2img; the error is the RMSE of its final latents (scaled, as the UNet sees them)
and of its decoded images (in [0, 1]) against a reference: Heun (2nd order) on the same schedule
family (Karras, the model's sigma range, then the jump to 0 that every sampler makes the same
way) at `--ref-nfe` (default 1199) evaluations. The measured order is the least-squares slope of
-log RMSE against log NFE over the NFE values. Stochastic samplers converge to the data
distribution, not to the ODE's endpoint, so their RMSE does not shrink to 0; they are listed
for comparison.

NFE counting: one NFE is one UNet evaluation of the CFG batch, i.e. cond and uncond run as one
batched call on 2B latents (papers count this as 1 NFE; unbatched CFG would be 2 UNet calls).
At CFG 1 the uncond half still runs. NFE is counted from the calls actually made (a host
callback per evaluation), and the step count is chosen so NFE is as close as possible to the
target (Heun-type samplers spend 2 per step, SEEDS-3 3).

Results are cached in <out>.json keyed by model, sampler, schedule, NFE and CFG scale, so a rerun
adds only what is missing; <out>.md gets the table, <out>.png a panel per sampler family.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PROMPTS = ["a red circle on a blue background", "a green square on a yellow background"]
# One panel per family in the plot.
FAMILIES = {
    "single-step ODE": ["euler", "heun", "dpm_2", "heunpp2", "dpm_fast", "euler_cfg_pp"],
    "multistep ODE": ["lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis", "unipc", "unipc_bh2", "res_multistep",
                      "gradient_estimation", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "plms",
                      "gradient_estimation_cfg_pp"],
    "stochastic": ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
                   "dpmpp_3m_sde", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddpm", "lcm",
                   "res_multistep_ancestral", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp",
                   "res_multistep_ancestral_cfg_pp", "dpmpp_2m_sde_heun", "ddim"],
}
FULL_SAMPLERS = ["euler", "heun", "dpmpp_2m", "deis", "unipc", "res_multistep", "dpmpp_2m_cfg_pp",
                 "euler_ancestral"]
QUICK_SAMPLERS = ["euler", "dpmpp_2m"]
EVALS_PER_STEP = {"heun": 2, "dpm_2": 2, "dpm_2_ancestral": 2, "dpmpp_2s_ancestral": 2, "dpmpp_sde": 2,
                  "seeds_2": 2, "sa_solver_pece": 2, "dpmpp_2s_ancestral_cfg_pp": 2, "seeds_3": 3, "heunpp2": 3}


def family_of(name: str) -> str:
    return next((f for f, members in FAMILIES.items() if name in members), "other")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: the embedded tiny model)")
    p.add_argument("--out", default=None, help="output path without extension "
                   "(default bench_results/sampler_bench_<date>)")
    p.add_argument("--samplers", default=None, help="comma-separated sampler names")
    p.add_argument("--schedules", default="karras", help="comma-separated schedule names")
    p.add_argument("--nfe", default="5,10,20", help="comma-separated NFE targets")
    p.add_argument("--cfg", default="1,7", help="comma-separated CFG scales")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--ref-nfe", type=int, default=1199, help="reference (Heun) evaluations")
    p.add_argument("--quick", action="store_true", help="2 samplers, NFE 4 and 8, CFG 7, 1 seed, 32 px, ref 99 NFE")
    args = p.parse_args(argv)
    if args.quick:
        args.samplers = args.samplers or ",".join(QUICK_SAMPLERS)
        args.nfe, args.cfg, args.seeds, args.ref_nfe, args.size = "4,8", "7", "0", 99, 32
    args.samplers = (args.samplers or ",".join(FULL_SAMPLERS)).split(",")
    args.schedules = args.schedules.split(",")
    args.nfe = [int(v) for v in args.nfe.split(",")]
    args.cfg = [float(v) for v in args.cfg.split(",")]
    args.seeds = [int(v) for v in args.seeds.split(",")]
    if args.out is None:
        args.out = f"bench_results/sampler_bench_{datetime.date.today().isoformat()}"
    return args


class Bench:
    """The model, the prompts' embeddings, the noise, and one jitted sampling function per
    (sampler, step count); the CFG scale and the sigmas are traced."""

    def __init__(self, model_dir, size, seeds):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        import sdjax
        from sdjax import sampling
        from sdjax.pipeline import core
        from sdjax.pipeline.generator import encode_prompts

        self.jax, self.jnp, self.sampling, self.core = jax, jnp, sampling, core
        self.pipe = sdjax.load_pipeline(model_dir)
        self.model = sampling.DiscreteModel.from_config(self.pipe.scheduler_config)
        prompts = [p for p in PROMPTS for _ in seeds]
        self.cond, self.uncond = encode_prompts(self.pipe, prompts, [""] * len(prompts))
        latent = (size // 8, size // 8, int(self.pipe.unet.config.in_channels))
        seeds_b = jnp.asarray([s for _ in PROMPTS for s in seeds], jnp.int32)
        self.noise, self.keys = core.initial_noise(seeds_b, latent)
        self.calls = 0
        graph = self.pipe.unet.graphdef

        def count():
            self.calls += 1

        def unet(state, x, t, context):
            jax.debug.callback(count)
            return nnx.merge(graph, state)(x, t, context)

        self.unet = unet
        self.fns = {}
        vae_graph, factor = self.pipe.vae.graphdef, self.pipe.vae.scaling_factor
        self.decode = jax.jit(lambda state, z: jnp.clip(nnx.merge(vae_graph, state).decode(z / factor), -1, 1))

    def sigmas(self, schedule, steps):
        return self.sampling.get_sigmas(schedule, steps, self.model)

    def run(self, sampler, sigmas, cfg):
        """Final latents (B, h, w, c) float32 and the NFE spent."""
        jax, jnp = self.jax, self.jnp
        key = (sampler, len(sigmas))
        if key not in self.fns:
            def fn(unet_state, cond, uncond, cfg_scale, noise, sigmas, keys):
                unet = jax.tree_util.Partial(self.unet, unet_state)
                denoise = self.core.guided_denoiser(self.model, unet, cond, uncond, cfg_scale)
                return self.sampling.sample(sampler, denoise, noise * sigmas[0], sigmas, keys)
            self.fns[key] = jax.jit(fn)
        self.calls = 0
        out = self.fns[key](self.pipe.unet.state, self.cond, self.uncond, jnp.float32(cfg), self.noise,
                            jnp.asarray(sigmas), self.keys)
        out = np.asarray(out, np.float32)
        jax.effects_barrier()
        return out, self.calls

    def images(self, latents):
        return (np.asarray(self.decode(self.pipe.vae.state, self.jnp.asarray(latents)), np.float32) + 1) / 2


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def measured_order(points) -> float | None:
    pts = [(n, e) for n, e in points if e > 0]
    if len(pts) < 2:
        return None
    n, e = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(-np.polyfit(n, e, 1)[0])


def load_cache(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"results": {}}


def write_atomic(path: Path, data: bytes):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def collect(args, log=print) -> dict:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_path = out.with_suffix(".json")
    cache = load_cache(cache_path)
    model_dir = args.model
    if model_dir is None:
        import sdjax
        model_dir = str(Path(sdjax.__file__).parent / "assets" / "tiny")
    meta = {"model": os.path.basename(os.path.normpath(model_dir)), "prompts": PROMPTS, "seeds": args.seeds,
            "size": args.size, "ref": f"heun karras {args.ref_nfe} NFE",
            "nfe_counting": "1 NFE = 1 UNet call on the CFG batch (cond + uncond batched, 2B latents)"}
    if cache.get("meta") not in (None, meta):
        log(f"cache {cache_path} was made with other settings; starting a new one")
        cache = {"results": {}}
    cache["meta"] = meta
    results = cache["results"]
    bench = None
    refs = {}

    def ensure_bench():
        nonlocal bench
        if bench is None:
            bench = Bench(model_dir, args.size, args.seeds)
        return bench

    for cfg in args.cfg:
        for schedule in args.schedules:
            todo = [(s, n) for s in args.samplers for n in args.nfe
                    if f"{s}|{schedule}|{n}|{cfg:g}" not in results]
            if not todo:
                continue
            b = ensure_bench()
            if (cfg, schedule) not in refs:
                t0 = time.time()
                ref_steps = (args.ref_nfe + 1) // 2
                ref_lat, ref_nfe = b.run("heun", b.sigmas("karras", ref_steps), cfg)
                refs[(cfg, schedule)] = (ref_lat, b.images(ref_lat))
                log(f"reference cfg {cfg:g}: heun {ref_steps} steps, {ref_nfe} NFE, {time.time() - t0:.0f} s")
            ref_lat, ref_img = refs[(cfg, schedule)]
            for sampler, nfe in todo:
                steps = max(1, round(nfe / EVALS_PER_STEP.get(sampler, 1)))
                t0 = time.time()
                lat, used = b.run(sampler, b.sigmas(schedule, steps), cfg)
                results[f"{sampler}|{schedule}|{nfe}|{cfg:g}"] = {
                    "sampler": sampler, "schedule": schedule, "nfe_target": nfe, "nfe": used, "steps": steps,
                    "cfg": cfg, "rmse_latent": rmse(lat, ref_lat), "rmse_image": rmse(b.images(lat), ref_img),
                    "seconds": round(time.time() - t0, 2)}
                log(f"{sampler:>24} {schedule} cfg {cfg:g} NFE {used:3d}: latent RMSE "
                    f"{results[f'{sampler}|{schedule}|{nfe}|{cfg:g}']['rmse_latent']:.4g}")
                write_atomic(cache_path, json.dumps(cache, indent=1, sort_keys=True).encode())
    write_atomic(cache_path, json.dumps(cache, indent=1, sort_keys=True).encode())
    return cache


def table(cache: dict, samplers, schedules, nfes, cfgs) -> str:
    """Markdown: latent RMSE per NFE and the measured order, one block per CFG scale."""
    res = cache["results"]
    meta = cache["meta"]
    lines = [f"Model: `{meta['model']}`, {len(meta['prompts'])} prompts x {len(meta['seeds'])} seeds, "
             f"{meta['size']} px; reference: {meta['ref']}. {meta['nfe_counting']}.", ""]
    for cfg in cfgs:
        for schedule in schedules:
            lines.append(f"**CFG {cfg:g}, {schedule} schedule** - RMSE of final latents (image RMSE in [0, 1] "
                         f"in parentheses) against the reference; order = slope of log RMSE vs log NFE")
            lines.append("")
            lines.append("| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " | order |")
            lines.append("|---|" + "---|" * (len(nfes) + 1))
            for s in samplers:
                cells, pts = [], []
                for n in nfes:
                    r = res.get(f"{s}|{schedule}|{n}|{cfg:g}")
                    if r is None:
                        cells.append("-")
                        continue
                    cells.append(f"{r['rmse_latent']:.3g} ({r['rmse_image']:.2g})")
                    pts.append((r["nfe"], r["rmse_latent"]))
                order = measured_order(pts)
                lines.append(f"| {s} | " + " | ".join(cells) + f" | {'-' if order is None else f'{order:.2f}'} |")
            lines.append("")
    return "\n".join(lines)


def winners(cache: dict, samplers, schedule, nfe, cfg, k=3) -> list[str]:
    res = cache["results"]
    rows = [(res[key]["rmse_latent"], s) for s in samplers
            if (key := f"{s}|{schedule}|{nfe}|{cfg:g}") in res]
    return [s for _, s in sorted(rows)[:k]]


def plot(cache: dict, samplers, schedule, cfgs, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = cache["results"]
    fams = [f for f in FAMILIES if any(family_of(s) == f for s in samplers)]
    fig, axes = plt.subplots(len(cfgs), len(fams), figsize=(5 * len(fams), 4 * len(cfgs)), squeeze=False)
    for row, cfg in enumerate(cfgs):
        for col, fam in enumerate(fams):
            ax = axes[row][col]
            for s in samplers:
                if family_of(s) != fam:
                    continue
                pts = sorted((r["nfe"], r["rmse_latent"]) for r in res.values()
                             if r["sampler"] == s and r["schedule"] == schedule and r["cfg"] == cfg)
                if pts:
                    ax.loglog(*zip(*pts), marker="o", label=s)
            ax.set_title(f"{fam}, CFG {cfg:g}")
            ax.set_xlabel("NFE (UNet calls of the CFG batch)")
            ax.set_ylabel("latent RMSE vs reference")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, path)


def main(argv=None):
    args = parse(argv)
    from sdjax import runtime

    runtime.configure()
    cache = collect(args, log=lambda m: print(m, flush=True))
    out = Path(args.out)
    md = [f"# Sampler bench ({datetime.date.today().isoformat()})", "",
          f"`python scripts/sampler_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
          table(cache, args.samplers, args.schedules, args.nfe, args.cfg)]
    for cfg in args.cfg:
        for n in args.nfe:
            md.append(f"- lowest latent RMSE at NFE {n}, CFG {cfg:g}: "
                      f"{', '.join(winners(cache, args.samplers, args.schedules[0], n, cfg))}")
    write_atomic(out.with_suffix(".md"), ("\n".join(md) + "\n").encode())
    plot(cache, args.samplers, args.schedules[0], args.cfg, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
