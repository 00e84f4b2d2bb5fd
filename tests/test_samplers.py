"""Parity of sdjax samplers with diffusers schedulers, driven by one model function.

The same fixed random "network" eps(x_in, t) (channel mixing whose gain and bias depend
smoothly on t) is written in torch and in JAX; diffusers feeds it its timesteps, sdjax's
denoiser converts sigma -> t. Stochastic pairs get the same noise: diffusers' randn_tensor
is replaced by the noise sdjax draws for that step (`step_noise`). We check the per-call
timesteps, the sigma schedules and the final latents (1e-4 relative).
"""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import reference

from sdjax.sampling.denoisers import make_denoiser
from sdjax.sampling.samplers import SAMPLERS, sample
from sdjax.sampling.sampler_utils import step_noise
from sdjax.sampling.schedules import DiscreteModel, diffusers_schedule, get_sigmas

SHAPE = (2, 4, 4, 4)  # NHWC
_rng = np.random.default_rng(1234)
W = (0.6 * np.eye(4) + 0.15 * _rng.normal(size=(4, 4))).astype(np.float32)
BIAS = (0.3 * _rng.normal(size=(4,))).astype(np.float32)
NOISE0 = _rng.normal(size=SHAPE).astype(np.float32)


def torch_net(x_in, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    gain = 1 + 0.3 * torch.sin(t / 150)
    return (x_in @ torch.from_numpy(W)) * gain + torch.from_numpy(BIAS) * torch.cos(t / 90)


def jax_net(record):
    def net(x_in, t):  # x_in (B, H, W, C), t (B,)
        jax.debug.callback(lambda tt: record.append(float(tt[0])), t, ordered=True)
        t = t.reshape(-1, 1, 1, 1)
        return (x_in @ jnp.asarray(W)) * (1 + 0.3 * jnp.sin(t / 150)) + jnp.asarray(BIAS) * jnp.cos(t / 90)

    return net


def sd15_config(**overrides):
    with open(reference("sd15") / "scheduler" / "scheduler_config.json") as f:
        return {**json.load(f), **overrides}


def run_diffusers(sched, x, noises, monkeypatch):
    """The standard diffusers loop; returns (final sample, timesteps fed to the network)."""
    module = __import__(type(sched).__module__, fromlist=["randn_tensor"])
    drawn = iter(noises)
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(drawn)))
    seen = []
    for t in sched.timesteps:
        eps = torch_net(sched.scale_model_input(x, t), t)
        seen.append(float(t))
        x = sched.step(eps, t, x).prev_sample
    return x.numpy(), seen


def keys_and_noises(steps):
    keys = jax.random.split(jax.random.key(7), SHAPE[0])
    noises = [np.asarray(step_noise(keys, i, SHAPE[1:])) for i in range(steps)]
    return keys, noises


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# (sdjax name, diffusers class, config overrides, steps, knobs, schedule kind, timestep_mode)
K_CASES = [
    ("euler", "EulerDiscreteScheduler", {}, 10, {}, "default", "continuous"),
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, 10, {}, "karras", "continuous"),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", {}, 10, {}, "default", "continuous"),
    ("heun", "HeunDiscreteScheduler", {}, 8, {}, "default", "continuous"),
    ("dpm_2", "KDPM2DiscreteScheduler", {}, 8, {}, "default", "continuous"),
    ("heun", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, 8, {}, "karras", "continuous"),
    ("dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler", {}, 8, {}, "default", "continuous"),
    ("lms", "LMSDiscreteScheduler", {}, 12, {}, "default", "continuous"),
    ("lms", "LMSDiscreteScheduler", {"use_karras_sigmas": True}, 12, {}, "karras", "continuous"),
]


@pytest.mark.parametrize("name,cls,overrides,steps,knobs,kind,mode", K_CASES,
                         ids=[f"{c[0]}-{c[5]}" for c in K_CASES])
