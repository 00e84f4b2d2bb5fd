"""Analytic test problems: data whose exact denoiser and probability-flow ODE are known.

For data x0 ~ p and x = x0 + sigma * n (n standard normal), the ideal denoiser is
D(x, sigma) = E[x0 | x], and the probability-flow ODE (Karras et al. 2022, eq. 3 with
sigma(t) = t) is dx/dsigma = (x - D(x, sigma)) / sigma. Samplers given D solve that ODE,
so their error against the exact solution measures their order.

Arrays: x (B, *event) with any event shape; sigma a scalar (0-d) noise level.
`denoise` is JAX (fed to the samplers); `ode_solution` is float64 NumPy (the reference).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp
from sdjax.sampling.samplers import sample


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """Data N(mean, std^2 I); `mean` a scalar or an array of the event shape."""

    mean: float | np.ndarray = 0.0
    std: float = 0.5

    def denoise(self, x, sigma):
        """E[x0 | x] = mean + std^2 / (std^2 + sigma^2) * (x - mean)."""
        s2 = self.std**2
        return self.mean + s2 / (s2 + sigma**2) * (x - self.mean)

    def ode_solution(self, x, sigma_from, sigma_to):
        """Exact ODE flow: x(sigma_to) = mean + (x - mean) * sqrt(std^2 + sigma_to^2) /
        sqrt(std^2 + sigma_from^2), in float64."""
        x = np.asarray(x, np.float64)
        s2 = self.std**2
        scale = np.sqrt(s2 + float(sigma_to) ** 2) / np.sqrt(s2 + float(sigma_from) ** 2)
        return self.mean + (x - self.mean) * scale

    def sample(self, key, shape):
        """Draws x0 of shape `shape` from the data distribution."""
        return self.mean + self.std * jax.random.normal(key, shape)


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Data sum_k w_k N(means[k], stds[k]^2 I); means (K, *event), stds (K,), weights (K,)."""

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    @classmethod
    def default(cls, dim: int = 2):
        """Three well separated components of different widths in `dim` dimensions."""
        rng = np.random.default_rng(0)
        means = rng.normal(size=(3, dim)) * 1.5
        return cls(means=means, stds=np.array([0.3, 0.5, 0.2]), weights=np.array([0.5, 0.3, 0.2]))

    def _posterior(self, xp, x, sigma):
        """Responsibilities (B, K) and per-component means E[x0 | x, k] (B, K, *event)."""
        means = xp.asarray(self.means, x.dtype)
        var = xp.asarray(self.stds, x.dtype) ** 2  # (K,)
        tot = var + sigma**2
        event_axes = tuple(range(2, x.ndim + 1))
        diff = x[:, None] - means[None]  # (B, K, *event)
        d = int(np.prod(self.means.shape[1:]))
        logits = (
            xp.log(xp.asarray(self.weights, x.dtype))
            - 0.5 * xp.sum(diff**2, axis=event_axes) / tot
            - 0.5 * d * xp.log(tot)
        )
        logits = logits - logits.max(axis=1, keepdims=True)
        resp = xp.exp(logits)
        resp = resp / resp.sum(axis=1, keepdims=True)
        shape = (1, -1) + (1,) * (x.ndim - 1)
        comp = means[None] + (var / tot).reshape(shape) * diff
        return resp, comp

    def denoise(self, x, sigma):
        """E[x0 | x]: responsibility-weighted per-component Gaussian denoisers (JAX)."""
        resp, comp = self._posterior(jnp, x, sigma)
        return jnp.einsum("bk,bk...->b...", resp, comp)

    def _denoise_np(self, x, sigma):
        resp, comp = self._posterior(np, x, sigma)
        return np.einsum("bk,bk...->b...", resp, comp)

    def ode_solution(self, x, sigma_from, sigma_to, steps_per_unit: int = 200):
        """Reference ODE flow by classical RK4 in u = log(sigma), float64 NumPy.

        dx/du = x - D(x, e^u) is smooth in u; with h = 1/steps_per_unit RK4's error is far
        below float32 rounding. sigma_to = 0 is approached as sigma_to = 1e-6 * min(stds):
        near 0, x(sigma) - x(0) = O(sigma^2), so the difference is ~1e-12.
        """
        x = np.asarray(x, np.float64)
        sigma_to = max(float(sigma_to), 1e-6 * float(np.min(self.stds)))
        u0, u1 = np.log(float(sigma_from)), np.log(sigma_to)
        n = max(1, int(np.ceil(abs(u1 - u0) * steps_per_unit)))
        h = (u1 - u0) / n

        def f(u, y):
            return y - self._denoise_np(y, np.exp(u))

        u = u0
        for _ in range(n):
            k1 = f(u, x)
            k2 = f(u + h / 2, x + h / 2 * k1)
            k3 = f(u + h / 2, x + h / 2 * k2)
            k4 = f(u + h, x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            u += h
        return x

    def sample(self, key, shape):
        """Draws x0 of shape (B, *event) with B = shape[0]."""
        k1, k2 = jax.random.split(key)
        comp = jax.random.choice(k1, len(self.stds), (shape[0],), p=jnp.asarray(self.weights))
        noise = jax.random.normal(k2, shape)
        std = jnp.asarray(self.stds)[comp].reshape((-1,) + (1,) * (len(shape) - 1))
        return jnp.asarray(self.means)[comp] + std * noise


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, zero: bool = True):
    """Karras et al. (2022) schedule (steps,) plus a trailing 0 when `zero` (NumPy float64).

    Kept here so the analytic problem does not depend on a model's discrete schedule.
    """
    ramp = np.linspace(0, 1, steps)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    sigmas = inv**rho
    return np.concatenate([sigmas, [0.0]]) if zero else sigmas


