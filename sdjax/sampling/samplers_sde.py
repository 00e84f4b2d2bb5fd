"""Stochastic exponential-integrator samplers: ER-SDE, SEEDS-2/3, SA-Solver.

Same signature and conventions as `samplers.py`; lambda = -log(sigma) is the half log-SNR
(alpha = 1 in sigma space). Noise comes from `sampler_utils.make_noise` (noise_type
"gaussian" or "brownian", traced). The papers:
- ER-SDE: Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDE for
  diffusion models" (arXiv:2309.06169), VP ER-SDE-Solver-3 as ComfyUI's sample_er_sde.
- SEEDS: Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling
  from Diffusion Models" (arXiv:2305.14267), data prediction, stages 2 and 3.
- SA-Solver: Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of
  Diffusion Models" (arXiv:2309.05019), eqs. 15 and 18, predictor-corrector (and PECE).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sdjax.sampling.sampler_utils import (
    active_steps,
    emit,
    is_literal_zero,
    log_sigma,
    run,
    sampler_noise,
    setup,
)
from sdjax.sampling.samplers_multistep import _select


def _noise_for(key, x, sigmas, noise_type, name, off):
    if off:
        return lambda *a, **k: jnp.zeros_like(x)
    return sampler_noise(key, x, sigmas, noise_type, name)


def _er_noise_scaler(s):
    # ER-SDE's default noise scaler (its paper's "ER SDE 5" choice, ComfyUI's default).
    return s * (jnp.exp(s**0.3) + 10.0)


def sample_er_sde(denoise, x_init, sigmas, key=None, *, callback=None, s_noise=1.0,
                  noise_type="gaussian", max_stage: int = 3):
    """ER-SDE-Solver-3 (Cui et al. 2023): stages 1..max_stage (static), the integrals of the
    noise scaler by a 200-point Riemann sum as the reference code; the step to 0 returns x0."""
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    noise = _noise_for(key, x, sigmas, noise_type, "er_sde", is_literal_zero(s_noise))
    points = jnp.arange(200, dtype=x.dtype)

    def step(carry, inp):
        x, old_x0, old_x0_d = carry
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0 = model(x, sigma)
        emit(callback, i, x, x0, sigma)
        stage = jnp.minimum(max_stage, i + 1)
        safe_next = jnp.where(sigma_next > 0, sigma_next, 1.0)
        r = _er_noise_scaler(safe_next) / _er_noise_scaler(sigma)
        x_new = r * x + (1 - r) * x0
        dt = safe_next - sigma
        step_size = -dt / 200.0
        pos = safe_next + points * step_size
        scaled = _er_noise_scaler(pos)
        s = jnp.sum(1 / scaled) * step_size
        x0_d = (x0 - old_x0) / (sigma - inp["sigma_prev"])
        x0_d = jnp.where(i >= 1, x0_d, 0.0)
        x_new = x_new + jnp.where(stage >= 2, (dt + s * _er_noise_scaler(safe_next)) * x0_d, 0.0)
        s_u = jnp.sum((pos - sigma) / scaled) * step_size
        x0_u = (x0_d - old_x0_d) / ((sigma - inp["sigma_prev2"]) / 2)
        x_new = x_new + jnp.where(stage >= 3, (dt**2 / 2 + s_u * _er_noise_scaler(safe_next)) * x0_u, 0.0)
        amp = jnp.sqrt(jnp.maximum(safe_next**2 - sigma**2 * r**2, 0.0))
        x_new = x_new + noise(i, sigma, sigma_next) * s_noise * amp
        return jnp.where(sigma_next == 0, x0, x_new), x0, jnp.where(stage >= 2, x0_d, old_x0_d)

    zeros = jnp.zeros_like(x)
    return run(step, (x, zeros, zeros), sigmas)[0].astype(x_init.dtype)


def _ei_phi_1(h):
    return jnp.expm1(h)


def _ei_phi_2(h):
    return (jnp.expm1(h) - h) / h


def sample_seeds_2(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0, s_noise=1.0,
                   noise_type="gaussian", r=0.5, solver_type: str = "phi_1"):
    """SEEDS-2 (Gonzalez et al. 2023): two stages at lambda_s + r h; eta scales the SDE part
    (eta = 0: the exponential midpoint / Heun ODE solver). 2 evaluations per step."""
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    noise = _noise_for(key, x, sigmas, noise_type, "seeds_2", is_literal_zero(eta) or is_literal_zero(s_noise))

    def step(x, inp):
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0 = model(x, sigma)
        emit(callback, i, x, x0, sigma)

        def stages():
            h = log_sigma(sigma) - log_sigma(sigma_next)
            h_eta = h * (eta + 1)
            sigma_1 = sigma * jnp.exp(-r * h)
            x_2 = sigma_1 / sigma * jnp.exp(-r * h * eta) * x - _ei_phi_1(-r * h_eta) * x0
            z = jnp.sqrt(-jnp.expm1(-2 * r * h * eta)) * noise(i, sigma, sigma_1, 0)
            x_2 = x_2 + z * sigma_1 * s_noise
            x0_2 = model(x_2, sigma_1)
            if solver_type == "phi_1":
                x0_d = x0 + (x0_2 - x0) / (2 * r)
                x_new = sigma_next / sigma * jnp.exp(-h * eta) * x - _ei_phi_1(-h_eta) * x0_d
            else:
                b2 = _ei_phi_2(-h_eta) / r
                b1 = _ei_phi_1(-h_eta) - b2
                x_new = sigma_next / sigma * jnp.exp(-h * eta) * x - (b1 * x0 + b2 * x0_2)
            seg = (r - 1) * h * eta
            z = z * jnp.exp(seg) + jnp.sqrt(-jnp.expm1(2 * seg)) * noise(i, sigma_1, sigma_next, 1)
            return x_new + z * sigma_next * s_noise

        return jax.lax.cond(sigma_next == 0, lambda: x0, stages)

    return run(step, x, sigmas).astype(x_init.dtype)


def sample_seeds_3(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0, s_noise=1.0,
                   noise_type="gaussian", r_1=1.0 / 3, r_2=2.0 / 3):
    """SEEDS-3 (Gonzalez et al. 2023): three stages at lambda_s + r_1 h, lambda_s + r_2 h
    (eta = 0: a 3rd-order exponential Runge-Kutta ODE solver). 3 evaluations per step."""
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    noise = _noise_for(key, x, sigmas, noise_type, "seeds_3", is_literal_zero(eta) or is_literal_zero(s_noise))

    def step(x, inp):
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0 = model(x, sigma)
        emit(callback, i, x, x0, sigma)

        def stages():
            h = log_sigma(sigma) - log_sigma(sigma_next)
            h_eta = h * (eta + 1)
            sigma_1, sigma_2 = sigma * jnp.exp(-r_1 * h), sigma * jnp.exp(-r_2 * h)
            x_2 = sigma_1 / sigma * jnp.exp(-r_1 * h * eta) * x - _ei_phi_1(-r_1 * h_eta) * x0
            z = jnp.sqrt(-jnp.expm1(-2 * r_1 * h * eta)) * noise(i, sigma, sigma_1, 0)
            x0_2 = model(x_2 + z * sigma_1 * s_noise, sigma_1)
            a3_2 = r_2 / r_1 * _ei_phi_2(-r_2 * h_eta)
            a3_1 = _ei_phi_1(-r_2 * h_eta) - a3_2
            x_3 = sigma_2 / sigma * jnp.exp(-r_2 * h * eta) * x - (a3_1 * x0 + a3_2 * x0_2)
            seg = (r_1 - r_2) * h * eta
            z = z * jnp.exp(seg) + jnp.sqrt(-jnp.expm1(2 * seg)) * noise(i, sigma_1, sigma_2, 1)
            x0_3 = model(x_3 + z * sigma_2 * s_noise, sigma_2)
            b3 = _ei_phi_2(-h_eta) / r_2
            b1 = _ei_phi_1(-h_eta) - b3
            x_new = sigma_next / sigma * jnp.exp(-h * eta) * x - (b1 * x0 + b3 * x0_3)
            seg = (r_2 - 1) * h * eta
            z = z * jnp.exp(seg) + jnp.sqrt(-jnp.expm1(2 * seg)) * noise(i, sigma_2, sigma_next, 2)
            return x_new + z * sigma_next * s_noise

        return jax.lax.cond(sigma_next == 0, lambda: x0, stages)

    return run(step, x, sigmas).astype(x_init.dtype)


# ---- SA-Solver ---------------------------------------------------------------------------

# ComfyUI's default stochastic interval: tau = eta for sigma in [sigma(0.2 * 999), sigma(0.8 * 999)]
# of SD's scaled_linear table (model_sampling.percent_to_sigma(0.8) and (0.2), to 4 digits).
SA_TAU_SIGMA_MIN = 0.5712
SA_TAU_SIGMA_MAX = 5.0924


def sa_exponential_coeffs(s, t, order: int, tau):
    """(1 + tau^2) int_s^t exp((1 + tau^2)(x - t)) x^p dx for p = 0..order-1, shape (order,),
    by integration by parts (SA-Solver's data-prediction coefficients, exp((1+tau^2) t) factored out)."""
    tau_mul = 1 + tau**2
    h = t - s
    prod = jnp.stack([t**p - s**p * jnp.exp(-tau_mul * h) for p in range(order)])
    rows = []
    for a in range(order):
        row = []
        for b in range(order):
            if b > a:
                row.append(jnp.zeros_like(tau_mul))
            else:
                c = math.exp(math.lgamma(a + 1) - math.lgamma(b + 1)) * (-1) ** (a - b)
                row.append(c * tau_mul ** (-(a - b)))
        rows.append(jnp.stack(row))
    return jnp.stack(rows) @ prod


def sa_b_coeffs(lams, lambda_s, lambda_t, tau):
    """SA-Solver's b_i (eq. 15/18) on the nodes `lams` (order,), oldest first: the integrals of
    the Lagrange basis on those nodes against the exponential weight; alpha_t = 1."""
    order = lams.shape[0]
    coeffs = sa_exponential_coeffs(lambda_s, lambda_t, order, tau)
    vander_t = jnp.stack([lams**k for k in range(order)])  # (k, j) = lams[j]^k
    return jnp.linalg.solve(vander_t, coeffs)


def _sa_update(hist, lam, i0, count_max, lambda_s, lambda_t, tau):
    """Sum_k b_k x0_k for each order 1..count_max; hist[0] = newest x0 (at lambda index i0)."""
    outs = []
    for p in range(1, count_max + 1):
        # Nodes lambda_{i0-p+1..i0}, oldest first; before the start, distinct stand-ins (unused).
        idx = [i0 - (p - 1 - j) for j in range(p)]
        lams = jnp.stack([jnp.where(k >= 0, lam[jnp.maximum(k, 0)], lam[0] - 1.0 + k.astype(lam.dtype)) for k in idx])
        b = sa_b_coeffs(lams, lambda_s, lambda_t, tau)
        outs.append(sum(b[j] * hist[p - 1 - j] for j in range(p)))
    return outs


def sample_sa_solver(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0, s_noise=1.0,
                     noise_type="gaussian", tau_sigma_min=SA_TAU_SIGMA_MIN, tau_sigma_max=SA_TAU_SIGMA_MAX,
                     predictor_order: int = 3, corrector_order: int = 4, use_pece: bool = False):
    """SA-Solver (Xue et al. 2023) as ComfyUI's sample_sa_solver: stochastic Adams predictor of
    order `predictor_order`, corrector of order `corrector_order` using the new evaluation;
    tau = eta inside [tau_sigma_min, tau_sigma_max], 0 outside (eta = 0: an ODE solver).
    Orders are lowered for the warm-up and near the end (when the schedule ends at 0).
    `use_pece` re-evaluates the corrected state (one more evaluation per step)."""
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    noise = _noise_for(key, x, sigmas, noise_type, "sa_solver", is_literal_zero(eta) or is_literal_zero(s_noise))
    n = active_steps(sigmas)
    lam = -log_sigma(sigmas)
    max_order = max(predictor_order, corrector_order)
    ends_at_zero = sigmas[-1] == 0

    def tau_at(sigma):
        return jnp.where((sigma >= tau_sigma_min) & (sigma <= tau_sigma_max), eta, 0.0) * jnp.ones((), x.dtype)

    def step(carry, inp):
        x, x_pred, hist, tau_prev, noise_prev = carry
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0 = model(x_pred, sigma)
        emit(callback, i, x_pred, x0, sigma)
        hist = jnp.concatenate([x0[None], hist[:-1]])
        have = jnp.minimum(i + 1, max_order)
        p_order = jnp.minimum(predictor_order, have)
        c_order = jnp.where((i == 0) | ((sigma_next == 0) & (not use_pece)), 0, jnp.minimum(corrector_order, have))
        p_order = jnp.where(ends_at_zero, jnp.minimum(p_order, n - 1 - i), p_order)
        c_order = jnp.where(ends_at_zero, jnp.minimum(c_order, n - i), c_order)
        # Corrector for the step just taken (lambda_{i-1} -> lambda_i), with the new x0.
        h_prev = lam[i] - lam[jnp.maximum(i - 1, 0)]
        corr = _sa_update(hist, lam, i, corrector_order, lam[jnp.maximum(i - 1, 0)], lam[i], tau_prev)
        x_corr = sigma / inp["sigma_prev"] * jnp.exp(-(tau_prev**2) * h_prev) * x + _select(c_order, corr) + noise_prev
        x = jnp.where(c_order == 0, x_pred, x_corr)
        if use_pece:
            x0_c = jax.lax.cond(c_order > 0, lambda: model(x, sigma), lambda: x0)
            hist = hist.at[0].set(x0_c)
            x0 = x0_c
        # Predictor to sigma_next.
        tau = tau_at(sigma_next)
        lam_next = lam[jnp.minimum(i + 1, sigmas.shape[0] - 1)]
        h = lam_next - lam[i]
        pred = _sa_update(hist, lam, i, predictor_order, lam[i], lam_next, tau)
        safe_sigma = jnp.where(sigma > 0, sigma, 1.0)
        new_noise = noise(i, sigma, sigma_next) * sigma_next * jnp.sqrt(-jnp.expm1(-2 * tau**2 * h)) * s_noise
        x_pred = sigma_next / safe_sigma * jnp.exp(-(tau**2) * h) * x + _select(jnp.maximum(p_order, 1), pred)
        x_pred = jnp.where(sigma_next == 0, x0, x_pred + new_noise)
        return x, x_pred, hist, tau, jnp.where(sigma_next == 0, 0.0, new_noise)

    zero = jnp.zeros((), x.dtype)
    carry = (x, x, jnp.zeros((max_order,) + x.shape, x.dtype), zero, jnp.zeros_like(x))
    return run(step, carry, sigmas)[1].astype(x_init.dtype)


def sample_sa_solver_pece(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0, s_noise=1.0,
                          noise_type="gaussian", tau_sigma_min=SA_TAU_SIGMA_MIN,
                          tau_sigma_max=SA_TAU_SIGMA_MAX):
    """SA-Solver in PECE mode (predict, evaluate, correct, evaluate): 2 evaluations per step."""
    return sample_sa_solver(denoise, x_init, sigmas, key, callback=callback, eta=eta, s_noise=s_noise,
                            noise_type=noise_type, tau_sigma_min=tau_sigma_min, tau_sigma_max=tau_sigma_max,
                            use_pece=True)
