"""The benchmark's plan (what to measure), its rows and the report table. See `bench.run`."""

from __future__ import annotations

import dataclasses

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
