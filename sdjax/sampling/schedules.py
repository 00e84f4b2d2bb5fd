"""The model's discrete noise table and the sigma schedules samplers step through.

Notation of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models" (arXiv:2206.00364), as in k-diffusion (crowsonkb/k-diffusion, `sampling.py`
`get_sigmas_*`, `external.py` `DiscreteSchedule`): a noisy latent is x = x0 + sigma * eps, and a
DDPM-trained model with cumulative alphas acp[t] sees sigma[t] = sqrt((1 - acp[t]) / acp[t]).

Schedules are host-side numpy (the step count is static) and return float32 arrays of shape
(steps + 1,), descending, ending in 0; samplers take them as traced arrays. ComfyUI's schedulers
(`comfy/samplers.py`) and A1111's (`modules/sd_schedulers.py`) are followed where named.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from sdjax.errors import ConfigError
from sdjax.sampling import names
from sdjax.sampling.gits_table import GITS_TABLE

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SPACINGS = ("leading", "trailing", "linspace")
_DIFFUSERS_SIGMAS = ("default", "karras", "exponential", "beta")
# diffusers' scheduler classes whose `timestep_spacing` defaults to "leading" (old configs lack it).
_LEADING_BY_DEFAULT = {"PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler"}
# Scheduler keys that choose how diffusers steps, never the model's noise table: any value is fine.
_SOLVER_KEYS = {
    "clip_sample", "clip_sample_range", "set_alpha_to_one", "skip_prk_steps", "sample_max_value",
    "thresholding", "dynamic_thresholding_ratio", "solver_order", "algorithm_type", "solver_type",
    "lower_order_final", "euler_at_final", "disable_corrector", "predict_x0", "solver_p",
    "variance_type", "lambda_min_clipped", "original_inference_steps", "timestep_scaling",
}
# Keys sdjax supports at one value only.
_FIXED_KEYS = {
    "timestep_type": "discrete", "interpolation_type": "linear", "final_sigmas_type": "zero",
    "sigma_min": None, "sigma_max": None, "use_flow_sigmas": False, "flow_shift": 1.0,
    "use_dynamic_shifting": False, "time_shift_type": "exponential", "shift_terminal": None,
    "use_lu_lambdas": False,
}


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal's squaredcos_cap_v2, as diffusers' betas_for_alpha_bar.
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    # Lin et al. 2023 (arXiv:2305.08891) Algorithm 1, as diffusers' rescale_zero_terminal_snr.
    sqrt_acp = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_acp[0], sqrt_acp[-1]
    sqrt_acp = (sqrt_acp - last) * first / (first - last)
    acp = sqrt_acp**2
    alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]])
    return 1.0 - alphas


@dataclasses.dataclass(frozen=True)
class DiscreteModel:
    """Noise table of a model trained on `num_train_timesteps` discrete DDPM timesteps.

    Built from a diffusers `scheduler_config.json` with `from_config`. Hashable, so it can be a
    static argument of `jax.jit`; `sigma_to_t` / `t_to_sigma` work on traced arrays.
    Tables are computed in float64 (as LDM and ComfyUI do) and stored as float32.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    # Only for the diffusers-parity schedules: config's use_{karras,exponential,beta}_sigmas.
    diffusers_sigmas: str = "default"

    def __post_init__(self):
        for field, value, allowed in (("beta_schedule", self.beta_schedule, _BETA_SCHEDULES),
                                      ("prediction_type", self.prediction_type, _PREDICTION_TYPES),
                                      ("timestep_spacing", self.timestep_spacing, _SPACINGS),
                                      ("diffusers_sigmas", self.diffusers_sigmas, _DIFFUSERS_SIGMAS)):
            if value not in allowed:
                raise ConfigError(f"scheduler config {field}={value!r} is not supported; use one of {allowed}")

    @classmethod
    def from_config(cls, scheduler_config: dict) -> "DiscreteModel":
        """Read a diffusers scheduler config dict (any SD scheduler class).

        Keys that only choose a diffusers solver are accepted at any value; keys that would change
        the noise table sdjax cannot reproduce, and unknown keys, raise ConfigError.
        """
        d = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        kw = {}
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                    "prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr"):
            if key in d:
                kw[key] = d.pop(key)
        if kw.get("timestep_spacing") is None:
            kw["timestep_spacing"] = ("leading" if scheduler_config.get("_class_name") in _LEADING_BY_DEFAULT
                                      else "linspace")
        if kw.get("steps_offset") is None:
            kw["steps_offset"] = 0
        betas = d.pop("trained_betas", None)
        if betas is not None:
            kw["trained_betas"] = tuple(float(b) for b in betas)
        flags = [name for name in ("karras", "exponential", "beta") if d.pop(f"use_{name}_sigmas", False)]
        if len(flags) > 1:
            raise ConfigError(f"scheduler config sets use_*_sigmas for {flags}; at most one may be true")
        kw["diffusers_sigmas"] = flags[0] if flags else "default"
        for key, value in d.items():
            if key in _SOLVER_KEYS:
                continue
            if key in _FIXED_KEYS:
                if value != _FIXED_KEYS[key]:
                    raise ConfigError(f"scheduler config {key}={value!r} is not supported; "
                                      f"sdjax supports only {key}={_FIXED_KEYS[key]!r}")
                continue
            raise ConfigError(f"unknown scheduler config key {key!r} (value {value!r})")
        return cls(**kw)

    # ---- tables -------------------------------------------------------------------------

    @functools.cached_property
    def _alphas_cumprod64(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float64)
        elif self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        else:
            betas = _cosine_betas(n)
        if self.rescale_betas_zero_snr:
            betas = _zero_terminal_snr(betas)
        acp = np.cumprod(1.0 - betas)
        if self.rescale_betas_zero_snr:
            acp[-1] = 2.0**-24  # as diffusers: a finite largest sigma (4096)
        return acp

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """Cumulative product of alphas, shape (num_train_timesteps,), float32."""
        return self._alphas_cumprod64.astype(np.float32)

    @functools.cached_property
    def sigmas(self) -> np.ndarray:
        """sigma[t] = sqrt((1 - acp[t]) / acp[t]) for t = 0..T-1, ascending, float32."""
        acp = self._alphas_cumprod64
        return np.sqrt((1.0 - acp) / acp).astype(np.float32)

    @functools.cached_property
    def log_sigmas(self) -> np.ndarray:
        """log(sigmas), float32, shape (num_train_timesteps,)."""
        acp = self._alphas_cumprod64
        return np.log(np.sqrt((1.0 - acp) / acp)).astype(np.float32)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # ---- sigma <-> t (k-diffusion DiscreteSchedule) ---------------------------------------

    def sigma_to_t(self, sigma, quantize: bool = False):
        """Fractional timestep of `sigma` by linear interpolation in log-sigma; any shape, float32.

        `quantize=True` returns the nearest table index instead (k-diffusion's quantize, ComfyUI's
        `timestep`). Works on traced arrays.
        """
        log_sigmas = jnp.asarray(self.log_sigmas)
        log_sigma = jnp.log(jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-10))
        if quantize:
            dists = jnp.abs(log_sigma[..., None] - log_sigmas)
            return jnp.argmin(dists, axis=-1).astype(jnp.float32)
        n = log_sigmas.shape[0]
        low = jnp.clip(jnp.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, n - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = jnp.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
        low = low.astype(jnp.float32)  # an index, weighted as a float (strict dtype promotion)
        return ((1.0 - w) * low + w * (low + 1)).astype(jnp.float32)

    def t_to_sigma(self, t):
        """sigma at fractional timestep `t` (clipped to [0, T-1]), log-linear; any shape, float32."""
        log_sigmas = jnp.asarray(self.log_sigmas)
        t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, log_sigmas.shape[0] - 1)
        low = jnp.floor(t).astype(jnp.int32)
        high = jnp.ceil(t).astype(jnp.int32)
        w = t - jnp.floor(t)
        return jnp.exp((1.0 - w) * log_sigmas[low] + w * log_sigmas[high])


