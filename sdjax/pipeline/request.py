"""A generation request as data (`Request`), validated once, where it is made.

`Request(prompt, ...)` is txt2img; with `init_image` img2img; with `init_image` and `mask`
inpainting (outpainting is inpainting on an extended canvas, `sdjax.pipeline.inpaint`). It is
frozen and checks itself when made: `Pipeline.generate`, the CLI (before any model loads) and
the batch runner (through `Pipeline.generate`) all build one, so every bad value gives the same
message whichever way it came in. The generator fills in what depends on the model (the size)
with `Request.sized`, which checks again.

`check_request(...)` is a pure function of the request's values: it raises `RequestError`
(a `TaskError`, so an `SdjaxError`: exit 2 in the CLI) naming the value and the fix, and
returns nothing. Values that are not known yet (None) are skipped, so the CLI can check what
it has before loading a model, and `generate` checks everything once the model has filled in
the defaults (size from the init image or the model's own resolution).

Limits (each with an override, `Limits(...)` in Python, a CLI flag):
- pixels per image: width * height <= max_pixels (default 4096 * 4096; `--max-pixels`);
- steps <= max_steps (default 1000; `--max-steps`);
- batch_size <= max_batch_size (default 64; `--max-batch-size`).
Seeds are A1111's range, 0 .. 2**32 - 1, for every image's seed (seed + i) and variation seed:
the noise key is made from a 32-bit seed, so a larger seed would silently give the pixels of
another one. CFG scale, strength, eta and the other floats must be finite; strength is in (0, 1].
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Sequence

from sdjax import sampling
from sdjax.errors import RequestError, TaskError

SEED_MAX = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class Limits:
    """Upper bounds that keep a typo from running for hours (`check_request`)."""

    max_pixels: int = 4096 * 4096
    max_steps: int = 1000
    max_batch_size: int = 64


def _int(name: str, value: Any, lo: int, hi: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RequestError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"at least {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestError(f"{name} must be {rng}, got {value}{hint}")


def _float(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:  # numpy scalars
            value = float(value)
        except (TypeError, ValueError):
            raise RequestError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value}")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        raise RequestError(f"{name} must be in {left}{lo}, {hi}], got {value}")


def _pair(name: str, value: Any, lo: int) -> None:
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise RequestError(f"{name} must be a pair of whole numbers, got {value!r}")
    for v in value:
        _int(name, v, lo)


def check_sdxl(*, original_size: Any = None, crops_coords_top_left: Any = None, target_size: Any = None,
               negative_original_size: Any = None, negative_crops_coords_top_left: Any = None,
               negative_target_size: Any = None, aesthetic_score: Any = None, negative_aesthetic_score: Any = None,
               refiner_switch_at: Any = None) -> None:
    """SDXL's values: sizes (height, width) >= 1, crops (top, left) >= 0, finite aesthetic scores,
    refiner_switch_at in (0, 1]. RequestError for the first bad one; None is skipped."""
    for name, v in (("original_size", original_size), ("target_size", target_size),
                    ("negative_original_size", negative_original_size), ("negative_target_size", negative_target_size)):
        _pair(name, v, 1)
    for name, v in (("crops_coords_top_left", crops_coords_top_left),
                    ("negative_crops_coords_top_left", negative_crops_coords_top_left)):
        _pair(name, v, 0)
    for name, v in (("aesthetic_score", aesthetic_score), ("negative_aesthetic_score", negative_aesthetic_score)):
        if v is not None:
            _float(name, v)
    if refiner_switch_at is not None:
        _float("refiner_switch_at", refiner_switch_at, 0.0, 1.0, lo_open=True)


def check_request(*, steps: Any = None, cfg_scale: Any = None, seed: Any = None, batch_size: Any = None,
                  width: Any = None, height: Any = None, strength: Any = None, subseed: Any = None,
                  subseed_strength: Any = None, clip_skip: Any = None, batch_count: Any = None,
                  knobs: Mapping[str, Any] | None = None, limits: Limits | None = None) -> None:
    """Raise RequestError for the first bad value; None means "not known yet" and is skipped.

    steps, batch_size, batch_count, clip_skip: whole numbers >= 1 (steps <= max_steps,
    batch_size <= max_batch_size); width, height: positive multiples of 8 with
    width * height <= max_pixels; seed, subseed: in [0, 2**32 - 1] for every image of the
    batch (seed + batch_size - 1 included); cfg_scale and `knobs` (eta, s_noise, ...): finite;
    strength in (0, 1]; subseed_strength in [0, 1].
    """
    limits = limits or Limits()
    if steps is not None:
        _int("steps", steps, 1, limits.max_steps, " (raise the limit with --max-steps / Limits(max_steps=...))")
    if batch_size is not None:
        _int("batch_size", batch_size, 1, limits.max_batch_size,
             " (raise the limit with --max-batch-size / Limits(max_batch_size=...))")
    if batch_count is not None:
        _int("batch_count", batch_count, 1)
    if clip_skip is not None:
        _int("clip_skip", clip_skip, 1)
    for name, v in (("width", width), ("height", height)):
        if v is not None:
            _int(name, v, 8)
            if v % 8:
                raise RequestError(f"{name} must be a positive multiple of 8, got {v}")
    if width is not None and height is not None and width * height > limits.max_pixels:
        raise RequestError(f"{width}x{height} is {width * height} pixels, more than the limit of "
                           f"{limits.max_pixels}; raise it with --max-pixels / Limits(max_pixels=...)")
    n = int(batch_size) if isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) else 1
    for name, v in (("seed", seed), ("subseed", subseed)):
        if v is None:
            continue
        _int(name, v, 0, SEED_MAX, " (seeds are 32-bit as in A1111; -1 for a random one in the CLI)")
        if int(v) + n - 1 > SEED_MAX:
            raise RequestError(f"{name} {v} + batch_size {n} - 1 passes the largest seed {SEED_MAX}; "
                               "use a smaller seed")
    if cfg_scale is not None:
        _float("cfg_scale", cfg_scale)
    if strength is not None:
        _float("strength", strength, 0.0, 1.0, lo_open=True)
    if subseed_strength is not None:
        _float("subseed_strength", subseed_strength, 0.0, 1.0)
    for name, v in (knobs or {}).items():
        if not isinstance(v, (bool, str)) and v is not None:
            _float(name, v)


# Sampler knobs that choose code paths (static in the compiled function) and the numeric ones (traced).
STATIC_KNOBS = ("order", "solver_type", "lower_order_final", "max_order", "max_stage", "max_steps")
# noise_type ("gaussian" / "brownian") is traced as its index in sampling.NOISE_TYPES.
NUMERIC_KNOBS = ("eta", "s_noise", "s_churn", "s_tmin", "s_tmax", "r", "ge_gamma", "noise_type", "rtol",
                 "atol", "h_init", "tau_sigma_min", "tau_sigma_max")
TASKS = ("txt2img", "img2img", "inpaint")


# A1111's latent upscalers (modules/shared_items latent_upscale_modes): torch interpolate mode, antialias.
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Pixel-space upscalers: the PIL resampling filter (A1111's "Lanczos" and "Nearest" upscalers, and
# "None": its plain resize, which is Lanczos too).
PIXEL_UPSCALERS = {"Lanczos": "LANCZOS", "Nearest": "NEAREST", "None": "LANCZOS"}


@dataclasses.dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix (`sdjax.pipeline.hires`): scale (hr_scale) or resize_x / resize_y
    (hr_resize_x/y, 0 = from the other one and the aspect ratio); steps: the second pass's steps
    (hr_second_pass_steps, 0 = the first pass's); upscaler: a `LATENT_UPSCALERS` or
    `PIXEL_UPSCALERS` name; denoising_strength: the second pass's strength in (0, 1]; sampler,
    prompt, negative_prompt: the second pass's (None or "" = the first pass's)."""

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    steps: int = 0
    upscaler: str = "Latent"
    denoising_strength: float = 0.7
    sampler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    def check(self, schedule: str | None, limits: Limits | None) -> None:
        _float("hires scale", self.scale, 0.0, 16.0, lo_open=True)
        _int("hires resize_x", self.resize_x, 0)
        _int("hires resize_y", self.resize_y, 0)
        if self.steps:
            check_request(steps=self.steps, limits=limits)
        _int("hires steps", self.steps, 0)
        _float("hires denoising_strength", self.denoising_strength, 0.0, 1.0, lo_open=True)
        if self.upscaler not in LATENT_UPSCALERS and self.upscaler not in PIXEL_UPSCALERS:
            raise RequestError(f"unknown hires upscaler {self.upscaler!r}; use one of "
                               f"{sorted(LATENT_UPSCALERS) + sorted(PIXEL_UPSCALERS)}")
        if self.sampler is not None:
            sampling.resolve(self.sampler, schedule)


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate; see `Pipeline.generate` for the meaning of each field.

    Validated in `__post_init__` (`check_request` on every number, the sampler and schedule
    names, the knob names, a mask without an init image); raises RequestError / TaskError /
    UnknownNameError, all `SdjaxError`s. `batch_size` None becomes one image per prompt when
    `prompt` is a list (as diffusers), else 1. width / height None: filled in by the generator
    (the init image's size, else the model's own) through `sized`.
    knobs: sampler knobs (eta, s_noise, s_churn, s_tmin, s_tmax, r; order, solver_type,
    lower_order_final pick code paths). seeds / subseeds: each image's own (variation) seed,
    instead of seed + i (subseed + i): requests merged into one batch (the server, an X/Y/Z
    plot's cells) keep their seeds. cfg_scale may also be one value per image (a list of
    batch_size values; `sdjax.pipeline.xyz`). hires: a `HiresFix` (txt2img only).
    SDXL (`sdjax.pipeline.sdxl`): original_size / target_size (height, width) and
    crops_coords_top_left (top, left), default (height, width) and (0, 0); their negative_ forms
    default to them; aesthetic_score / negative_aesthetic_score (refiner, 6.0 / 2.5); refiner: a
    loaded SDXL refiner `Pipeline` that takes over at `refiner_switch_at` (0, 1] of the denoising
    (diffusers' denoising_end; A1111's "Refiner switch at"; 1.0 = never).
    """

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] = ""
    steps: int = 20
    sampler: str = "dpmpp_2m"
    schedule: str | None = "karras"
    cfg_scale: float | Sequence[float] = 7.0
    seed: int | Sequence[int] = 0
    width: int | None = None
    height: int | None = None
    batch_size: int | None = None
    init_image: Any = None
    strength: float = 0.75
    mask: Any = None
    noise: Any = None
    subseed: int | None = None
    subseed_strength: float = 0.0
    seeds: Sequence[int] | None = None
    subseeds: Sequence[int] | None = None
    clip_skip: int = 1
    mask_blur: float = 4
    inpainting_fill: str = "original"
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    paste_back: bool = True
    sigmas: Any = None
    timestep_mode: str = "continuous"
    extra_params: Mapping[str, Any] | None = None
    lora_dir: Any = None
    loras: Sequence[Any] | None = None
    lora_strict: bool = True
    embeddings: Sequence[Any] | None = None
    embeddings_dir: Any = None
    controlnets: Sequence[Any] | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    refiner: Any = None
    refiner_switch_at: float = 0.8
    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    limits: Limits | None = None
    hires: HiresFix | None = None

    def __post_init__(self):
        per_image = {k: getattr(self, k) for k in ("cfg_scale",) if isinstance(getattr(self, k), (list, tuple))}
        for name, values in per_image.items():  # one value per image (an X/Y/Z plot's batched cells)
            n = self.batch_size if self.batch_size is not None else (
                len(self.prompt) if isinstance(self.prompt, (list, tuple)) else 1)
            if len(values) != n:
                raise TaskError(f"{name} has {len(values)} per-image values but the batch has {n} images")
            for v in values:
                check_request(**{name: v}, limits=self.limits)
        check_request(steps=self.steps if self.sigmas is None else None,
                      cfg_scale=None if "cfg_scale" in per_image else self.cfg_scale,
                      seed=self.seed, batch_size=self.batch_size,
                      width=self.width, height=self.height,
                      strength=self.strength if self.init_image is not None else None, subseed=self.subseed,
                      subseed_strength=self.subseed_strength, clip_skip=self.clip_skip, knobs=self.knobs,
                      limits=self.limits)
        check_sdxl(**{f: getattr(self, f) for f in ("original_size", "crops_coords_top_left", "target_size",
                                                     "negative_original_size", "negative_crops_coords_top_left",
                                                     "negative_target_size", "aesthetic_score",
                                                     "negative_aesthetic_score", "refiner_switch_at")})
        sampling.resolve(self.sampler, self.schedule)
        bad = sorted(set(self.knobs) - {*NUMERIC_KNOBS, *STATIC_KNOBS})
        if bad:
            raise TaskError(f"unknown generation option(s) {bad}")
        if "noise_type" in self.knobs and self.knobs["noise_type"] not in sampling.NOISE_TYPES:
            raise RequestError(f"noise_type must be one of {sampling.NOISE_TYPES}, "
                               f"not {self.knobs['noise_type']!r}")
        if self.batch_size is None:  # diffusers: a list of prompts is a batch of that many images
            n = len(self.prompt) if isinstance(self.prompt, (list, tuple)) else 1
            check_request(batch_size=n, seed=self.seed, subseed=self.subseed,
                          limits=self.limits)
            object.__setattr__(self, "batch_size", n)
        if self.init_image is None and self.mask is not None:
            raise TaskError("a mask needs an init image")
        for name in ("seeds", "subseeds"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != self.batch_size:
                raise RequestError(f"{name} has {len(values)} entries but batch_size is {self.batch_size}")
            for v in values:
                _int(name, v, 0, SEED_MAX, " (seeds are 32-bit as in A1111)")
        if self.subseeds is not None and self.subseed is None:
            raise RequestError("subseeds need subseed (the variation seed of the first image)")
        if self.hires is not None:
            if not isinstance(self.hires, HiresFix):
                raise TaskError(f"hires must be a HiresFix, got {type(self.hires).__name__}")
            self.hires.check(self.schedule, self.limits)
            if self.init_image is not None:
                raise TaskError("hires fix is for txt2img: drop the init image, or drop hires")

    @property
    def task(self) -> str:
        """"txt2img", "img2img" or "inpaint"."""
        return "txt2img" if self.init_image is None else ("img2img" if self.mask is None else "inpaint")

    def sized(self, width: int, height: int) -> "Request":
        """This request with its size filled in, checked again (pixels within the limit)."""
        return dataclasses.replace(self, width=width, height=height)


__all__ = ["HiresFix", "LATENT_UPSCALERS", "Limits", "NUMERIC_KNOBS", "PIXEL_UPSCALERS", "Request", "RequestError",
           "SEED_MAX", "STATIC_KNOBS", "TASKS", "check_request", "check_sdxl"]
