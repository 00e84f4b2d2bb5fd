"""Multistep samplers: their history (past derivatives or x0 predictions) lives in the carry.

Same signature and conventions as `samplers.py` (see its docstring). Orders are chosen per
step from the traced step index (warm-up, lower order for the final jump to sigma = 0) by
computing each candidate update, which costs a few array adds, and selecting one.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from sdjax.sampling.sampler_utils import (
    active_steps,
    as_keys,
    emit,
    log_sigma,
    make_noise,
    require_keys,
    run,
    setup,
    to_d,
)

# Gauss-Legendre nodes/weights on [-1, 1]: 4 points integrate the degree <= 3 Lagrange
# basis polynomials of 4th-order LMS exactly (k-diffusion uses scipy.integrate.quad).
_GL_NODES, _GL_WEIGHTS = (np.asarray(a, np.float64) for a in np.polynomial.legendre.leggauss(4))


def _select(order, candidates):
    """candidates[k] is the result for order k + 1; pick the one for the traced `order`."""
    out = candidates[0]
    for k, cand in enumerate(candidates[1:], start=2):
        out = jnp.where(order == k, cand, out)
    return out


_GL8_NODES, _GL8_WEIGHTS = (np.asarray(a, np.float64) for a in np.polynomial.legendre.leggauss(8))


def _lms_coeffs(sigmas, i, order: int, warp=None):
    """LMS weights (order,) for step i: integrals over sigma in [sigma_i, sigma_{i+1}] of the
    Lagrange basis on the nodes sigma_i, sigma_{i-1}, ...; zero beyond the current order.
    With `warp`, the basis is on warp(sigma) (DEIS interpolates in its VP time), integrated by
    8-point Gauss-Legendre."""
    t_i, t_next = sigmas[i], sigmas[i + 1]
    k = jnp.arange(order, dtype=jnp.asarray(i).dtype)  # i is int64 under x64
    # Nodes before the start do not exist yet; distinct stand-ins keep the unused orders finite.
    nodes = jnp.where(k <= i, sigmas[jnp.maximum(i - k, 0)], t_i + 1.0 + k.astype(sigmas.dtype))
    half = (t_next - t_i) / 2
    gl_nodes, gl_weights = (_GL_NODES, _GL_WEIGHTS) if warp is None else (_GL8_NODES, _GL8_WEIGHTS)
    taus = t_i + half * (jnp.asarray(gl_nodes, sigmas.dtype) + 1)
    weights = jnp.asarray(gl_weights, sigmas.dtype) * half
    if warp is not None:
        nodes, taus = warp(nodes), warp(taus)
    per_order = []
    for p in range(1, order + 1):
        row = []
        for j in range(p):
            basis = jnp.ones_like(taus)
            for m in range(p):
                if m != j:
                    basis = basis * (taus - nodes[m]) / (nodes[j] - nodes[m])
            row.append(jnp.sum(weights * basis))
        per_order.append(jnp.stack(row + [jnp.zeros((), sigmas.dtype)] * (order - p)))
    return _select(jnp.minimum(i + 1, order), per_order)


def sample_lms(denoise, x_init, sigmas, key=None, *, callback=None, order: int = 4):
    """Linear multistep (Adams-Bashforth on dx/dsigma with non-uniform steps), order <= 4."""
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    history = jnp.zeros((order,) + x.shape, x.dtype)  # history[0] = newest derivative

    def step(carry, inp):
        x, ds = carry
        i, sigma = inp["i"], inp["sigma"]
        x0_pred = model(x, sigma)
        emit(callback, i, x, x0_pred, sigma)
        ds = jnp.concatenate([to_d(x, sigma, x0_pred)[None], ds[:-1]])
        coeffs = _lms_coeffs(sigmas, i, order).astype(x.dtype)
        return x + jnp.tensordot(coeffs, ds, axes=1), ds

    return run(step, (x, history), sigmas)[0].astype(x_init.dtype)


def sample_dpmpp_2m(denoise, x_init, sigmas, key=None, *, callback=None):
    """DPM-Solver++(2M): 2nd-order multistep in log-sigma on x0 predictions (Lu et al.)."""
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)

    def step(carry, inp):
        x, old_x0 = carry
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0_pred = model(x, sigma)
        emit(callback, i, x, x0_pred, sigma)
        h = log_sigma(sigma) - log_sigma(sigma_next)
        h_last = log_sigma(inp["sigma_prev"]) - log_sigma(sigma)
        first_order = (i == 0) | (sigma_next == 0)
        r = jnp.where(first_order, 1.0, h_last / h)
        x0_d = jnp.where(first_order, x0_pred, (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * old_x0)
        x = jnp.where(sigma_next == 0, x0_d, (sigma_next / sigma) * x - jnp.expm1(-h) * x0_d)
        return x, x0_pred

    return run(step, (x, jnp.zeros_like(x)), sigmas)[0].astype(x_init.dtype)


def sample_dpmpp_2m_sde(denoise, x_init, sigmas, key=None, *, callback=None,
                        eta=1.0, s_noise=1.0, solver_type: str = "midpoint", noise_type="gaussian"):
    """DPM-Solver++(2M) SDE; solver_type "midpoint" or "heun" for the 2nd-order correction.

    k-diffusion draws its noise from a Brownian tree; per step that is one standard normal
    independent of the other steps', which is what `step_noise` gives.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    keys = require_keys(as_keys(key, x.shape[0]), "dpmpp_2m_sde")
    noise_at = make_noise(keys, sigmas, x.shape[1:], x.dtype, noise_type)

    def step(carry, inp):
        x, old_x0 = carry
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0_pred = model(x, sigma)
        emit(callback, i, x, x0_pred, sigma)
        h = log_sigma(sigma) - log_sigma(sigma_next)
        eta_h = eta * h
        x_sde = (sigma_next / sigma) * jnp.exp(-eta_h) * x - jnp.expm1(-h - eta_h) * x0_pred
        h_last = log_sigma(inp["sigma_prev"]) - log_sigma(sigma)
        r = jnp.where(i > 0, h_last / h, 1.0)
        if solver_type == "heun":
            coef = -jnp.expm1(-h - eta_h) / (-h - eta_h) + 1
        else:
            coef = -0.5 * jnp.expm1(-h - eta_h)
        x_sde = x_sde + jnp.where(i > 0, coef / r, 0.0) * (x0_pred - old_x0)
        noise = noise_at(i, sigma, sigma_next)
        x_sde = x_sde + noise * sigma_next * jnp.sqrt(-jnp.expm1(-2 * eta_h)) * s_noise
        return jnp.where(sigma_next == 0, x0_pred, x_sde), x0_pred

    return run(step, (x, jnp.zeros_like(x)), sigmas)[0].astype(x_init.dtype)