# ---- schedules (k-diffusion, A1111, ComfyUI) -----------------------------------------------

def _append_zero(sigmas) -> np.ndarray:
    return np.append(np.asarray(sigmas, np.float64), 0.0).astype(np.float32)


def _t_to_sigma_np(model: DiscreteModel, t) -> np.ndarray:
    return np.asarray(model.t_to_sigma(np.asarray(t, np.float32)), np.float64)


def karras(steps, sigma_min, sigma_max, rho=7.0):
    """Karras et al. 2022 eq. (5): sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(steps, sigma_min, sigma_max):
    """Evenly spaced in log sigma."""
    return _append_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps)))


def polyexponential(steps, sigma_min, sigma_max, rho=1.0):
    """Log sigma follows a ramp**rho from log(sigma_max) to log(sigma_min) (k-diffusion)."""
    ramp = np.linspace(1.0, 0.0, steps) ** rho
    return _append_zero(np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def normal(steps, model, sigma_min, sigma_max):
    """Timesteps evenly spaced from t(sigma_max) to t(sigma_min), both ends included (ComfyUI "normal")."""
    t = np.linspace(float(model.sigma_to_t(sigma_max)), float(model.sigma_to_t(sigma_min)), steps)
    return _append_zero(_t_to_sigma_np(model, t))


def uniform(steps, model):
    """k-diffusion's DiscreteSchedule.get_sigmas (A1111 "Uniform"): t evenly from T-1 to 0."""
    t = np.linspace(model.num_train_timesteps - 1, 0, steps)
    return _append_zero(_t_to_sigma_np(model, t))


