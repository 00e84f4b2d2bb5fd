"""Samplers over a denoiser D(x, sigma) -> x0_pred, each one `step` scanned with lax.scan.

The math follows k-diffusion's `sampling.py` (K. Crowson) and ComfyUI's copy of it, after
Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models";
Lu et al. 2022, "DPM-Solver++"; Zhao et al. 2023, "UniPC"; Liu et al. 2022, "PNDM";
Song et al. 2021, "DDIM"; Ho et al. 2020, "DDPM"; Luo et al. 2023, "LCM". The other families
live in samplers_multistep.py (LMS, DPM++ 2M/3M, PLMS, iPNDM, DEIS, UniPC), samplers_cfgpp.py
(CFG++, RES multistep, gradient estimation), samplers_sde.py (ER-SDE, SEEDS, SA-Solver) and
samplers_adaptive.py (DPM-Solver fast / adaptive).

Every sampler has the signature
    fn(denoise, x_init, sigmas, key=None, *, callback=None, **knobs) -> x
- `x_init` (B, ...): the sample at sigmas[0], already scaled (x = x0 + sigma * eps).
- `sigmas` (steps + 1,): decreasing noise levels, normally ending in 0; its values are
  traced (a new schedule of the same length does not recompile). The result is the sample
  at sigmas[-1] in the same scaling, so it is the clean sample when sigmas[-1] == 0.
- `key`: typed key array (B,), one per image; image b's noise at step i comes from
  fold_in(key[b], i) (see `step_noise`), so an image never depends on its batch. Only the
  stochastic samplers need it.
- numeric knobs (eta, s_noise, s_churn, ...) may be traced; knobs that pick code paths
  (solver_type, order) are static Python values. `noise_type` ("gaussian" or "brownian", or a
  traced 0/1) picks the SDE noise of the stochastic samplers (`sampler_utils.make_noise`).
- `callback(i, x, x0_pred, sigma)`: optional host callback, called once per step.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp

from sdjax.sampling import samplers_adaptive as adaptive
from sdjax.sampling import samplers_cfgpp as cfgpp
from sdjax.sampling import samplers_multistep as ms
from sdjax.sampling import samplers_sde as sde
from sdjax.sampling.sampler_utils import (
    active_steps,
    from_step,
    ancestral_step,
    as_keys,
    emit,
    is_literal_zero,
    log_sigma,
    make_noise,
    require_keys,
    run,
    setup,
    step_noise,
    to_d,
)

_GAMMA_MAX = math.sqrt(2.0) - 1.0


def _churn(x, i, sigma, n, keys, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. Algorithm 2 "churn": raise sigma to sigma_hat by adding fresh noise."""
    if keys is None:
        return x, sigma
    gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax),
                      jnp.minimum(s_churn / jnp.asarray(n, sigma.dtype), _GAMMA_MAX), 0.0)
    sigma_hat = sigma * (gamma + 1.0)
    eps = step_noise(keys, i, x.shape[1:], x.dtype) * s_noise
    return x + eps * jnp.sqrt(jnp.maximum(sigma_hat**2 - sigma**2, 0.0)), sigma_hat


def _churn_keys(key, x, s_churn, name):
    # Churn needs noise; with the default s_churn=0 a deterministic sampler needs no key.
    if is_literal_zero(s_churn):
        return None
    return require_keys(as_keys(key, x.shape[0]), name + " with s_churn")