def sample_dpmpp_3m_sde(denoise, x_init, sigmas, key=None, *, callback=None, eta=1.0, s_noise=1.0,
                        noise_type="gaussian"):
    """DPM-Solver++(3M) SDE (k-diffusion / ComfyUI), warm-up with orders 1 and 2."""
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    keys = require_keys(as_keys(key, x.shape[0]), "dpmpp_3m_sde")
    noise_at = make_noise(keys, sigmas, x.shape[1:], x.dtype, noise_type)

    def step(carry, inp):
        x, x0_1, x0_2 = carry
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0_pred = model(x, sigma)
        emit(callback, i, x, x0_pred, sigma)
        h = log_sigma(sigma) - log_sigma(sigma_next)
        h_1 = log_sigma(inp["sigma_prev"]) - log_sigma(sigma)
        h_2 = log_sigma(inp["sigma_prev2"]) - log_sigma(inp["sigma_prev"])
        h_eta = h * (eta + 1)
        x_new = jnp.exp(-h_eta) * x - jnp.expm1(-h_eta) * x0_pred
        phi_2 = jnp.expm1(-h_eta) / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        # Third order (i >= 2).
        r0, r1 = h_1 / h, jnp.where(i >= 2, h_2 / h, 1.0)
        d1_0 = (x0_pred - x0_1) / r0
        d1_1 = (x0_1 - x0_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        corr3 = phi_2 * d1 - phi_3 * d2
        corr2 = phi_2 * d1_0  # second order (i == 1)
        x_new = x_new + _select(jnp.minimum(i + 1, 3), [jnp.zeros_like(x), corr2, corr3])
        noise = noise_at(i, sigma, sigma_next)
        x_new = x_new + noise * sigma_next * jnp.sqrt(-jnp.expm1(-2 * h * eta)) * s_noise
        return jnp.where(sigma_next == 0, x0_pred, x_new), x0_pred, x0_1

    zeros = jnp.zeros_like(x)
    return run(step, (x, zeros, zeros), sigmas)[0].astype(x_init.dtype)


# Adams-Bashforth weights on eps = dx/dsigma for 1..4 past evaluations (newest first),
# as in PNDM's PLMS (Liu et al. 2022) and iPNDM (Zhang & Chen 2022).
_AB = [
    [1.0, 0.0, 0.0, 0.0],
    [3 / 2, -1 / 2, 0.0, 0.0],
    [23 / 12, -16 / 12, 5 / 12, 0.0],
    [55 / 24, -59 / 24, 37 / 24, -9 / 24],
]


def _ab_fixed(sigmas, i):
    """The constant Adams-Bashforth weights (4,) of order min(i + 1, 4)."""
    return jnp.asarray(_AB, sigmas.dtype)[jnp.minimum(i, 3)]


def _ab_variable(sigmas, i):
    """Variable-step Adams-Bashforth weights (4,) of order min(i + 1, 4), per unit step.

    The exact weights for non-uniform steps in sigma: the integrals over [sigma_i, sigma_{i+1}]
    of the Lagrange basis on sigma_i, sigma_{i-1}, ..., divided by the step (`_lms_coeffs`).
    They reduce to `_AB` on uniform steps.

    ComfyUI's `sample_ipndm_v` (copied from zju-pi/diff-sampler) is meant to be this method,
    but its published order-3 and order-4 weights are not: its `temp1` puts the step-ratio
    factor inside the (1 - ...) rather than multiplying it (equal only on uniform steps), and
    its order-4 weights do not sum to 1 unless consecutive step ratios are equal
    (sum = 1 + q (h2/h3 - h1/h2)), so on a Karras schedule it is not even consistent and
    converges at about 1st order. sdjax implements the method, so its `ipndm_v` differs from
    ComfyUI's numbers on non-uniform schedules (tests/test_sampler_reference.py shows both).
    """
    h = sigmas[i + 1] - sigmas[i]
    return _lms_coeffs(sigmas, i, 4) / jnp.where(h != 0, h, 1.0)


def _pseudo_multistep(denoise, x_init, sigmas, callback, coeffs_fn, heun_start: bool, denoise_to_zero: bool):
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)

    def step(carry, inp):
        x, ds = carry
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0_pred = model(x, sigma)
        emit(callback, i, x, x0_pred, sigma)
        d = to_d(x, sigma, x0_pred)
        ds = jnp.concatenate([d[None], ds[:-1]])
        coeffs = coeffs_fn(sigmas, i).astype(x.dtype)
        x_ab = x + jnp.tensordot(coeffs, ds, axes=1) * (sigma_next - sigma)
        if heun_start:
            # PNDM's first step: an Euler predictor corrected with the slope at its end
            # (one extra evaluation); that slope is not kept in the history.
            def heun():
                safe_next = jnp.where(sigma_next > 0, sigma_next, 1.0)
                d_2 = to_d(x_ab, safe_next, model(x_ab, sigma_next))
                return x + (d + d_2) / 2 * (sigma_next - sigma)

            x_ab = jax.lax.cond((i == 0) & (sigma_next > 0), heun, lambda: x_ab)
        if denoise_to_zero:
            # ComfyUI's iPNDM: the step to sigma = 0 returns the denoiser's x0, not an
            # extrapolation of the slopes to 0.
            x_ab = jnp.where(sigma_next == 0, x0_pred, x_ab)
        return x_ab, ds

    history = jnp.zeros((4,) + x.shape, x.dtype)
    return run(step, (x, history), sigmas)[0].astype(x_init.dtype)


