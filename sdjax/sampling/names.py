"""Sampler and schedule names: A1111 display names, ComfyUI names and diffusers class names
mapped to sdjax's canonical ids.

`resolve(name, schedule=None) -> (sampler_id, schedule_id)` always returns a plain 2-tuple.
Variants that differ in the solver (A1111's "DPM++ 2M SDE Heun") are distinct sampler ids
(`dpmpp_2m_sde_heun`) rather than a knob, so the pair is enough to pick the code path.

Matching ignores case, spaces, underscores and hyphens, so "DPM++ 2M Karras", "dpm++ 2m karras"
and ("dpmpp_2m", "karras") all resolve alike. A schedule may be baked into the sampler name
("LMS Karras", "Euler a Exponential"), as in A1111 before 1.9; A1111's "Automatic" (or no
schedule) picks the sampler's default schedule, with A1111 1.9's defaults.
"""

from __future__ import annotations

import re

from sdjax.errors import UnknownNameError


# Canonical sampler ids: one per code path in sdjax.sampling.samplers.
SAMPLERS: list[str] = [
    "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms",
    "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde", "ddim", "ddpm", "ipndm", "ipndm_v", "plms", "unipc", "unipc_bh2", "lcm",
    "heunpp2", "deis", "dpm_fast", "dpm_adaptive", "euler_cfg_pp", "euler_ancestral_cfg_pp",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
]

# Canonical schedule ids: the names `sdjax.sampling.get_sigmas` takes.
SCHEDULES: list[str] = [
    "normal", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "simple",
    "ddim_uniform", "beta", "kl_optimal", "align_your_steps", "linear_quadratic", "gits",
]

# A1111 1.9 display labels; the first label of each id is the one written to infotext.
_SAMPLER_LABELS: dict[str, list[str]] = {
    "euler": ["Euler", "k_euler", "EulerDiscreteScheduler"],
    "euler_ancestral": ["Euler a", "k_euler_a", "k_euler_ancestral", "EulerAncestralDiscreteScheduler"],
    "heun": ["Heun", "k_heun", "HeunDiscreteScheduler"],
    "dpm_2": ["DPM2", "k_dpm_2", "KDPM2DiscreteScheduler"],
    "dpm_2_ancestral": ["DPM2 a", "k_dpm_2_a", "KDPM2AncestralDiscreteScheduler"],
    "lms": ["LMS", "k_lms", "LMSDiscreteScheduler"],
    "dpmpp_2s_ancestral": ["DPM++ 2S a", "k_dpmpp_2s_a"],
    "dpmpp_sde": ["DPM++ SDE", "k_dpmpp_sde", "dpmpp_sde_gpu", "DPMSolverSDEScheduler"],
    "dpmpp_2m": ["DPM++ 2M", "k_dpmpp_2m", "DPMSolverMultistepScheduler"],
    "dpmpp_2m_sde": ["DPM++ 2M SDE", "k_dpmpp_2m_sde", "dpmpp_2m_sde_gpu"],
    "dpmpp_2m_sde_heun": ["DPM++ 2M SDE Heun", "k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"],
    "dpmpp_3m_sde": ["DPM++ 3M SDE", "k_dpmpp_3m_sde", "dpmpp_3m_sde_gpu"],
    "ddim": ["DDIM", "DDIMScheduler"],
    "ddpm": ["DDPM", "DDPMScheduler"],
    "ipndm": ["iPNDM", "IPNDM"],
    "ipndm_v": ["iPNDM v"],
    "plms": ["PLMS", "PNDMScheduler"],
    "unipc": ["UniPC", "uni_pc", "UniPCMultistepScheduler"],
    "unipc_bh2": ["UniPC BH2", "uni_pc_bh2"],
    "lcm": ["LCM", "LCMScheduler"],
    "heunpp2": ["Heun++ 2", "Heunpp2"],
    "deis": ["DEIS", "DEISMultistepScheduler"],
    "dpm_fast": ["DPM fast", "k_dpm_fast"],
    "dpm_adaptive": ["DPM adaptive", "k_dpm_ad", "k_dpm_adaptive"],
    # A1111's "DDIM CFG++" is DDIM (eta 0) with CFG++; in sigma space DDIM is Euler.
    "euler_cfg_pp": ["Euler CFG++", "DDIM CFG++"],
    "euler_ancestral_cfg_pp": ["Euler a CFG++"],
    "dpmpp_2s_ancestral_cfg_pp": ["DPM++ 2S a CFG++"],
    "dpmpp_2m_cfg_pp": ["DPM++ 2M CFG++"],
    "res_multistep": ["Res Multistep", "RES multistep"],
    "res_multistep_cfg_pp": ["Res Multistep CFG++"],
    "res_multistep_ancestral": ["Res Multistep a"],
    "res_multistep_ancestral_cfg_pp": ["Res Multistep a CFG++"],
    "gradient_estimation": ["Gradient Estimation"],
    "gradient_estimation_cfg_pp": ["Gradient Estimation CFG++"],
    "er_sde": ["ER SDE", "ER-SDE"],
    "seeds_2": ["SEEDS 2"],
    "seeds_3": ["SEEDS 3"],
    "sa_solver": ["SA-Solver", "SA Solver"],
    "sa_solver_pece": ["SA-Solver PECE", "SA Solver PECE"],
}