def test_k_diffusion_family_matches_diffusers(name, cls, overrides, steps, knobs, kind, mode, monkeypatch):
    # These diffusers classes default to "linspace" spacing; the model must be told the same.
    config = sd15_config(timestep_spacing="linspace", **overrides)
    sched = getattr(diffusers, cls).from_config(config)
    sched.set_timesteps(steps)
    model = DiscreteModel.from_config(config)
    timesteps, sigmas = diffusers_schedule(model, steps, solver="euler", sigmas=kind)
    base = torch.unique_consecutive(sched.sigmas).numpy()
    np.testing.assert_allclose(sigmas, base, rtol=5e-5)  # sdjax builds the table in float64, diffusers in float32

    keys, noises = keys_and_noises(steps)
    x_init = NOISE0 * float(sched.init_noise_sigma)
    ref, ref_ts = run_diffusers(sched, torch.from_numpy(x_init), noises, monkeypatch)
    seen = []
    denoise = make_denoiser(model, jax_net(seen), timestep_mode=mode)
    out = sample(name, denoise, jnp.asarray(x_init), jnp.asarray(sigmas), keys, **knobs)
    jax.effects_barrier()
    np.testing.assert_allclose(seen, ref_ts, atol=2e-3)  # same network calls, same t
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


DPM_CASES = [
    ("dpmpp_2m", {}, "default", "continuous"),
    ("dpmpp_2m", {"use_karras_sigmas": True}, "karras", "round"),
    ("dpmpp_2m_sde", {"algorithm_type": "sde-dpmsolver++"}, "default", "continuous"),
    ("dpmpp_2m_sde", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, "karras", "round"),
    ("dpmpp_2m_sde_heun", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, "default", "continuous"),
]


@pytest.mark.parametrize("name,overrides,kind,mode", DPM_CASES, ids=[f"{c[0]}-{c[2]}" for c in DPM_CASES])
def test_dpm_solver_multistep_matches_diffusers(name, overrides, kind, mode, monkeypatch):
    # 20 steps: below 15 diffusers also lowers the second-to-last step's order.
    steps = 20
    config = sd15_config(timestep_spacing="linspace", **overrides)
    sched = diffusers.DPMSolverMultistepScheduler.from_config(config)
    sched.set_timesteps(steps)
    model = DiscreteModel.from_config(config)
    timesteps, sigmas = diffusers_schedule(model, steps, solver="dpmsolver", sigmas=kind)
    np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=5e-5)  # sdjax builds the table in float64, diffusers in float32
    np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())

    keys, noises = keys_and_noises(steps)
    # diffusers steps the VP sample x / sqrt(1 + sigma^2); sdjax the VE one. Same at sigma = 0.
    x_vp = NOISE0
    ref, ref_ts = run_diffusers(sched, torch.from_numpy(x_vp), noises, monkeypatch)
    seen = []
    denoise = make_denoiser(model, jax_net(seen), timestep_mode=mode)
    x_init = jnp.asarray(x_vp) * jnp.sqrt(1 + sigmas[0] ** 2)
    out = sample(name, denoise, x_init, jnp.asarray(sigmas), keys)
    jax.effects_barrier()
    np.testing.assert_allclose(seen, ref_ts, atol=2e-3)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


def _table_sigma(model, t):
    acp = model.alphas_cumprod.astype(np.float64)[np.asarray(t, np.int64)]
    return np.sqrt((1 - acp) / acp)


# diffusers' bh1 predictor computes B(h) * 0 with B(h) = -h = -inf on the step to sigma = 0,
# which is NaN; with its "sigma_min" final sigma it is finite, and so is the comparison.
_BH1_FINAL = {"final_sigmas_type": "sigma_min"}

