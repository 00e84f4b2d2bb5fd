"""Denoiser wrappers and guidance: exact x0 for exact predictions, parity with diffusers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference

from sdjax.sampling import (
    DiscreteModel,
    cfg,
    diffusers_schedule,
    make_denoiser,
    prediction_from_x0,
    rescale_cfg,
    x0_from_prediction,
)


def model_for(prediction_type):
    return DiscreteModel(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type, steps_offset=1)


def noisy_batch(key, sigma):
    k0, k1 = jax.random.split(key)
    x0 = jax.random.normal(k0, (3, 4, 5, 4))  # NHWC
    eps = jax.random.normal(k1, x0.shape)
    return x0, eps, x0 + sigma.reshape(-1, 1, 1, 1) * eps


def exact_network(prediction_type, x0, eps, sigma, seen):
    """A network that returns the exact eps / v / x0 for the noisy batch it is given."""
    s = sigma.reshape(-1, 1, 1, 1)
    alpha, sigma_vp = 1 / jnp.sqrt(s**2 + 1), s / jnp.sqrt(s**2 + 1)

    def network(x_scaled, t):
        seen["x_scaled"], seen["t"] = x_scaled, t
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            return alpha * eps - sigma_vp * x0  # v of the VP-scaled input alpha x0 + sigma_vp eps
        return x0

    return network


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_exact_prediction_gives_exact_x0(key, prediction_type):
    model = model_for(prediction_type)
    sigma = jnp.array([0.05, 1.3, 14.0])
    x0, eps, x = noisy_batch(key, sigma)
    seen = {}
    denoise = make_denoiser(model, exact_network(prediction_type, x0, eps, sigma, seen))
    np.testing.assert_allclose(jax.jit(denoise)(x, sigma), x0, atol=3e-5 * 15)
    denoise(x, sigma)  # eagerly, to look at what the network was given
    np.testing.assert_allclose(seen["x_scaled"], x / jnp.sqrt(sigma**2 + 1).reshape(-1, 1, 1, 1), rtol=1e-6)
    np.testing.assert_allclose(seen["t"], model.sigma_to_t(sigma), rtol=1e-6)
    assert seen["t"].shape == (3,) and seen["t"].dtype == jnp.float32


def test_scalar_sigma_broadcasts_and_extra_args_pass_through(key):
    model = model_for("epsilon")
    x0, eps, x = noisy_batch(key, jnp.full((3,), 2.0))

    def network(x_scaled, t, context, scale):
        assert t.shape == (3,)
        return eps * scale + 0 * context.sum()

    x0_pred = make_denoiser(model, network)(x, 2.0, jnp.ones((3, 7, 8)), 1.0)
    np.testing.assert_allclose(x0_pred, x0, atol=1e-5)


def test_timestep_modes(key):
    model = model_for("epsilon")
    sigma = model.t_to_sigma(jnp.array([10.4, 500.6, 998.7]))
    _, eps, x = noisy_batch(key, sigma)
    seen = {}
    for mode, expected in (("continuous", [10.4, 500.6, 998.7]), ("nearest", [10, 501, 999]), ("round", [10, 501, 999])):
        make_denoiser(model, exact_network("epsilon", x, eps, sigma, seen), timestep_mode=mode)(x, sigma)
        np.testing.assert_allclose(seen["t"], expected, atol=2e-3)
    with pytest.raises(ValueError, match="timestep_mode"):
        make_denoiser(model, lambda x, t: x, timestep_mode="floor")


def test_bf16_input_keeps_its_dtype(key):
    model = model_for("v_prediction")
    x = jax.random.normal(key, (2, 4, 4, 4), jnp.bfloat16)
    out = make_denoiser(model, lambda x_scaled, t: x_scaled)(x, jnp.array([1.0, 3.0]))
    assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_from_x0_inverts(key, prediction_type):
    sigma = jnp.array([0.1, 2.0, 9.0])
    _, raw, x = noisy_batch(key, sigma)
    x0 = x0_from_prediction(prediction_type, x, sigma, raw)
    np.testing.assert_allclose(prediction_from_x0(prediction_type, x, sigma, x0), raw, atol=1e-4)


def test_cfg_is_linear_with_a_traced_scale(key):
    cond, uncond = jax.random.normal(key, (2, 3, 4, 4, 4))
    np.testing.assert_allclose(cfg(cond, uncond, 1.0), cond, atol=1e-6)
    np.testing.assert_allclose(cfg(cond, uncond, 0.0), uncond, atol=1e-6)
    guided = jax.jit(cfg)(cond, uncond, jnp.float32(7.5))
    np.testing.assert_allclose(guided, uncond + 7.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
    per_image = jax.jit(cfg)(cond, uncond, jnp.array([1.0, 0.0, 2.0]).reshape(3, 1, 1, 1))
    np.testing.assert_allclose(per_image[1], uncond[1], atol=1e-6)


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_rescale_cfg_matches_diffusers(key, phi):
    torch = pytest.importorskip("torch")
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    cond, uncond = jax.random.normal(key, (2, 2, 8, 8, 4))
    cond = cond * jnp.array([1.0, 3.0]).reshape(2, 1, 1, 1)
    guided = cfg(cond, uncond, 7.0)
    ours = jax.jit(rescale_cfg)(guided, cond, jnp.float32(phi))
    # diffusers works on NCHW tensors; per-image std does not care about the layout.
    to_torch = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())
    ref = rescale_noise_cfg(to_torch(guided), to_torch(cond), guidance_rescale=phi).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    if phi == 1.0:
        np.testing.assert_allclose(ours.std(axis=(1, 2, 3)), cond.std(axis=(1, 2, 3)), rtol=1e-4)


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_euler_through_the_denoiser_matches_diffusers_euler(name):
    """The wrapper plus diffusers_schedule reproduce EulerDiscreteScheduler step for step,
    with a fixed nonlinear 'network' standing in for the UNet (eps for sd15, v for sd21)."""
    torch = pytest.importorskip("torch")
    import diffusers

    config = json.loads((reference(name) / "scheduler" / "scheduler_config.json").read_text())
    # Spelled out: these configs lack it, and Euler's class default (linspace) differs from the
    # checkpoints' own PNDM/DDIM default (leading), which DiscreteModel follows.
    config["timestep_spacing"] = "leading"
    model = DiscreteModel.from_config(config)
    ref = diffusers.EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(8)
    _, sigmas = diffusers_schedule(model, 8)

    def network_np(x_scaled, t):
        return np.tanh(x_scaled) * 0.8 + np.sin(t / 150.0).reshape(-1, 1, 1, 1)

    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32) * float(sigmas[0])
    denoise = jax.jit(make_denoiser(model, lambda xs, t: jnp.tanh(xs) * 0.8 + jnp.sin(t / 150.0).reshape(-1, 1, 1, 1)))
    x_ref = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    x_ours = jnp.asarray(x)
    for i, t in enumerate(ref.timesteps):
        scaled = ref.scale_model_input(x_ref, t).numpy().transpose(0, 2, 3, 1)
        out = network_np(scaled, np.full((2,), float(t), np.float32))
        x_ref = ref.step(torch.from_numpy(out.transpose(0, 3, 1, 2).copy()), t, x_ref).prev_sample
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x_ours, jnp.full((2,), sigma))
        x_ours = x_ours + (x_ours - x0) / sigma * (sigma_next - sigma)  # Karras eq. (3) Euler step
    np.testing.assert_allclose(np.asarray(x_ours), x_ref.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