def _churned(name: str, second_order, doc: str):
    """A Karras et al. Algorithm 2 sampler: optional churn, one evaluation, then an Euler step
    (`second_order` None), or `second_order(model, x, d, sigma_hat, sigma_next)` with an Euler
    step for the last step to 0."""

    def sampler(denoise, x_init, sigmas, key=None, *, callback=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
        x, sigmas, model, _ = setup(denoise, x_init, sigmas)
        keys = _churn_keys(key, x, s_churn, name)
        n = active_steps(sigmas)

        def step(x, inp):
            i, sigma_next = inp["i"], inp["sigma_next"]
            x, sigma_hat = _churn(x, i, inp["sigma"], n, keys, s_churn, s_tmin, s_tmax, s_noise)
            x0_pred = model(x, sigma_hat)
            emit(callback, i, x, x0_pred, sigma_hat)
            d = to_d(x, sigma_hat, x0_pred)
            if second_order is None:
                return x + d * (sigma_next - sigma_hat)
            # A real conditional: the last step to sigma = 0 costs one evaluation, not two.
            return jax.lax.cond(sigma_next == 0, lambda: x + d * (sigma_next - sigma_hat),
                                lambda: second_order(model, x, d, sigma_hat, sigma_next))

        return run(step, x, sigmas).astype(x_init.dtype)

    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__doc__ = doc
    return sampler


sample_euler = _churned(
    "euler", None, "Euler steps of the probability-flow ODE (Karras et al. Algorithm 2 with Euler steps).")


def sample_euler_ancestral(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0, s_noise=1.0,
                           noise_type="gaussian"):
    """Ancestral sampling with Euler steps: to sigma_down, then fresh noise of std sigma_up."""
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    keys = require_keys(as_keys(key, x.shape[0]), "euler_ancestral")
    noise_at = make_noise(keys, sigmas, x.shape[1:], x.dtype, noise_type)

    def step(x, inp):
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0_pred = model(x, sigma)
        emit(callback, i, x, x0_pred, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, x0_pred) * (sigma_down - sigma)
        noise = noise_at(i, sigma, sigma_next)
        return x + jnp.where(sigma_next > 0, noise * s_noise * sigma_up, 0.0)

    return run(step, x, sigmas).astype(x_init.dtype)


def sample_ddim(denoise, x_init, sigmas, key=None, *, callback=None, eta=0.0, s_noise=1.0):
    """DDIM (Song et al. 2021) in sigma space.

    With x = x_vp / sqrt(alpha_bar) and sigma^2 = (1 - alpha_bar) / alpha_bar, DDIM's update
    is exactly the ancestral Euler step with the same eta (its sigma_t^2 / alpha_bar_prev is
    sigma_up^2 below), and eta = 0 is the plain Euler step. A key is needed only for eta != 0.
    """
    if is_literal_zero(eta) and key is None:
        return sample_euler(denoise, x_init, sigmas, callback=callback)
    return sample_euler_ancestral(denoise, x_init, sigmas, key, callback=callback, eta=eta, s_noise=s_noise)


def sample_ddpm(denoise, x_init, sigmas, key=None, *, callback=None, s_noise=1.0):
    """DDPM ancestral sampling (Ho et al. 2020), posterior variance "fixed_small".

    The DDPM posterior q(x_prev | x_t, x0_pred) between any two noise levels is the eta = 1
    ancestral step in sigma space (DDIM's eta = 1 case), so this is that step.
    """
    return sample_euler_ancestral(denoise, x_init, sigmas, key, callback=callback, eta=1.0, s_noise=s_noise)


def _heun(model, x, d, sigma, sigma_to):
    dt = sigma_to - sigma
    x_euler = x + d * dt
    safe_to = jnp.where(sigma_to > 0, sigma_to, 1.0)  # the branch is traced for sigma_to = 0 too
    d_2 = to_d(x_euler, safe_to, model(x_euler, sigma_to))
    return x + (d + d_2) / 2 * dt


def _midpoint(model, x, d, sigma, sigma_to):
    sigma_mid = jnp.exp((log_sigma(sigma) + log_sigma(sigma_to)) / 2)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
    return x + d_2 * (sigma_to - sigma)


sample_heun = _churned(
    "heun", _heun, "Heun's 2nd-order method (Karras et al. Algorithm 2); Euler for the last step to 0.")
sample_dpm_2 = _churned(
    "dpm_2", _midpoint, "DPM-Solver-2 style midpoint steps; midpoint = geometric mean of sigma_hat, sigma_next.")


def sample_heunpp2(denoise, x_init, sigmas, key=None, *, callback=None,
                   s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun++ (ComfyUI's sample_heunpp2, from Carzit/sd-webui-samplers-scheduler): Heun with a
    third evaluation at sigma_{i+2}, the slopes weighted by sigma_{i+1} / (3 sigma_0) and
    sigma_{i+2} / (3 sigma_0); Heun with weight sigma_{i+1} / (2 sigma_0) for the second-last
    step, Euler for the last. Up to 3 evaluations per step; the weights make it 1st order."""
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    keys = _churn_keys(key, x, s_churn, "heunpp2")
    n = active_steps(sigmas)
    s_end, last = sigmas[-1], sigmas.shape[0] - 1

    def step(x, inp):
        i, sigma_next = inp["i"], inp["sigma_next"]
        x, sigma_hat = _churn(x, i, inp["sigma"], n, keys, s_churn, s_tmin, s_tmax, s_noise)
        x0_pred = model(x, sigma_hat)
        emit(callback, i, x, x0_pred, sigma_hat)
        d = to_d(x, sigma_hat, x0_pred)
        dt = sigma_next - sigma_hat
        sigma_2 = sigmas[jnp.minimum(i + 2, last)]

        def heun():
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next))
            w2 = sigma_next / (2 * sigmas[0])
            return x + (d * (1 - w2) + d_2 * w2) * dt

        def heunpp():
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next))
            x_3 = x_2 + d_2 * (sigma_2 - sigma_next)
            d_3 = to_d(x_3, sigma_2, model(x_3, sigma_2))
            w2, w3 = sigma_next / (3 * sigmas[0]), sigma_2 / (3 * sigmas[0])
            return x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt

        branch = jnp.where(sigma_next == s_end, 0, jnp.where(sigma_2 == s_end, 1, 2))
        return jax.lax.switch(branch, [lambda: x + d * dt, heun, heunpp])

    return run(step, x, sigmas).astype(x_init.dtype)


def sample_dpm_2_ancestral(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0, s_noise=1.0,
                           noise_type="gaussian"):
    """Ancestral sampling with DPM-Solver-2 midpoint steps to sigma_down."""
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    keys = require_keys(as_keys(key, x.shape[0]), "dpm_2_ancestral")
    noise_at = make_noise(keys, sigmas, x.shape[1:], x.dtype, noise_type)

    def step(x, inp):
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0_pred = model(x, sigma)
        emit(callback, i, x, x0_pred, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, x0_pred)
        noise = noise_at(i, sigma, sigma_next)
        return jax.lax.cond(
            sigma_down == 0,
            lambda: x + d * (sigma_down - sigma),
            lambda: _midpoint(model, x, d, sigma, sigma_down) + noise * s_noise * sigma_up,
        )

    return run(step, x, sigmas).astype(x_init.dtype)


def sample_dpmpp_2s_ancestral(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0, s_noise=1.0,
                              noise_type="gaussian"):
    """Ancestral sampling with DPM-Solver++(2S) second-order single steps."""
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    keys = require_keys(as_keys(key, x.shape[0]), "dpmpp_2s_ancestral")
    noise_at = make_noise(keys, sigmas, x.shape[1:], x.dtype, noise_type)

    def step(x, inp):
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0_pred = model(x, sigma)
        emit(callback, i, x, x0_pred, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)

        def dpmpp_2s():
            # t = -log(sigma); half a step in t, then the full step with the midpoint x0.
            h = log_sigma(sigma) - log_sigma(sigma_down)
            sigma_s = sigma * jnp.exp(-h / 2)
            x_2 = (sigma_s / sigma) * x - jnp.expm1(-h / 2) * x0_pred
            x0_2 = model(x_2, sigma_s)
            return (sigma_down / sigma) * x - jnp.expm1(-h) * x0_2

        x = jax.lax.cond(
            sigma_down == 0, lambda: x + to_d(x, sigma, x0_pred) * (sigma_down - sigma), dpmpp_2s
        )
        noise = noise_at(i, sigma, sigma_next)
        return x + jnp.where(sigma_next > 0, noise * s_noise * sigma_up, 0.0)

    return run(step, x, sigmas).astype(x_init.dtype)


def sample_dpmpp_sde(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0, s_noise=1.0, r=0.5,
                     noise_type="gaussian"):
    """DPM-Solver++ (stochastic, 2 evaluations per step), k-diffusion's `sample_dpmpp_sde`.

    k-diffusion draws the two sub-step noises from a torchsde Brownian tree over sigma. Here
    they come from two independent normals per step (z1, z2) combined into Brownian
    increments: the first sub-step uses z1 over [sigma, sigma_s], the full step uses the
    increment over [sigma, sigma_next], which contains that first one. That is the joint law
    of a Brownian tree's answers (increments over disjoint steps are independent), so the
    sampler is the same in distribution, but not the same numbers for a given seed.
    noise_type="brownian" draws z1, z2 as the normalised increments of one Brownian path per image
    over [sigma_s, sigma] and [sigma_next, sigma_s] (`make_noise`); the same combination then
    gives that path's increment over the whole step.
    """
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    keys = require_keys(as_keys(key, x.shape[0]), "dpmpp_sde")
    noise_at = make_noise(keys, sigmas, x.shape[1:], x.dtype, noise_type)

    def step(x, inp):
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0_pred = model(x, sigma)
        emit(callback, i, x, x0_pred, sigma)
        sigma_s = jnp.exp(log_sigma(sigma) + r * (log_sigma(sigma_next) - log_sigma(sigma)))
        z1 = noise_at(i, sigma, sigma_s, 0)
        z2 = noise_at(i, sigma_s, sigma_next, 1)

        def sde():
            t, t_next = -log_sigma(sigma), -log_sigma(sigma_next)
            h = t_next - t
            sigma_s = jnp.exp(-(t + h * r))
            fac = 1 / (2 * r)
            # Step 1: to sigma_s, ancestral with eta.
            sd, su = ancestral_step(sigma, sigma_s, eta)
            x_2 = (sd / sigma) * x - jnp.expm1(log_sigma(sd) - log_sigma(sigma)) * x0_pred
            x_2 = jnp.where(sd > 0, x_2, x0_pred) + z1 * s_noise * su
            x0_2 = model(x_2, sigma_s)
            # Step 2: the full step with the blended x0, noise = Brownian increment over it.
            sd, su = ancestral_step(sigma, sigma_next, eta)
            x0_d = (1 - fac) * x0_pred + fac * x0_2
            x_new = (sd / sigma) * x - jnp.expm1(log_sigma(sd) - log_sigma(sigma)) * x0_d
            x_new = jnp.where(sd > 0, x_new, x0_d)
            w1, w2 = sigma - sigma_s, sigma_s - sigma_next
            z12 = (jnp.sqrt(w1) * z1 + jnp.sqrt(w2) * z2) / jnp.sqrt(w1 + w2)
            return x_new + z12 * s_noise * su

        return jax.lax.cond(sigma_next == 0, lambda: x + to_d(x, sigma, x0_pred) * (0 - sigma), sde)

    return run(step, x, sigmas).astype(x_init.dtype)


def sample_lcm(denoise, x_init, sigmas, key=None, *, callback=None):
    """Latent Consistency Model sampling: jump to x0_pred, re-noise to sigma_next.

    LCM's boundary scalings (c_skip, c_out) belong to the denoiser; for SD timesteps they
    differ from (0, 1) by < 1e-6 and diffusers' LCMScheduler applies them to x0_pred.
    """
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    keys = require_keys(as_keys(key, x.shape[0]), "lcm")

    def step(x, inp):
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0_pred = model(x, sigma)
        emit(callback, i, x, x0_pred, sigma)
        noise = step_noise(keys, i, x.shape[1:], x.dtype)
        return x0_pred + jnp.where(sigma_next > 0, sigma_next * noise, 0.0)

    return run(step, x, sigmas).astype(x_init.dtype)


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": ms.sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": ms.sample_dpmpp_2m,
    "dpmpp_2m_sde": ms.sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": functools.partial(ms.sample_dpmpp_2m_sde, solver_type="heun"),
    "dpmpp_3m_sde": ms.sample_dpmpp_3m_sde,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "plms": ms.sample_plms,
    "ipndm": ms.sample_ipndm,
    "ipndm_v": ms.sample_ipndm_v,
    "unipc": ms.sample_unipc,
    "unipc_bh2": functools.partial(ms.sample_unipc, solver_type="bh2"),
    "lcm": sample_lcm,
    "heunpp2": sample_heunpp2,
    "deis": ms.sample_deis,
    "dpm_fast": adaptive.sample_dpm_fast,
    "dpm_adaptive": adaptive.sample_dpm_adaptive,
    "euler_cfg_pp": cfgpp.sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": cfgpp.sample_euler_ancestral_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": cfgpp.sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": cfgpp.sample_dpmpp_2m_cfg_pp,
    "res_multistep": cfgpp.sample_res_multistep,
    "res_multistep_cfg_pp": cfgpp.sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": cfgpp.sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": cfgpp.sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation": cfgpp.sample_gradient_estimation,
    "gradient_estimation_cfg_pp": cfgpp.sample_gradient_estimation_cfg_pp,
    "er_sde": sde.sample_er_sde,
    "seeds_2": sde.sample_seeds_2,
    "seeds_3": sde.sample_seeds_3,
    "sa_solver": sde.sample_sa_solver,
    "sa_solver_pece": sde.sample_sa_solver_pece,
}

# Fixed-step samplers that use no noise with their default knobs (ODE solvers); the rest need
# `key`, except dpm_adaptive, an ODE solver that picks its own steps.
DETERMINISTIC_SAMPLERS = (
    "euler", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "plms", "ipndm", "ipndm_v", "unipc",
    "unipc_bh2", "heunpp2", "deis", "dpm_fast", "euler_cfg_pp", "dpmpp_2m_cfg_pp",
    "res_multistep", "res_multistep_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp",
)


def sample(name: str, denoise, x_init, sigmas, key=None, *, start=None, callback=None, **knobs):
    """Runs sampler `name` from x_init at sigmas[0] down to sigmas[-1]; returns x (B, ...).

    denoise(x, sigma) -> x0_pred with x (B, ...) and sigma a 0-d float array; x_init (B, ...)
    already scaled to sigmas[0] (x = x0 + sigma * eps); sigmas (steps + 1,) decreasing,
    normally ending in 0; key a typed key array (B,) (None is fine for deterministic
    samplers); callback(i, x, x0_pred, sigma) an optional host callback; knobs are the
    sampler's keyword arguments (eta, s_noise, s_churn, s_tmin, s_tmax, r, order, ...).
    `dpm_fast` and `dpm_adaptive` use only the schedule's ends and return the sample at its last
    positive sigma (as ComfyUI). `start` (int, may be traced, 0 <= start < steps): begin at sigmas[start] -- the result
    equals running on sigmas[start:], at the shape of the full schedule, so a changed start
    (img2img strength) does not recompile. x_init must then be at sigmas[start].
    Unknown names or knobs raise ValueError listing the valid ones.
    """
    try:
        fn = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}") from None
    params = inspect.signature(fn).parameters
    valid = [p for p in params if p not in ("denoise", "x_init", "sigmas", "key", "callback")]
    bad = sorted(set(knobs) - set(valid))
    if bad:
        raise ValueError(f"sampler {name!r} has no knob(s) {bad}; its knobs are: {', '.join(valid) or 'none'}")
    if start is not None:
        sigmas = from_step(jnp.asarray(sigmas), start)
    return fn(denoise, x_init, sigmas, key, callback=callback, **knobs)