# (sdjax name, diffusers class, overrides, steps, knobs, step kwargs, final sigma is the table's
#  sigma at t = 0 (set_alpha_to_one = false) rather than 0)
VP_CASES = [
    ("ddim", "DDIMScheduler", {}, 10, {}, {}, True),
    ("ddim", "DDIMScheduler", {}, 10, {"eta": 0.7}, {"eta": 0.7}, True),
    ("ddpm", "DDPMScheduler", {}, 10, {}, {}, False),
    ("plms", "PNDMScheduler", {}, 10, {}, {}, True),
    ("unipc", "UniPCMultistepScheduler", {"solver_type": "bh1", "timestep_spacing": "linspace", **_BH1_FINAL}, 10, {}, {}, False),
    ("unipc_bh2", "UniPCMultistepScheduler", {"timestep_spacing": "linspace"}, 10, {}, {}, False),
    ("unipc_bh2", "UniPCMultistepScheduler", {"solver_order": 3, "timestep_spacing": "linspace"}, 10, {"order": 3}, {}, False),
    ("lcm", "LCMScheduler", {}, 4, {}, {}, False),
]


@pytest.mark.parametrize("name,cls,overrides,steps,knobs,step_kw,alpha_final", VP_CASES,
                         ids=[f"{c[0]}-{c[1]}-{len(c[4])}" for c in VP_CASES])
def test_vp_schedulers_match_diffusers(name, cls, overrides, steps, knobs, step_kw, alpha_final, monkeypatch):
    config = sd15_config(**overrides)
    sched = getattr(diffusers, cls).from_config(config)
    sched.set_timesteps(steps)
    model = DiscreteModel.from_config({k: v for k, v in config.items() if k != "final_sigmas_type"})
    unique_t = torch.unique_consecutive(sched.timesteps).numpy()
    if cls == "UniPCMultistepScheduler":
        ts_ours, sigmas = diffusers_schedule(model, steps, solver="dpmsolver")
        np.testing.assert_array_equal(ts_ours, unique_t)
        np.testing.assert_allclose(sigmas[:-1], sched.sigmas.numpy()[:-1], rtol=5e-5)
        sigmas[-1] = sched.sigmas[-1]  # 0, or the table's smallest sigma for "sigma_min"  # sdjax builds the table in float64, diffusers in float32
    else:
        if cls != "LCMScheduler":  # LCM picks its own timesteps from original_inference_steps
            ours = get_sigmas("ddim_uniform", steps, model)
            np.testing.assert_allclose(ours[:-1], _table_sigma(model, unique_t), rtol=5e-5)  # sdjax builds the table in float64, diffusers in float32
        final = _table_sigma(model, 0) if alpha_final else 0.0
        sigmas = np.append(_table_sigma(model, unique_t), final).astype(np.float32)

    keys, noises = keys_and_noises(steps)
    step = sched.step
    monkeypatch.setattr(sched, "step", lambda *a, **kw: step(*a, **kw, **step_kw))
    ref, ref_ts = run_diffusers(sched, torch.from_numpy(NOISE0), noises, monkeypatch)
    seen = []
    denoise = make_denoiser(model, jax_net(seen))
    x_init = jnp.asarray(NOISE0) * jnp.sqrt(1 + sigmas[0] ** 2)
    out = sample(name, denoise, x_init, jnp.asarray(sigmas), keys, **knobs)
    jax.effects_barrier()
    out = np.asarray(out) / np.sqrt(1 + sigmas[-1] ** 2)  # back to diffusers' VP scaling
    np.testing.assert_allclose(seen, ref_ts, atol=2e-3)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


def test_registry_and_errors():
    assert set(SAMPLERS) >= {
        "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
        "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "ddim", "ddpm",
        "ipndm", "ipndm_v", "plms", "unipc", "unipc_bh2", "lcm",
    }
    den = lambda x, s: x * 0.0  # noqa: E731
    x = jnp.ones((1, 2))
    with pytest.raises(ValueError, match="valid samplers: euler"):
        sample("eulr", den, x, jnp.array([1.0, 0.0]), None)
    with pytest.raises(ValueError, match="knobs are: .*eta"):
        sample("euler_ancestral", den, x, jnp.array([1.0, 0.0]), jax.random.split(jax.random.key(0), 1), etta=1)
    with pytest.raises(ValueError, match="stochastic"):
        sample("euler_ancestral", den, x, jnp.array([1.0, 0.0]), None)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        sample("euler_ancestral", den, x, jnp.array([1.0, 0.0]), jax.random.split(jax.random.key(0), 3))
