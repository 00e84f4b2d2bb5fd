"""DPM-Solver's fast (fixed NFE) and adaptive samplers (Lu et al. 2022, "DPM-Solver: A Fast
ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps", arXiv:2206.00927),
as k-diffusion's `DPMSolver`, in t = -log(sigma) on eps = (x - D(x, sigma)) / sigma.

As ComfyUI, both use only the schedule's ends: they run from sigmas[0] to the last positive
sigma and return the sample *there* (not denoised to 0). `dpm_fast` spends exactly
steps = len(sigmas) - 1 evaluations on orders 3, ..., 3, then 2/1 (uniform steps in t);
`dpm_adaptive` chooses its steps with an error controller under `lax.while_loop`, capped at
`max_steps` attempts, and can report its accepted/rejected step counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.sampling.sampler_utils import ancestral_step, emit, is_literal_zero, sampler_noise, setup


def _ends(sigmas):
    """(t_start, t_end) = -log(sigmas[0]), -log(last positive sigma)."""
    sigma_min = jnp.min(jnp.where(sigmas > 0, sigmas, jnp.inf))
    return -jnp.log(sigmas[0]), -jnp.log(sigma_min)


class _Solver:
    """The DPM-Solver-1/2/3 single steps; each call of `eps` is one network evaluation."""

    def __init__(self, model):
        self.model = model

    def eps(self, x, t):
        sigma = jnp.exp(-t)
        return (x - self.model(x, sigma)) / sigma

    @staticmethod
    def sigma(t):
        return jnp.exp(-t)

    def step1(self, x, t, t_next, eps):
        h = t_next - t
        return x - self.sigma(t_next) * jnp.expm1(h) * eps

    def step2(self, x, t, t_next, eps, r1=0.5):
        h = t_next - t
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * jnp.expm1(r1 * h) * eps
        eps_r1 = self.eps(u1, s1)
        return (x - self.sigma(t_next) * jnp.expm1(h) * eps
                - self.sigma(t_next) / (2 * r1) * jnp.expm1(h) * (eps_r1 - eps)), eps_r1

    def step3(self, x, t, t_next, eps, eps_r1=None, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        s1, s2 = t + r1 * h, t + r2 * h
        if eps_r1 is None:
            u1 = x - self.sigma(s1) * jnp.expm1(r1 * h) * eps
            eps_r1 = self.eps(u1, s1)
        u2 = (x - self.sigma(s2) * jnp.expm1(r2 * h) * eps
              - self.sigma(s2) * (r2 / r1) * (jnp.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(u2, s2)
        return (x - self.sigma(t_next) * jnp.expm1(h) * eps
                - self.sigma(t_next) / r2 * (jnp.expm1(h) / h - 1) * (eps_r2 - eps))


def _ancestral_target(solver, t, t_next, t_end, eta):
    """(t_next_, sigma_up): the deterministic target and the noise std of an ancestral step."""
    sd, _ = ancestral_step(solver.sigma(t), solver.sigma(t_next), eta)
    t_next_ = jnp.minimum(t_end, -jnp.log(jnp.maximum(sd, 1e-30)))
    su = jnp.sqrt(jnp.maximum(solver.sigma(t_next) ** 2 - solver.sigma(t_next_) ** 2, 0.0))
    return t_next_, su


def sample_dpm_fast(denoise, x_init, sigmas, key=None, *, callback=None, eta=0.0, s_noise=1.0,
                    noise_type="gaussian"):
    """DPM-Solver-fast: NFE = the schedule's steps (len(sigmas) - 1, as ComfyUI's total_steps)
    evaluations in floor(NFE / 3) + 1 uniform steps in t (orders 3, ..., 3 and then NFE mod 3, or
    2, 1 when 3 divides NFE). eta > 0 adds ancestral noise (needs `key`). Returns the sample at
    the last positive sigma. The step count is read from the schedule at run time (the
    zero-length steps `from_step` pads with are not counted), so img2img's traced start changes
    the NFE without a recompile; the scan runs the full schedule's count, idle past the end."""
    x, sigmas, model, _ = setup(denoise, x_init, sigmas)
    nfe = jnp.sum(sigmas[:-1] > sigmas[1:]).astype(jnp.int32)
    m = nfe // 3 + 1
    max_m = (sigmas.shape[0] - 1) // 3 + 1  # static: the scan's length
    stochastic = not is_literal_zero(eta)
    noise = None
    if stochastic:
        noise = sampler_noise(key, x, sigmas, noise_type, "dpm_fast")
    solver = _Solver(model)
    t_start, t_end = _ends(sigmas)

    def order_of(i):
        last = jnp.where(nfe % 3 == 0, jnp.where(i == m - 1, 1, jnp.where(i == m - 2, 2, 3)),
                         jnp.where(i == m - 1, nfe % 3, 3))
        return last.astype(jnp.int32)

    def step(x, i):
        t = t_start + (t_end - t_start) * (i / m).astype(x.dtype)
        t_next = t_start + (t_end - t_start) * ((i + 1) / m).astype(x.dtype)
        if stochastic:
            t_next_, su = _ancestral_target(solver, t, t_next, t_end, eta)
        else:
            t_next_, su = t_next, 0.0
        eps = solver.eps(x, t)
        emit(callback, i, x, x - solver.sigma(t) * eps, solver.sigma(t))
        branches = [lambda: solver.step1(x, t, t_next_, eps),
                    lambda: solver.step2(x, t, t_next_, eps)[0],
                    lambda: solver.step3(x, t, t_next_, eps)]
        x = jax.lax.switch(order_of(i) - 1, branches)
        if stochastic:
            x = x + su * s_noise * noise(i, solver.sigma(t), solver.sigma(t_next))
        return x

    def body(x, i):
        return jax.lax.cond(i < m, step, lambda x, i: x, x, i), None

    x, _ = jax.lax.scan(body, x, jnp.arange(max_m, dtype=jnp.int32))
    return x.astype(x_init.dtype)


