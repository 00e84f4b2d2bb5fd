"""CFG++ samplers, RES multistep and gradient estimation (ComfyUI's additions to k-diffusion).

Same signature and conventions as `samplers.py`. The papers:
- CFG++: Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
  Models" (arXiv:2406.08070): the step re-noises along the *unguided* noise estimate, so the
  guided x0 is followed but the sample stays on the data manifold. Each *_cfg_pp sampler reads
  the unguided x0 from the same network call (`sampler_utils.uncond_model`); without guidance
  it equals its base sampler.
- RES: Zhang et al. 2023, "Improved order analysis and design of exponential integrator for
  diffusion models sampling" (arXiv:2308.02157), the 2nd-order multistep method.
- Gradient estimation: Permenter & Yuan 2024, "Interpreting and Improving Diffusion Models from
  an Optimization Perspective" (ICML 2024): Euler with the slope extrapolated by ge_gamma.
In sigma space alpha = 1, so ComfyUI's alpha_t factors are 1 here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.sampling.sampler_utils import (
    ancestral_step,
    emit,
    is_literal_zero,
    log_sigma,
    run,
    sampler_noise,
    setup,
    to_d,
    uncond_model,
)


def _ancestral_cfg_pp(denoise, x_init, sigmas, key, callback, eta, s_noise, noise_type, name):
    x, sigmas, _, dtype = setup(denoise, x_init, sigmas)
    model = uncond_model(denoise, dtype)
    stochastic = not is_literal_zero(eta)
    noise = None
    if stochastic:
        noise = sampler_noise(key, x, sigmas, noise_type, name)

    def step(x, inp):
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0, x0_uncond = model(x, sigma)
        emit(callback, i, x, x0, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        # Step to sigma_down along the unguided noise, from the guided x0.
        x_new = x0 + sigma_down * to_d(x, sigma, x0_uncond)
        if noise is not None:
            x_new = x_new + noise(i, sigma, sigma_next) * s_noise * sigma_up
        return jnp.where(sigma_next == 0, x0, x_new)

    return run(step, x, sigmas).astype(x_init.dtype)


def sample_euler_ancestral_cfg_pp(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0,
                                  s_noise=1.0, noise_type="gaussian"):
    """Euler ancestral with CFG++ (ComfyUI's sample_euler_ancestral_cfg_pp)."""
    return _ancestral_cfg_pp(denoise, x_init, sigmas, key, callback, eta, s_noise, noise_type,
                             "euler_ancestral_cfg_pp")


def sample_euler_cfg_pp(denoise, x_init, sigmas, key=None, *, callback=None):
    """Euler with CFG++: x_next = x0_guided + sigma_next * (x - x0_uncond) / sigma."""
    return _ancestral_cfg_pp(denoise, x_init, sigmas, None, callback, 0.0, 0.0, "gaussian", "euler_cfg_pp")


def sample_dpmpp_2s_ancestral_cfg_pp(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0,
                                     s_noise=1.0, noise_type="gaussian"):
    """DPM-Solver++(2S) ancestral with CFG++: both sub-steps use the unguided x0, and the guidance
    vector (guided - unguided x0 at the step's start) is added after the step."""
    x, sigmas, _, dtype = setup(denoise, x_init, sigmas)
    model = uncond_model(denoise, dtype)
    noise = sampler_noise(key, x, sigmas, noise_type, "dpmpp_2s_ancestral_cfg_pp")

    def step(x, inp):
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0, x0_uncond = model(x, sigma)
        emit(callback, i, x, x0, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)

        def two_stage():
            h = log_sigma(sigma) - log_sigma(sigma_down)
            sigma_s = sigma * jnp.exp(-h / 2)
            x_2 = (sigma_s / sigma) * x - jnp.expm1(-h / 2) * x0_uncond
            x0_uncond_2 = model(x_2, sigma_s)[1]
            return (sigma_down / sigma) * x - jnp.expm1(-h) * x0_uncond_2

        x_new = jax.lax.cond(sigma_down == 0, lambda: x0_uncond, two_stage)
        x_new = x_new + jnp.where(sigma_next > 0, noise(i, sigma, sigma_next) * s_noise * sigma_up, 0.0)
        return x_new + (x0 - x0_uncond)

    return run(step, x, sigmas).astype(x_init.dtype)


def sample_dpmpp_2m_cfg_pp(denoise, x_init, sigmas, key=None, *, callback=None):
    """DPM-Solver++(2M) with CFG++ (ComfyUI's sample_dpmpp_2m_cfg_pp)."""
    x, sigmas, _, dtype = setup(denoise, x_init, sigmas)
    model = uncond_model(denoise, dtype)

    def step(carry, inp):
        x, old_uncond = carry
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0, x0_uncond = model(x, sigma)
        emit(callback, i, x, x0, sigma)
        h = log_sigma(sigma) - log_sigma(sigma_next)
        r = (log_sigma(inp["sigma_prev"]) - log_sigma(sigma)) / h
        mix = -jnp.exp(-h) * x0_uncond
        second = mix - jnp.expm1(-h) * (1 / (2 * jnp.where(i > 0, r, 1.0))) * (x0 - old_uncond)
        x_new = x0 + jnp.where(i > 0, second, mix) + jnp.exp(-h) * x
        return jnp.where(sigma_next == 0, x0, x_new), x0_uncond

    return run(step, (x, jnp.zeros_like(x)), sigmas)[0].astype(x_init.dtype)


def _phi1(t):
    return jnp.expm1(t) / t


def _phi2(t):
    return (_phi1(t) - 1.0) / t


def _res_multistep(denoise, x_init, sigmas, key, callback, eta, s_noise, noise_type, cfg_pp, name):
    """ComfyUI's res_multistep: RES 2nd-order multistep in t = -log(sigma), ancestral with eta."""
    x, sigmas, _, dtype = setup(denoise, x_init, sigmas)
    model = uncond_model(denoise, dtype)
    stochastic = not is_literal_zero(eta)
    noise = None
    if stochastic:
        noise = sampler_noise(key, x, sigmas, noise_type, name)

    def step(carry, inp):
        x, old_x0, old_sigma_down = carry
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0, x0_uncond = model(x, sigma)
        emit(callback, i, x, x0, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        first = (sigma_down == 0) | (i == 0)
        if cfg_pp:
            x_euler = x0 + to_d(x, sigma, x0_uncond) * sigma_down
        else:
            x_euler = x + to_d(x, sigma, x0) * (sigma_down - sigma)
        t, t_old = -log_sigma(sigma), -log_sigma(old_sigma_down)
        t_next, t_prev = -log_sigma(sigma_down), -log_sigma(inp["sigma_prev"])
        h = t_next - t
        h_safe = jnp.where(first, 1.0, h)
        c2 = (t_prev - t_old) / h_safe
        c2 = jnp.where(first | (c2 == 0), 1.0, c2)
        phi1, phi2 = _phi1(-h_safe), _phi2(-h_safe)
        b1, b2 = phi1 - phi2 / c2, phi2 / c2
        if cfg_pp:
            x_ms = jnp.exp(-h_safe) * (x + x0 - x0_uncond) + h_safe * (b1 * x0_uncond + b2 * old_x0)
        else:
            x_ms = jnp.exp(-h_safe) * x + h_safe * (b1 * x0 + b2 * old_x0)
        x_new = jnp.where(first, x_euler, x_ms)
        if noise is not None:
            x_new = x_new + jnp.where(sigma_next > 0, noise(i, sigma, sigma_next) * s_noise * sigma_up, 0.0)
        return x_new, (x0_uncond if cfg_pp else x0), sigma_down

    carry = (x, jnp.zeros_like(x), sigmas[0])
    return run(step, carry, sigmas)[0].astype(x_init.dtype)


def sample_res_multistep(denoise, x_init, sigmas, key=None, *, callback=None):
    """RES 2nd-order multistep (deterministic); Euler for the first step and the step to 0."""
    return _res_multistep(denoise, x_init, sigmas, None, callback, 0.0, 1.0, "gaussian", False, "res_multistep")


def sample_res_multistep_cfg_pp(denoise, x_init, sigmas, key=None, *, callback=None):
    """RES multistep with CFG++."""
    return _res_multistep(denoise, x_init, sigmas, None, callback, 0.0, 1.0, "gaussian", True,
                          "res_multistep_cfg_pp")


def sample_res_multistep_ancestral(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0,
                                   s_noise=1.0, noise_type="gaussian"):
    """RES multistep to sigma_down, then fresh noise of std sigma_up (ancestral, eta)."""
    return _res_multistep(denoise, x_init, sigmas, key, callback, eta, s_noise, noise_type, False,
                          "res_multistep_ancestral")


def sample_res_multistep_ancestral_cfg_pp(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0,
                                          s_noise=1.0, noise_type="gaussian"):
    """RES multistep ancestral with CFG++."""
    return _res_multistep(denoise, x_init, sigmas, key, callback, eta, s_noise, noise_type, True,
                          "res_multistep_ancestral_cfg_pp")


def _gradient_estimation(denoise, x_init, sigmas, callback, ge_gamma, cfg_pp):
    x, sigmas, _, dtype = setup(denoise, x_init, sigmas)
    model = uncond_model(denoise, dtype)

    def step(carry, inp):
        x, old_d = carry
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0, x0_uncond = model(x, sigma)
        emit(callback, i, x, x0, sigma)
        d = to_d(x, sigma, x0_uncond if cfg_pp else x0)
        dt = sigma_next - sigma
        x_new = x0 + d * sigma_next if cfg_pp else x + d * dt
        x_new = x_new + jnp.where(i >= 1, (ge_gamma - 1) * (d - old_d) * dt, 0.0)
        return jnp.where(sigma_next == 0, x0, x_new), d

    return run(step, (x, jnp.zeros_like(x)), sigmas)[0].astype(x_init.dtype)


def sample_gradient_estimation(denoise, x_init, sigmas, key=None, *, callback=None, ge_gamma=2.0):
    """Gradient estimation (Permenter & Yuan 2024): Euler with the slope d + (ge_gamma - 1)(d - d_prev)."""
    return _gradient_estimation(denoise, x_init, sigmas, callback, ge_gamma, False)


def sample_gradient_estimation_cfg_pp(denoise, x_init, sigmas, key=None, *, callback=None, ge_gamma=2.0):
    """Gradient estimation with CFG++."""
    return _gradient_estimation(denoise, x_init, sigmas, callback, ge_gamma, True)