def sample_plms(denoise, x_init, sigmas, key=None, *, callback=None):
    """PNDM's PLMS (diffusers PNDMScheduler with skip_prk_steps): a Heun first step, then
    Adams-Bashforth 2, 3, 4 with constant weights. steps + 1 evaluations."""
    return _pseudo_multistep(denoise, x_init, sigmas, callback, _ab_fixed, heun_start=True, denoise_to_zero=False)


def sample_ipndm(denoise, x_init, sigmas, key=None, *, callback=None):
    """iPNDM (ComfyUI's sample_ipndm): Euler first step, then Adams-Bashforth 2, 3, 4 in sigma
    with the constant (uniform-step) weights; the step to sigma = 0 returns x0_pred.

    The constant weights are exact only for uniform steps in sigma: on a schedule whose step
    ratios vary by O(1/N) (Karras, exponential) the method converges at 2nd order, whatever
    its nominal 4th (tests/test_sampler_order.py measures both).
    """
    return _pseudo_multistep(denoise, x_init, sigmas, callback, _ab_fixed, heun_start=False, denoise_to_zero=True)


def sample_ipndm_v(denoise, x_init, sigmas, key=None, *, callback=None):
    """iPNDM-v: iPNDM with the exact variable-step Adams-Bashforth weights (`_ab_variable`,
    see there how it differs from ComfyUI's `sample_ipndm_v`); Euler first step, then orders
    2, 3, 4, and the step to sigma = 0 returns x0_pred. It equals `sample_lms` except for that
    last step (LMS extrapolates its slopes to 0), and `sample_ipndm` on uniform steps."""
    return _pseudo_multistep(denoise, x_init, sigmas, callback, _ab_variable, heun_start=False, denoise_to_zero=True)


