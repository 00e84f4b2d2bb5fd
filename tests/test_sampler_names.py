"""A1111 / ComfyUI / diffusers sampler and schedule names resolve to canonical ids."""

import pytest

from sdjax.errors import SdjaxError
from sdjax.sampling import SAMPLERS, SCHEDULES, UnknownNameError, display_names, get_sigmas, resolve, schedule_id
from sdjax.sampling.schedules import DiscreteModel

# (name, schedule given or None) -> (sampler, schedule); A1111 1.9 "Automatic" defaults.
CASES = [
    # A1111 display names, schedule left to the sampler.
    ("Euler a", None, ("euler_ancestral", "normal")),
    ("Euler", None, ("euler", "normal")),
    ("LMS", None, ("lms", "normal")),
    ("Heun", None, ("heun", "normal")),
    ("DPM2", None, ("dpm_2", "karras")),
    ("DPM2 a", None, ("dpm_2_ancestral", "karras")),
    ("DPM++ 2S a", None, ("dpmpp_2s_ancestral", "karras")),
    ("DPM++ SDE", None, ("dpmpp_sde", "karras")),
    ("DPM++ 2M", None, ("dpmpp_2m", "karras")),
    ("DPM++ 2M SDE", None, ("dpmpp_2m_sde", "exponential")),
    ("DPM++ 2M SDE Heun", None, ("dpmpp_2m_sde_heun", "exponential")),
    ("DPM++ 3M SDE", None, ("dpmpp_3m_sde", "exponential")),
    ("DDIM", None, ("ddim", "ddim_uniform")),
    ("DDPM", None, ("ddpm", "normal")),
    ("PLMS", None, ("plms", "ddim_uniform")),
    ("UniPC", None, ("unipc", "normal")),
    ("LCM", None, ("lcm", "normal")),
    # A1111 names with the schedule baked in (before 1.9, and still accepted by it).
    ("LMS Karras", None, ("lms", "karras")),
    ("DPM2 Karras", None, ("dpm_2", "karras")),
    ("DPM2 a Karras", None, ("dpm_2_ancestral", "karras")),
    ("DPM++ 2S a Karras", None, ("dpmpp_2s_ancestral", "karras")),
    ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
    ("DPM++ SDE Karras", None, ("dpmpp_sde", "karras")),
    ("DPM++ 2M SDE Karras", None, ("dpmpp_2m_sde", "karras")),
    ("DPM++ 2M SDE Exponential", None, ("dpmpp_2m_sde", "exponential")),
    ("DPM++ 2M SDE Heun Karras", None, ("dpmpp_2m_sde_heun", "karras")),
    ("DPM++ 2M SDE Heun Exponential", None, ("dpmpp_2m_sde_heun", "exponential")),
    ("DPM++ 3M SDE Karras", None, ("dpmpp_3m_sde", "karras")),
    ("DPM++ 3M SDE Exponential", None, ("dpmpp_3m_sde", "exponential")),
    ("Euler a Karras", None, ("euler_ancestral", "karras")),
    ("Euler SGM Uniform", None, ("euler", "sgm_uniform")),
    ("Euler Uniform", None, ("euler", "uniform")),
    # A1111 1.9 "Schedule type" labels.
    ("Euler", "Automatic", ("euler", "normal")),
    ("DPM++ 2M", "Automatic", ("dpmpp_2m", "karras")),
    ("DPM++ 2M", "Karras", ("dpmpp_2m", "karras")),
    ("DPM++ 2M", "Exponential", ("dpmpp_2m", "exponential")),
    ("Euler", "Uniform", ("euler", "uniform")),
    ("Euler", "SGM Uniform", ("euler", "sgm_uniform")),
    ("Euler", "SGMUniform", ("euler", "sgm_uniform")),
    ("Euler", "Polyexponential", ("euler", "polyexponential")),
    ("Euler", "Align Your Steps", ("euler", "align_your_steps")),
    ("Euler", "KL Optimal", ("euler", "kl_optimal")),
    ("Euler", "Beta", ("euler", "beta")),
    ("Euler", "Simple", ("euler", "simple")),
    ("Euler", "Normal", ("euler", "normal")),
    ("Euler", "DDIM", ("euler", "ddim_uniform")),
    ("DPM++ 2M Karras", "Karras", ("dpmpp_2m", "karras")),
    ("DPM++ 2M Karras", "Automatic", ("dpmpp_2m", "karras")),
    # ComfyUI sampler and scheduler names.
    ("euler", "normal", ("euler", "normal")),
    ("euler_ancestral", "karras", ("euler_ancestral", "karras")),
    ("heun", "simple", ("heun", "simple")),
    ("dpm_2", "karras", ("dpm_2", "karras")),
    ("dpm_2_ancestral", "normal", ("dpm_2_ancestral", "normal")),
    ("lms", "exponential", ("lms", "exponential")),
    ("dpmpp_2s_ancestral", "karras", ("dpmpp_2s_ancestral", "karras")),
    ("dpmpp_sde", "karras", ("dpmpp_sde", "karras")),
    ("dpmpp_sde_gpu", "karras", ("dpmpp_sde", "karras")),
    ("dpmpp_2m", "karras", ("dpmpp_2m", "karras")),
    ("dpmpp_2m_sde", "exponential", ("dpmpp_2m_sde", "exponential")),
    ("dpmpp_2m_sde_gpu", "karras", ("dpmpp_2m_sde", "karras")),
    ("dpmpp_3m_sde", "sgm_uniform", ("dpmpp_3m_sde", "sgm_uniform")),
    ("dpmpp_3m_sde_gpu", "beta", ("dpmpp_3m_sde", "beta")),
    ("ddpm", "normal", ("ddpm", "normal")),
    ("lcm", "sgm_uniform", ("lcm", "sgm_uniform")),
    ("ipndm", "kl_optimal", ("ipndm", "kl_optimal")),
    ("ddim", "ddim_uniform", ("ddim", "ddim_uniform")),
    ("uni_pc", "normal", ("unipc", "normal")),
    ("uni_pc_bh2", "karras", ("unipc_bh2", "karras")),
    ("euler", "align_your_steps", ("euler", "align_your_steps")),
    # diffusers scheduler classes.
    ("EulerAncestralDiscreteScheduler", None, ("euler_ancestral", "normal")),
    ("DPMSolverMultistepScheduler", "karras", ("dpmpp_2m", "karras")),
    # Case, spaces, underscores.
    ("dpm++ 2m karras", None, ("dpmpp_2m", "karras")),
    ("  DPM++  2M SDE heun  ", "EXPONENTIAL", ("dpmpp_2m_sde_heun", "exponential")),
    ("EULER_A", "sgm uniform", ("euler_ancestral", "sgm_uniform")),
]