def sgm_uniform(steps, model, sigma_min, sigma_max):
    """steps + 1 evenly spaced timesteps from t(sigma_max) to t(sigma_min), the last dropped (ComfyUI)."""
    t = np.linspace(float(model.sigma_to_t(sigma_max)), float(model.sigma_to_t(sigma_min)), steps + 1)[:-1]
    return _append_zero(_t_to_sigma_np(model, t))


def simple(steps, model):
    """Every (T/steps)-th entry of the model's table from the top (ComfyUI "simple")."""
    table = model.sigmas.astype(np.float64)
    stride = len(table) / steps
    return _append_zero([table[-(1 + int(i * stride))] for i in range(steps)])


def ddim_uniform(steps, model):
    """LDM's uniform DDIM timesteps 1, 1+c, 1+2c, ... with c = T // steps (ComfyUI "ddim_uniform",
    A1111 "DDIM"). Like both, when steps does not divide T this yields more than `steps` steps:
    the length is 1 + len(range(1, T, c))."""
    table = model.sigmas.astype(np.float64)
    stride = max(len(table) // steps, 1)
    return _append_zero(table[1::stride][::-1])


def beta(steps, model, alpha=0.6, beta=0.6):
    """Timesteps at the quantiles of Beta(alpha, beta) (Lee et al. 2024, arXiv:2407.12173), rounded
    to the table (ComfyUI "beta"). As ComfyUI, repeated timesteps are dropped, so at very many
    steps (about 150+) the schedule can be shorter than steps + 1."""
    from scipy import stats  # scipy is a dependency of jax

    total = model.num_train_timesteps - 1
    ts = np.rint(stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, steps, endpoint=False), alpha, beta) * total)
    table = model.sigmas.astype(np.float64)
    picked, last = [], None
    for t in ts:
        if t != last:
            picked.append(table[int(t)])
        last = t
    return _append_zero(picked)


def kl_optimal(steps, sigma_min, sigma_max):
    """tan of evenly spaced arctan(sigma) (Sabour et al. 2024 "Align Your Steps" KL-optimal;
    ComfyUI "kl_optimal")."""
    frac = np.arange(steps) / max(steps - 1, 1)
    return _append_zero(np.tan(frac * math.atan(sigma_min) + (1.0 - frac) * math.atan(sigma_max)))