# DEIS's time: the VP diffusion time of an EDM sigma, with ComfyUI's (zju-pi/diff-sampler's)
# edm2t constants sigma_min = 0.002, sigma_max = 80, epsilon_s = 1e-3.
_DEIS_BETA_D = 2 * (np.log(0.002**2 + 1) / 1e-3 - np.log(80.0**2 + 1)) / (1e-3 - 1)
_DEIS_BETA_MIN = np.log(80.0**2 + 1) - 0.5 * _DEIS_BETA_D


def deis_time(sigma):
    """VP time t(sigma) = (sqrt(beta_min^2 + 2 beta_d log(sigma^2 + 1)) - beta_min) / beta_d."""
    return (jnp.sqrt(_DEIS_BETA_MIN**2 + 2 * _DEIS_BETA_D * jnp.log1p(sigma**2)) - _DEIS_BETA_MIN) / _DEIS_BETA_D


def sample_deis(denoise, x_init, sigmas, key=None, *, callback=None, max_order: int = 3):
    """DEIS, time-quadratic-free "tAB" variant (Zhang & Chen 2023, "Fast Sampling of Diffusion
    Models with Exponential Integrator", arXiv:2204.13902), as ComfyUI's sample_deis: Adams-
    Bashforth on eps = dx/dsigma with the Lagrange basis in VP time t(sigma) (`deis_time`),
    integrated over sigma. Euler first step; orders up to max_order (<= 4); the step to 0 is
    Euler (returns x0_pred)."""
    if max_order not in (1, 2, 3, 4):
        raise ValueError(f"DEIS max_order must be 1..4, got {max_order}")
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)

    def step(carry, inp):
        x, ds = carry
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        x0_pred = model(x, sigma)
        emit(callback, i, x, x0_pred, sigma)
        ds = jnp.concatenate([to_d(x, sigma, x0_pred)[None], ds[:-1]])
        coeffs = _lms_coeffs(sigmas, i, max_order, warp=deis_time).astype(x.dtype)
        x_ab = x + jnp.tensordot(coeffs, ds, axes=1)
        return jnp.where(sigma_next == 0, x0_pred, x_ab), ds

    history = jnp.zeros((max_order,) + x.shape, x.dtype)
    return run(step, (x, history), sigmas)[0].astype(x_init.dtype)


def _unipc_b(hh, order: int, solver_type: str):
    """B(h) and the right-hand side b (order,) of UniPC's order conditions (hh = -h)."""
    h_phi_1 = jnp.expm1(hh)
    b_h = hh if solver_type == "bh1" else jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial, b = 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, jnp.stack(b)