@pytest.mark.parametrize("name, schedule, expected", CASES)
def test_resolve(name, schedule, expected):
    resolved = resolve(name, schedule)
    assert resolved == expected
    assert type(resolved) is tuple and len(resolved) == 2
    assert resolved[0] in SAMPLERS and resolved[1] in SCHEDULES


def test_issue_contract():
    assert resolve("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    sampler, schedule = resolve("Euler a")
    assert (sampler, schedule) == ("euler_ancestral", "normal")


def test_canonical_ids_resolve_to_themselves():
    for sampler in SAMPLERS:
        assert resolve(sampler)[0] == sampler
        for schedule in SCHEDULES:
            assert resolve(sampler, schedule) == (sampler, schedule)
            assert schedule_id(schedule) == schedule


def test_every_schedule_name_reaches_get_sigmas():
    model = DiscreteModel(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for schedule in SCHEDULES:
        assert get_sigmas(display_names("euler", schedule)[1], 10, model)[-1] == 0.0


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(UnknownNameError) as info:
        resolve("Euler b")
    message = str(info.value)
    assert "Euler b" in message
    for sampler in SAMPLERS:
        assert sampler in message
    assert "DPM++ 2M" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, SdjaxError)


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(UnknownNameError) as info:
        resolve("Euler", "Cosine")
    for schedule in SCHEDULES:
        assert schedule in str(info.value)
    with pytest.raises(UnknownNameError, match="Align Your Steps"):
        schedule_id("ays2")


def test_not_implemented_and_contradictory_names():
    with pytest.raises(UnknownNameError, match="not implemented"):
        resolve("Restart")
    with pytest.raises(UnknownNameError, match="carries schedule"):
        resolve("DPM++ 2M Karras", "Exponential")


def test_display_names_round_trip():
    assert display_names("dpmpp_2m", "karras") == ("DPM++ 2M", "Karras")
    assert display_names("euler_ancestral", "sgm_uniform") == ("Euler a", "SGM Uniform")
    for sampler in SAMPLERS:
        for schedule in SCHEDULES:
            assert resolve(*display_names(sampler, schedule)) == (sampler, schedule)
    with pytest.raises(UnknownNameError):
        display_names("Euler", "karras")


def test_every_canonical_sampler_has_an_implementation():
    from sdjax.sampling import samplers

    assert set(SAMPLERS) == set(samplers.SAMPLERS)