def sample_dpm_adaptive(denoise, x_init, sigmas, key=None, *, callback=None, order: int = 3, rtol=0.05,
                        atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                        eta=0.0, s_noise=1.0, noise_type="gaussian", max_steps: int = 200,
                        return_info: bool = False):
    """DPM-Solver-12 (order 2) or -23 (order 3) with a PID step-size controller on the embedded
    lower-order error, as k-diffusion's dpm_solver_adaptive. Each attempt costs `order`
    evaluations; at most `max_steps` attempts (static: the while_loop's cap; if it is hit the
    sample is returned where it got to, and info["t_reached"] < info["t_end"] says so).
    rtol/atol/h_init/controller coefficients/eta may be traced.
    With return_info: (x, info) with int32 counts "n_accept", "n_reject", "nfe" and floats
    "t_reached", "t_end" (t = -log sigma)."""
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order}")
    x, sigmas, model, dtype = setup(denoise, x_init, sigmas)
    stochastic = not is_literal_zero(eta)
    noise = None
    if stochastic:
        noise = sampler_noise(key, x, sigmas, noise_type, "dpm_adaptive")
    solver = _Solver(model)
    t_start, t_end = _ends(sigmas)
    ctrl_order = 1.5 if stochastic else order
    b1 = (pcoeff + icoeff + dcoeff) / ctrl_order
    b2 = -(pcoeff + 2 * dcoeff) / ctrl_order
    b3 = dcoeff / ctrl_order
    one = jnp.ones((), dtype)

    def cond(c):
        return (c["s"] < t_end - 1e-5) & (c["steps"] < max_steps)

    def body(c):
        x, s, h = c["x"], c["s"], c["h"]
        t = jnp.minimum(t_end, s + h)
        if stochastic:
            t_, su = _ancestral_target(solver, s, t, t_end, eta)
        else:
            t_, su = t, 0.0
        eps = solver.eps(x, s)
        emit(callback, c["steps"], x, x - solver.sigma(s) * eps, solver.sigma(s))
        if order == 2:
            x_low = solver.step1(x, s, t_, eps)
            x_high, _ = solver.step2(x, s, t_, eps)
        else:
            x_low, eps_r1 = solver.step2(x, s, t_, eps, r1=1 / 3)
            x_high = solver.step3(x, s, t_, eps, eps_r1=eps_r1)
        delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(c["x_prev"])))
        error = jnp.linalg.norm(((x_low - x_high) / delta).ravel()) / jnp.sqrt(jnp.asarray(x.size, dtype))
        inv = 1 / (error + 1e-8)
        errs = jnp.where(c["steps"] == 0, jnp.stack([inv, inv, inv]), c["errs"].at[0].set(inv))
        factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
        factor = 1 + jnp.arctan(factor - 1)
        accept = factor >= accept_safety
        x_new = x_high
        if stochastic:
            x_new = x_new + su * s_noise * noise(c["steps"], solver.sigma(s), solver.sigma(t))
        return {
            "x": jnp.where(accept, x_new, x), "x_prev": jnp.where(accept, x_low, c["x_prev"]),
            "s": jnp.where(accept, t, s), "h": h * factor,
            "errs": jnp.where(accept, jnp.stack([errs[0], errs[0], errs[1]]), errs),
            "steps": c["steps"] + 1, "n_accept": c["n_accept"] + accept.astype(jnp.int32),
            "n_reject": c["n_reject"] + (~accept).astype(jnp.int32),
        }

    zero = jnp.zeros((), jnp.int32)
    carry = {"x": x, "x_prev": x, "s": t_start.astype(dtype), "h": jnp.abs(jnp.asarray(h_init, dtype)) * one,
             "errs": jnp.ones((3,), dtype), "steps": zero, "n_accept": zero, "n_reject": zero}
    out = jax.lax.while_loop(cond, body, carry)
    x = out["x"].astype(x_init.dtype)
    if not return_info:
        return x
    info = {"n_accept": out["n_accept"], "n_reject": out["n_reject"], "nfe": out["steps"] * order,
            "t_reached": out["s"], "t_end": t_end}
    return x, info