def _unipc_update(x, m0, hist, rks, h, ratio, order: int, solver_type: str, m_t=None):
    """One UniP predictor (m_t None) or UniC corrector update of the given static order.

    x: sample at the step's start; m0: x0_pred there; hist[k], rks[k]: older x0_preds and
    their (lambda_k - lambda_0) / h; ratio = sigma_t / sigma_s0; h = lambda_t - lambda_0.
    """
    hh = -h
    h_phi_1, b_h, b = _unipc_b(hh, order, solver_type)
    x_t = ratio * x - h_phi_1 * m0
    d1s = [(hist[k] - m0) / rks[k] for k in range(order - 1)]
    r = jnp.stack([jnp.stack([rks[k] for k in range(order - 1)] + [jnp.ones_like(h)]) ** p for p in range(order)])
    if m_t is None:  # predictor
        if order == 1:
            return x_t
        rhos = jnp.full((1,), 0.5, x.dtype) if order == 2 else jnp.linalg.solve(r[:-1, :-1], b[:-1])
        return x_t - b_h * sum(rhos[k] * d1s[k] for k in range(order - 1))
    rhos = jnp.full((1,), 0.5, x.dtype) if order == 1 else jnp.linalg.solve(r, b)
    res = sum((rhos[k] * d1s[k] for k in range(order - 1)), jnp.zeros_like(x))
    return x_t - b_h * (res + rhos[-1] * (m_t - m0))


def sample_unipc(denoise, x_init, sigmas, key=None, *, callback=None, order: int = 2,
                 solver_type: str = "bh1", lower_order_final: bool = True):
    """UniPC (Zhao et al. 2023): UniP-p predictor + UniC corrector, data prediction, as
    diffusers' UniPCMultistepScheduler (solver_order=order, predict_x0=True).

    The corrector reuses the evaluation at the predicted point, so NFE = steps, and it
    raises the order by one (order 2 converges at 3rd order). `lower_order_final` lowers
    the order near the end like diffusers (min(order, steps left)); the step to sigma = 0
    is always first order.
    """
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    n = active_steps(sigmas)
    lam = -log_sigma(sigmas)  # lambda = log(alpha / sigma_vp) = -log(sigma)
    one = jnp.ones((), x.dtype)

    def lam_at(j):
        return lam[jnp.maximum(j, 0)]

    def rks_for(i0, h, count):
        # (lambda_{i0-k} - lambda_{i0}) / h for k = 1..count; 1 - k as a finite stand-in.
        return [jnp.where(i0 - k >= 0, (lam_at(i0 - k) - lam_at(i0)) / h, -1.0 * k) for k in range(1, count + 1)]

    def step(carry, inp):
        x, hist, last_x, last_order = carry  # hist[0] = x0_pred at sigmas[i - 1]
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        m_t = model(x, sigma)
        emit(callback, i, x, m_t, sigma)
        # Corrector for the previous step, with the evaluation just made.
        h_c = jnp.where(i > 0, lam_at(i) - lam_at(i - 1), one)
        rks_c = rks_for(i - 1, h_c, order - 1)
        ratio_c = sigma / inp["sigma_prev"]
        corrected = [
            _unipc_update(last_x, hist[0], hist[1:], rks_c, h_c, ratio_c, p, solver_type, m_t=m_t)
            for p in range(1, order + 1)
        ]
        x = jnp.where(i > 0, _select(last_order, corrected), x)
        hist = jnp.concatenate([m_t[None], hist[:-1]])
        # Predictor.
        this_order = jnp.minimum(order, i + 1)
        if lower_order_final:
            this_order = jnp.minimum(this_order, n - i)
        this_order = jnp.where(sigma_next == 0, 1, this_order)
        h = jnp.where(sigma_next > 0, lam_at(i + 1) - lam_at(i), one)
        rks_p = rks_for(i, h, order - 1)
        predicted = [
            _unipc_update(x, hist[0], hist[1:], rks_p, h, sigma_next / sigma, p, solver_type)
            for p in range(1, order + 1)
        ]
        x_next = jnp.where(sigma_next == 0, m_t, _select(this_order, predicted))
        return x_next, hist, x, this_order

    carry = (x, jnp.zeros((order,) + x.shape, x.dtype), x, jnp.ones((), jnp.int32))
    return run(step, carry, sigmas)[0].astype(x_init.dtype)
