"""DiscreteModel and sigma schedules: parity with diffusers, closed forms, ComfyUI/A1111 rules."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference

from sdjax.errors import ConfigError
from sdjax.sampling import SCHEDULES, DiscreteModel, diffusers_schedule, get_sigmas, get_timesteps

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

REFERENCE_MODELS = ["sd15", "sd21", "sd2-inpainting", "sdxl-base"]


def scheduler_config(name):
    return json.loads((reference(name) / "scheduler" / "scheduler_config.json").read_text())


@pytest.fixture(scope="module")
def sd15():
    return DiscreteModel.from_config(scheduler_config("sd15"))


# ---- the model's table --------------------------------------------------------------------

@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_sigma_table_matches_diffusers_euler(name):
    config = scheduler_config(name)
    model = DiscreteModel.from_config(config)
    ref = diffusers.EulerDiscreteScheduler.from_config(config)
    ref_sigmas = ref.sigmas.numpy()[:-1][::-1]  # diffusers keeps them descending, with a 0 appended
    assert model.sigmas.dtype == np.float32 and model.sigmas.shape == (1000,)
    # diffusers accumulates the cumprod in float32, sdjax (like LDM and ComfyUI) in float64.
    np.testing.assert_allclose(model.sigmas, ref_sigmas, rtol=3e-5)
    np.testing.assert_allclose(model.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=3e-5)
    np.testing.assert_allclose(model.log_sigmas, np.log(ref_sigmas), atol=3e-5)
    assert model.sigma_min == pytest.approx(float(ref_sigmas[0]), rel=3e-5)
    assert model.sigma_max == pytest.approx(float(ref_sigmas[-1]), rel=3e-5)
    assert model.prediction_type == config.get("prediction_type", "epsilon")


@pytest.mark.parametrize("extra", [
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True},
    {"trained_betas": list(np.linspace(1e-4, 0.02, 1000))},
])
def test_other_beta_schedules_match_diffusers(extra):
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, **extra}
    model = DiscreteModel.from_config(config)
    ref = diffusers.EulerDiscreteScheduler.from_config(config).sigmas.numpy()[:-1][::-1]
    # The cosine schedule's first betas are ~4e-5: diffusers' float32 1 - beta keeps only about
    # 3 digits of them, sdjax's float64 keeps all, hence the looser tolerance there.
    rtol = 5e-4 if extra.get("beta_schedule") == "squaredcos_cap_v2" else 1e-4
    np.testing.assert_allclose(model.sigmas, ref, rtol=rtol)


def test_config_keys_are_checked():
    base = scheduler_config("sd15")
    assert DiscreteModel.from_config({**base, "clip_sample": True, "solver_order": 3}).steps_offset == 1
    with pytest.raises(ConfigError, match="timestep_type"):
        DiscreteModel.from_config({**base, "timestep_type": "continuous"})
    with pytest.raises(ConfigError, match="beta_schedule"):
        DiscreteModel.from_config({**base, "beta_schedule": "sigmoid"})
    with pytest.raises(ConfigError, match="prediction_type"):
        DiscreteModel.from_config({**base, "prediction_type": "flow"})
    with pytest.raises(ConfigError, match="no_such_key"):
        DiscreteModel.from_config({**base, "no_such_key": 1})
    with pytest.raises(ConfigError, match="at most one"):
        DiscreteModel.from_config({**base, "use_karras_sigmas": True, "use_beta_sigmas": True})


def test_timestep_spacing_default_follows_the_scheduler_class():
    # sd15's PNDM config has no timestep_spacing: diffusers' PNDM defaults to "leading",
    # Euler to "linspace".
    config = {k: v for k, v in scheduler_config("sd15").items() if k != "_class_name"}
    assert DiscreteModel.from_config({**config, "_class_name": "PNDMScheduler"}).timestep_spacing == "leading"
    assert DiscreteModel.from_config({**config, "_class_name": "EulerDiscreteScheduler"}).timestep_spacing == "linspace"
    assert DiscreteModel.from_config(scheduler_config("sdxl-base")).diffusers_sigmas == "default"
    assert DiscreteModel.from_config({**config, "use_karras_sigmas": True}).diffusers_sigmas == "karras"


def test_model_is_hashable_and_a_static_jit_argument(sd15):
    assert hash(sd15) == hash(DiscreteModel.from_config(scheduler_config("sd15")))
    f = jax.jit(lambda m, s: m.sigma_to_t(s), static_argnums=0)
    assert float(f(sd15, jnp.float32(sd15.sigma_max))) == pytest.approx(999.0, abs=1e-3)


# ---- sigma <-> t ---------------------------------------------------------------------------

def test_sigma_to_t_round_trips_under_jit(sd15):
    t = jnp.asarray(np.random.default_rng(0).uniform(0, 999, size=64), jnp.float32)
    sigma = jax.jit(sd15.t_to_sigma)(t)
    np.testing.assert_allclose(jax.jit(sd15.sigma_to_t)(sigma), t, atol=2e-3)
    # Integer timesteps hit the table exactly.
    np.testing.assert_allclose(sd15.t_to_sigma(jnp.arange(1000)), sd15.sigmas, rtol=1e-6)
    # Out of range sigmas clamp to the ends; quantize gives the nearest index.
    np.testing.assert_allclose(sd15.sigma_to_t(jnp.array([1e-4, 1e4])), [0.0, 999.0])
    assert float(sd15.sigma_to_t(sd15.t_to_sigma(41.4), quantize=True)) == 41.0


def test_sigma_to_t_matches_diffusers(sd15):
    ref = diffusers.EulerDiscreteScheduler.from_config(scheduler_config("sd15"))
    sigmas = np.geomspace(0.03, 14.0, 37)
    log_table = np.log(sd15.sigmas.astype(np.float64))
    np.testing.assert_allclose(sd15.sigma_to_t(sigmas), ref._sigma_to_t(sigmas, log_table), atol=2e-3)


# ---- sdjax schedules -------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 10, 20, 50])
@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_is_descending_and_ends_in_zero(sd15, name, steps):
    sigmas = get_sigmas(name, steps, sd15)
    assert isinstance(sigmas, np.ndarray) and sigmas.dtype == np.float32
    assert sigmas.shape == (steps + 1,)
    assert sigmas[-1] == 0.0
    assert np.all(np.diff(sigmas) < 0)
    if name == "ddim_uniform":  # LDM's DDIM timesteps start at 1 + c * (steps - 1), c = T // steps
        assert sigmas[0] == sd15.sigmas[1 + (1000 // steps) * (steps - 1)]
    else:
        assert sigmas[0] == pytest.approx(sd15.sigma_max, rel=1e-4)


def test_karras_is_the_closed_form(sd15):
    steps, rho = 25, 7.0
    smin, smax = sd15.sigma_min, sd15.sigma_max
    expected = [(smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
                for i in range(steps)] + [0.0]
    np.testing.assert_allclose(get_sigmas("karras", steps, sd15), expected, rtol=1e-6)
    np.testing.assert_allclose(get_sigmas("Karras", 5, sd15, sigma_min=0.1, sigma_max=10.0, rho=3.0)[[0, 4]],
                               [10.0, 0.1], rtol=1e-6)


def test_exponential_and_kl_optimal_closed_forms(sd15):
    exp = get_sigmas("exponential", 12, sd15)[:-1]
    np.testing.assert_allclose(np.diff(np.log(exp)), np.full(11, np.log(sd15.sigma_min / sd15.sigma_max) / 11), rtol=1e-4)
    np.testing.assert_allclose(get_sigmas("polyexponential", 12, sd15), get_sigmas("exponential", 12, sd15), rtol=1e-6)
    poly2 = get_sigmas("polyexponential", 12, sd15, rho=2.0)
    assert poly2[0] == pytest.approx(sd15.sigma_max, rel=1e-6) and poly2[6] < exp[6]  # ramp**2 lingers at low sigma
    kl = get_sigmas("KL Optimal", 12, sd15)[:-1]
    steps_in_atan = np.diff(np.arctan(kl.astype(np.float64)))
    np.testing.assert_allclose(steps_in_atan, np.full(11, steps_in_atan[0]), rtol=1e-4)


def test_uniform_normal_sgm_and_simple_follow_the_timestep_rules(sd15):
    # A1111 "Uniform" (k-diffusion get_sigmas) and ComfyUI "normal": t = linspace(999, 0, n).
    t = np.linspace(999, 0, 10)
    expected = np.append(np.asarray(sd15.t_to_sigma(t)), 0.0)
    np.testing.assert_allclose(get_sigmas("uniform", 10, sd15), expected, rtol=1e-6)
    np.testing.assert_allclose(get_sigmas("normal", 10, sd15), expected, rtol=1e-6)
    # "normal" honours a given sigma_max, "uniform" ignores it.
    assert get_sigmas("normal", 10, sd15, sigma_max=5.0)[0] == pytest.approx(5.0, rel=1e-4)
    # sgm_uniform: steps + 1 timesteps, the last (t = 0) dropped.
    t = np.linspace(999, 0, 11)[:-1]
    np.testing.assert_allclose(get_sigmas("SGM Uniform", 10, sd15),
                               np.append(np.asarray(sd15.t_to_sigma(t)), 0.0), rtol=1e-6)
    # simple: every 100th table entry from the top.
    np.testing.assert_array_equal(get_sigmas("simple", 10, sd15)[:-1], sd15.sigmas[[999 - 100 * i for i in range(10)]])


def test_ddim_uniform_keeps_ldm_timesteps_when_steps_do_not_divide(sd15):
    # LDM make_ddim_timesteps("uniform"): range(0, T, T // steps) + 1; 30 steps -> 31 timesteps.
    timesteps = np.arange(0, 1000, 1000 // 30) + 1
    sigmas = get_sigmas("ddim_uniform", 30, sd15)
    assert sigmas.shape == (32,)
    np.testing.assert_array_equal(sigmas[:-1], sd15.sigmas[timesteps][::-1])


@pytest.mark.parametrize("steps,alpha,beta_param", [(20, 0.6, 0.6), (9, 0.5, 0.7), (30, 1.0, 1.0)])
def test_beta_picks_table_entries_at_beta_quantiles(sd15, steps, alpha, beta_param):
    """Lee et al. 2024 as ComfyUI's beta_scheduler: timesteps T_max * ppf(1 - k/steps) of
    Beta(alpha, beta), rounded, repeats dropped, their table sigmas, then 0."""
    from scipy import stats

    quantiles = 1.0 - np.arange(steps) / steps
    ts = np.rint(stats.beta.ppf(quantiles, alpha, beta_param) * (sd15.num_train_timesteps - 1)).astype(int)
    ts = [t for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
    expected = np.append(sd15.sigmas.astype(np.float64)[ts], 0.0)
    got = get_sigmas("beta", steps, sd15, alpha=alpha, beta_param=beta_param)
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=0, atol=0)
    assert ts[0] == 999 and len(got) == steps + 1


# NVIDIA's published 10-step "Align Your Steps" noise levels (Sabour et al. 2024,
# https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), typed in here so
# the test does not read sdjax's own table.
PUBLISHED_AYS = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_align_your_steps_is_the_published_table(sd15, family):
    published = PUBLISHED_AYS[family]
    # 10 steps: the table itself, its last level replaced by 0 (ComfyUI's AlignYourStepsScheduler).
    np.testing.assert_allclose(get_sigmas("align_your_steps", 10, sd15, ays_family=family),
                               published[:-1] + [0.0], rtol=1e-6)
    # Other step counts: the table interpolated linearly in log(sigma) over an even grid.
    for steps in (20, 7):
        grid = np.linspace(0.0, 1.0, steps + 1)
        expected = np.exp(np.interp(grid, np.linspace(0.0, 1.0, 11), np.log(published[::-1])))[::-1]
        got = get_sigmas("Align Your Steps", steps, sd15, ays_family=family)
        np.testing.assert_allclose(got, np.append(expected[:-1], 0.0), rtol=1e-6)


def test_bad_schedule_arguments(sd15):
    with pytest.raises(ValueError, match="karras"):
        get_sigmas("no_such_schedule", 10, sd15)
    with pytest.raises(ValueError, match="steps"):
        get_sigmas("karras", 0, sd15)
    with pytest.raises(ValueError, match="sdxl"):
        get_sigmas("align_your_steps", 10, sd15, ays_family="sd3")


# ---- diffusers parity -------------------------------------------------------------------

DIFFUSERS_FLAGS = {"default": {}, "karras": {"use_karras_sigmas": True},
                   "exponential": {"use_exponential_sigmas": True}, "beta": {"use_beta_sigmas": True}}


@pytest.mark.parametrize("steps", [7, 20, 30])
@pytest.mark.parametrize("kind", list(DIFFUSERS_FLAGS))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("solver", ["euler", "dpmsolver"])
def test_diffusers_schedule_matches_set_timesteps(solver, spacing, kind, steps):
    config = {**scheduler_config("sd15"), "timestep_spacing": spacing, **DIFFUSERS_FLAGS[kind]}
    cls = diffusers.EulerDiscreteScheduler if solver == "euler" else diffusers.DPMSolverMultistepScheduler
    ref = cls.from_config(config)
    ref.set_timesteps(steps)
    model = DiscreteModel.from_config(config)
    timesteps, sigmas = diffusers_schedule(model, steps, solver=solver)
    assert timesteps.dtype == np.float32 and sigmas.dtype == np.float32
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-4, atol=1e-7)
    ref_t = ref.timesteps.numpy().astype(np.float32)
    if solver == "dpmsolver" and kind in ("exponential", "beta"):
        # DPM-Solver truncates fractional timesteps to int64; at sigma_max diffusers' own float32
        # table gives 998.99999975 -> 998 where sdjax's gives 999.0: a one-timestep knife edge
        # at the first timestep only. Every other timestep must be the same integer.
        assert timesteps[0] - ref_t[0] in (0.0, 1.0), (timesteps[0], ref_t[0])
        np.testing.assert_array_equal(timesteps[1:], ref_t[1:])
    elif np.all(ref_t == np.round(ref_t)):
        np.testing.assert_array_equal(timesteps, ref_t)  # integer timesteps: the same integers
    else:
        # Euler's fractional timesteps for Karras/exponential/beta sigmas are interpolated in
        # diffusers' float32 log-sigma table (sdjax's is float64): they agree to ~1e-3 of a step.
        np.testing.assert_allclose(timesteps, ref_t, rtol=0, atol=2e-3)
    if kind == "default":
        np.testing.assert_array_equal(get_timesteps(model, steps, solver=solver), timesteps)


def test_diffusers_schedule_rejects_unknown_options(sd15):
    with pytest.raises(ValueError, match="solver"):
        diffusers_schedule(sd15, 10, solver="heun")
    with pytest.raises(ValueError, match="sigmas"):
        diffusers_schedule(sd15, 10, sigmas="polyexponential")


def test_leading_timesteps_are_the_sd_default(sd15):
    # SD 1.5 with steps_offset 1: 981, 961, ..., 1 for 50 steps.
    np.testing.assert_array_equal(get_timesteps(sd15, 50), np.arange(981, 0, -20, dtype=np.float32))
    assert math.isclose(float(diffusers_schedule(sd15, 50)[1][0]), float(sd15.sigmas[981]), rel_tol=1e-6)
