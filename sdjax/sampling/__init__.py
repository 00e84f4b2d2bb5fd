"""Sampling: pure functions over a denoiser D(x, sigma) -> x0_pred.

- `DiscreteModel`: the model's discrete noise table, from a diffusers scheduler config.
- `make_denoiser`, `cfg`, `rescale_cfg`: wrappers kept apart from the network; `with_uncond`
  lets a guided denoiser also hand CFG++ samplers its unguided x0 from the same call.
- `get_sigmas`, `diffusers_schedule`, `get_timesteps`: the schedules samplers step through.
- `resolve`, `SAMPLERS`, `SCHEDULES`: A1111 / ComfyUI names to canonical ids.
- `sample`: run a sampler (sdjax.sampling.samplers).
"""

from sdjax.sampling.denoisers import (
    cfg,
    make_denoiser,
    prediction_from_x0,
    rescale_cfg,
    scalings,
    x0_from_prediction,
)
from sdjax.sampling.names import SAMPLERS, SCHEDULES, UnknownNameError, display_names, resolve, schedule_id
from sdjax.sampling.sampler_utils import NOISE_TYPES, with_uncond
from sdjax.sampling.samplers import sample
from sdjax.sampling.schedules import DiscreteModel, diffusers_schedule, get_sigmas, get_timesteps

__all__ = [
    "DiscreteModel", "make_denoiser", "cfg", "rescale_cfg", "scalings", "x0_from_prediction",
    "prediction_from_x0", "get_sigmas", "diffusers_schedule", "get_timesteps", "resolve",
    "schedule_id", "display_names", "UnknownNameError", "SAMPLERS", "SCHEDULES", "sample",
    "with_uncond", "NOISE_TYPES",
]