# Published 10-step tables of NVIDIA's "Align Your Steps" (Sabour et al. 2024, arXiv:2404.14507),
# https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html
AYS_TABLES = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def align_your_steps(steps, family="sd15"):
    """AYS table for `family` ("sd15" or "sdxl"), log-linearly interpolated to steps + 1 points,
    the last set to 0 (ComfyUI's AlignYourStepsScheduler)."""
    key = {"sd1": "sd15", "sd15": "sd15", "sdxl": "sdxl"}.get(str(family).lower())
    if key is None:
        raise ValueError(f"align_your_steps has tables for 'sd15' and 'sdxl', not {family!r}")
    table = np.asarray(AYS_TABLES[key], np.float64)
    if steps + 1 != len(table):
        xs = np.linspace(0.0, 1.0, len(table))
        ys = np.log(table[::-1])
        table = np.exp(np.interp(np.linspace(0.0, 1.0, steps + 1), xs, ys))[::-1]
    return _append_zero(table[:-1])


def linear_quadratic(steps, sigma_max, threshold_noise=0.025, linear_steps=None):
    """Linear in (1 - sigma / sigma_max) up to threshold_noise over the first linear_steps
    (default steps // 2), quadratic after (Genmo's Mochi schedule; ComfyUI "linear_quadratic")."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quad_coef = step_diff / (linear_steps * quadratic_steps**2)
        lin_coef = threshold_noise / linear_steps - 2 * step_diff / quadratic_steps**2
        const = quad_coef * linear_steps**2
        quadratic = [quad_coef * i**2 + lin_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - v for v in linear + quadratic + [1.0]]
    return (np.asarray(schedule, np.float64) * sigma_max).astype(np.float32)


def gits(steps):
    """GITS table for `steps` (2..20), else the 20-step table log-linearly interpolated to
    steps + 1 points (ComfyUI's GITSScheduler); the last value set to 0."""
    if 2 <= steps <= 20:
        table = np.asarray(GITS_TABLE[steps - 2], np.float64)
    else:
        last = np.asarray(GITS_TABLE[-1], np.float64)
        xs = np.linspace(0.0, 1.0, len(last))
        table = np.exp(np.interp(np.linspace(0.0, 1.0, steps + 1), xs, np.log(last[::-1])))[::-1]
    return _append_zero(table[:-1])


def get_sigmas(name: str, steps: int, model: DiscreteModel, *, sigma_min: float | None = None,
               sigma_max: float | None = None, rho: float | None = None, ays_family: str = "sd15",
               alpha: float = 0.6, beta_param: float = 0.6) -> np.ndarray:
    """Sigma schedule `name` for `steps` steps: float32 numpy array, descending, ending in 0.

    Shape (steps + 1,), except "ddim_uniform" when steps does not divide T and "beta" at very
    many steps, which follow ComfyUI/A1111 (see those functions); a sampler runs len - 1 steps.
    `name`: a schedule id of `names.SCHEDULES` or any alias (`names.schedule_id`).
    sigma_min / sigma_max default to the model's (as A1111); used by karras, exponential,
    polyexponential, normal, sgm_uniform, kl_optimal, linear_quadratic (sigma_max only).
    "gits" and "align_your_steps" are SD-family tables (SD1.5's sigma range). rho: karras (default 7), polyexponential
    (default 1). ays_family: "sd15" or "sdxl" table for align_your_steps. alpha, beta_param:
    the Beta distribution of "beta".
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    steps = int(steps)
    schedule = names.schedule_id(name)
    smin = float(model.sigma_min if sigma_min is None else sigma_min)
    smax = float(model.sigma_max if sigma_max is None else sigma_max)
    if schedule == "karras":
        return karras(steps, smin, smax, 7.0 if rho is None else rho)
    if schedule == "exponential":
        return exponential(steps, smin, smax)
    if schedule == "polyexponential":
        return polyexponential(steps, smin, smax, 1.0 if rho is None else rho)
    if schedule == "normal":
        return normal(steps, model, smin, smax)
    if schedule == "uniform":
        return uniform(steps, model)
    if schedule == "sgm_uniform":
        return sgm_uniform(steps, model, smin, smax)
    if schedule == "simple":
        return simple(steps, model)
    if schedule == "ddim_uniform":
        return ddim_uniform(steps, model)
    if schedule == "beta":
        return beta(steps, model, alpha, beta_param)
    if schedule == "kl_optimal":
        return kl_optimal(steps, smin, smax)
    if schedule == "linear_quadratic":
        return linear_quadratic(steps, smax)
    if schedule == "gits":
        return gits(steps)
    return align_your_steps(steps, ays_family)


# ---- diffusers parity -------------------------------------------------------------------

def _spaced_timesteps(model: DiscreteModel, steps: int, solver: str) -> np.ndarray:
    n = model.num_train_timesteps
    spacing = model.timestep_spacing
    if solver == "euler":  # EulerDiscreteScheduler (and LMS, Heun, KDPM2, EulerAncestral)
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
        if spacing == "leading":
            ratio = n // steps
            return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + model.steps_offset
        return np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
    # DPMSolverMultistepScheduler (and UniPC, DEIS): steps + 1 points with the last dropped.
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = n // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + model.steps_offset
    return np.arange(n, 0, -n / steps).round().astype(np.int64) - 1


def diffusers_schedule(model: DiscreteModel, steps: int, *, solver: str = "euler",
                       sigmas: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of diffusers' `set_timesteps(steps)`, for parity with diffusers.

    solver "euler": EulerDiscreteScheduler (timesteps float32, fractional for karras/exponential/
    beta); "dpmsolver": DPMSolverMultistepScheduler (integer-valued timesteps: rounded for karras,
    truncated otherwise, as diffusers casts them to int64). Both follow the model's
    timestep_spacing and steps_offset. `sigmas`: "default" (the table interpolated at the
    timesteps), "karras", "exponential" or "beta" (diffusers' use_*_sigmas); None takes the
    config's. Returns float32 arrays of shapes (steps,) and (steps + 1,), sigmas ending in 0.
    The network should see `timesteps[i]` at `sigmas[i]`.
    """
    if solver not in ("euler", "dpmsolver"):
        raise ValueError(f"solver must be 'euler' or 'dpmsolver', not {solver!r}")
    kind = model.diffusers_sigmas if sigmas is None else sigmas
    if kind not in _DIFFUSERS_SIGMAS:
        raise ValueError(f"sigmas must be one of {_DIFFUSERS_SIGMAS}, not {kind!r}")
    table = model.sigmas
    timesteps = _spaced_timesteps(model, steps, solver)
    if kind == "default":
        out = np.interp(timesteps, np.arange(len(table)), table)
    else:
        # Euler bounds the schedule by the sigmas at its spaced timesteps; DPM-Solver by the table.
        if solver == "euler":
            spaced = np.interp(timesteps, np.arange(len(table)), table)
            smin, smax = float(spaced[-1]), float(spaced[0])
        else:
            smin, smax = float(table[0]), float(table[-1])
        if kind == "karras":
            out = karras(steps, smin, smax)[:-1]
        elif kind == "exponential":
            out = exponential(steps, smin, smax)[:-1]
        else:
            from scipy import stats

            ppf = stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, steps), 0.6, 0.6)
            out = smin + ppf * (smax - smin)
        timesteps = np.asarray(model.sigma_to_t(np.asarray(out, np.float32)))
        if solver == "dpmsolver":
            if kind == "karras" and model.beta_schedule != "squaredcos_cap_v2":
                timesteps = np.round(timesteps)
            timesteps = timesteps.astype(np.int64)
    return np.asarray(timesteps, np.float32), _append_zero(out)


def get_timesteps(model: DiscreteModel, steps: int, *, solver: str = "euler") -> np.ndarray:
    """diffusers' inference timesteps for `steps` steps under the model's timestep_spacing and
    steps_offset, float32 shape (steps,), descending. See `diffusers_schedule`."""
    return diffusers_schedule(model, steps, solver=solver, sigmas="default")[0]