_SCHEDULE_LABELS: dict[str, list[str]] = {
    "normal": ["Normal"],
    "uniform": ["Uniform"],
    "karras": ["Karras"],
    "exponential": ["Exponential"],
    "polyexponential": ["Polyexponential"],
    "sgm_uniform": ["SGM Uniform", "SGMUniform"],
    "simple": ["Simple"],
    "ddim_uniform": ["DDIM", "ddim"],
    "beta": ["Beta"],
    "kl_optimal": ["KL Optimal"],
    "align_your_steps": ["Align Your Steps", "AYS"],
    "linear_quadratic": ["Linear Quadratic"],
    "gits": ["GITS", "GITSScheduler"],
}

_AUTOMATIC = "automatic"

# The schedule A1111 1.9 uses for "Automatic" (its samplers' `scheduler` option; the rest use
# k-diffusion's model.get_sigmas, which is "uniform", equal to ComfyUI's "normal" for SD).
# DDIM and PLMS step on LDM's uniform DDIM timesteps.
DEFAULT_SCHEDULE: dict[str, str] = {
    **{s: "normal" for s in SAMPLERS},
    "dpm_2": "karras", "dpm_2_ancestral": "karras", "dpmpp_2s_ancestral": "karras",
    "dpmpp_sde": "karras", "dpmpp_2m": "karras",
    "dpmpp_2m_sde": "exponential", "dpmpp_2m_sde_heun": "exponential", "dpmpp_3m_sde": "exponential",
    "ddim": "ddim_uniform", "plms": "ddim_uniform",
}

# Names users will try that sdjax knowingly does not implement: a clearer error than "unknown".
_NOT_IMPLEMENTED = ["Restart"]


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def _table(labels: dict[str, list[str]]) -> dict[str, str]:
    out = {}
    for canonical, names in labels.items():
        for n in [canonical, *names]:
            out[_key(n)] = canonical
    return out


_SAMPLER_KEYS = _table(_SAMPLER_LABELS)
_SCHEDULE_KEYS = _table(_SCHEDULE_LABELS)
# Longest first, so "sgm uniform" is split off before "uniform".
_SUFFIXES = sorted(_SCHEDULE_KEYS, key=len, reverse=True)
_NOT_IMPLEMENTED_KEYS = {_key(n) for n in _NOT_IMPLEMENTED}


def _valid_samplers() -> str:
    return ", ".join(f"{s} ({_SAMPLER_LABELS[s][0]})" for s in SAMPLERS)


def _valid_schedules() -> str:
    return ", ".join(f"{s} ({_SCHEDULE_LABELS[s][0]})" for s in SCHEDULES) + ", automatic"


def schedule_id(name: str) -> str:
    """Canonical schedule id for an A1111 label ("SGM Uniform") or ComfyUI name ("sgm_uniform").

    Raises UnknownNameError listing the valid schedules. "Automatic" is not a schedule here:
    use `resolve`, which knows the sampler it depends on.
    """
    found = _SCHEDULE_KEYS.get(_key(name))
    if found is None:
        raise UnknownNameError(f"unknown schedule {name!r}; valid schedules: {_valid_schedules()}")
    return found


def resolve(name: str, schedule: str | None = None) -> tuple[str, str]:
    """Canonical `(sampler_id, schedule_id)` for a sampler name and an optional schedule name.

    `name`: an A1111 sampler label, possibly with a schedule baked in ("DPM++ 2M Karras"), a
    ComfyUI sampler name ("dpmpp_2m_sde_gpu"), a diffusers scheduler class name, or a canonical
    id. `schedule`: an A1111 "Schedule type" label, a ComfyUI scheduler name, "Automatic", or
    None. Without a schedule (or "Automatic") the sampler's A1111 1.9 default is used
    (`DEFAULT_SCHEDULE`). Raises UnknownNameError (a ValueError) listing the valid names.
    """
    key = _key(name)
    sampler = _SAMPLER_KEYS.get(key)
    baked = None
    if sampler is None:
        for suffix in _SUFFIXES:
            if key.endswith(suffix) and key[: -len(suffix)] in _SAMPLER_KEYS:
                sampler, baked = _SAMPLER_KEYS[key[: -len(suffix)]], _SCHEDULE_KEYS[suffix]
                break
    if sampler is None:
        if key in _NOT_IMPLEMENTED_KEYS:
            raise UnknownNameError(
                f"sampler {name!r} is not implemented in sdjax; valid samplers: {_valid_samplers()}")
        raise UnknownNameError(f"unknown sampler {name!r}; valid samplers: {_valid_samplers()}")

    given = None
    if schedule is not None and _key(schedule) != _AUTOMATIC:
        given = schedule_id(schedule)
    if baked is not None and given is not None and baked != given:
        raise UnknownNameError(
            f"sampler name {name!r} carries schedule {baked!r} but schedule {schedule!r} was also "
            f"given; pass the sampler without the schedule suffix")
    return sampler, given or baked or DEFAULT_SCHEDULE[sampler]


def display_names(sampler: str, schedule: str) -> tuple[str, str]:
    """A1111 1.9 infotext labels `("Sampler", "Schedule type")` for canonical ids,
    e.g. ("dpmpp_2m", "karras") -> ("DPM++ 2M", "Karras")."""
    if sampler not in _SAMPLER_LABELS:
        raise UnknownNameError(f"unknown sampler id {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if schedule not in _SCHEDULE_LABELS:
        raise UnknownNameError(f"unknown schedule id {schedule!r}; valid: {', '.join(SCHEDULES)}")
    return _SAMPLER_LABELS[sampler][0], _SCHEDULE_LABELS[schedule][0]