def convergence(name: str, problem, steps_list, *, batch: int = 32, event_shape=(8,),
                sigma_min: float = 0.02, sigma_max: float = 20.0, rho: float = 7.0, seed: int = 0,
                **knobs):
    """Error of sampler `name` on `problem` for each step count: (nfe, errors), lists.

    Runs in float64 (jax.enable_x64) so rounding does not hide the truncation error. The
    schedule is Karras' (exponent `rho`; rho = 1 is uniform in sigma) from sigma_max to
    sigma_min *without* the final 0: the jump to 0 is a
    single denoising step whose error does not shrink with the step count, so the error is
    measured at sigma_min against the exact flow of `problem` (RMS over all elements).
    NFE is counted from the denoiser calls actually made.
    """

    event_shape = tuple(getattr(problem, "means", np.zeros((1,) + tuple(event_shape))).shape[1:])
    with jax.enable_x64(True):
        key_x0, key_n = jax.random.split(jax.random.key(seed))
        x0 = problem.sample(key_x0, (batch,) + event_shape).astype(jnp.float64)
        x_init = x0 + sigma_max * jax.random.normal(key_n, x0.shape, jnp.float64)
        schedules = [karras_sigmas(int(steps) + 1, sigma_min, sigma_max, rho=rho, zero=False)
                     for steps in steps_list]
        calls = [[] for _ in schedules]  # one entry per denoiser call, per step count

        def counted(i):
            def denoise(x, sigma):
                jax.debug.callback(lambda: calls[i].append(1))
                return problem.denoise(x, sigma)
            return denoise

        # The runs are independent; one compiled program holds them all (a program per step
        # count paid JAX's and XLA's fixed costs once each).
        run = jax.jit(lambda x, ss: [sample(name, counted(i), x, s, **knobs) for i, s in enumerate(ss)])
        outs = [np.asarray(o, np.float64) for o in run(x_init, [jnp.asarray(s) for s in schedules])]
        jax.effects_barrier()
        # Every schedule has the same ends, so the exact flow is computed once (see _exact_flow).
        exact = [_exact_flow(problem, np.asarray(x_init), s[0], s[-1]) for s in schedules]
        nfes = [len(c) for c in calls]
        errors = [float(np.sqrt(np.mean((out - ref) ** 2))) for out, ref in zip(outs, exact)]
    return nfes, errors


# Exact flows already computed: every step count of a convergence() run, and every sampler
# run on the same problem and seed, starts from the same x at sigma_max and ends at sigma_min;
# the mixture's reference (RK4 in NumPy) costs far more than the sampler runs themselves.
_EXACT_FLOWS: dict = {}


def _exact_flow(problem, x: np.ndarray, sigma_from: float, sigma_to: float) -> np.ndarray:
    """problem.ode_solution(x, sigma_from, sigma_to), remembered for the same problem and inputs
    (problems given as dataclasses, like this module's; any other is solved every time)."""
    if not dataclasses.is_dataclass(problem):
        return problem.ode_solution(x, sigma_from, sigma_to)
    fields = tuple((f.name, np.asarray(getattr(problem, f.name)).dtype.str, np.shape(getattr(problem, f.name)),
                    np.asarray(getattr(problem, f.name)).tobytes()) for f in dataclasses.fields(problem))
    key = (type(problem), fields, x.dtype.str, x.shape, x.tobytes(), float(sigma_from), float(sigma_to))
    if key not in _EXACT_FLOWS:
        if len(_EXACT_FLOWS) >= 32:
            _EXACT_FLOWS.clear()
        _EXACT_FLOWS[key] = problem.ode_solution(x, sigma_from, sigma_to)
    return _EXACT_FLOWS[key].copy()


def measured_order(nfes, errors) -> float:
    """Slope of -log(error) against log(NFE), by least squares."""
    return float(-np.polyfit(np.log(nfes), np.log(errors), 1)[0])
