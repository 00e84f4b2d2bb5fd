"""Samplers compared step by step with reference implementations written here in NumPy.

The references follow k-diffusion's `sampling.py` (and ComfyUI's copy, for iPNDM) formula by
formula, in float64, with loops and Python branches instead of a scan. They draw the same
noise as sdjax by its documented contract (`sampler_utils.step_noise`): image b's noise at
step i is normal(fold_in(key_b, i)), folded once more with the stream for a second draw in
the same step. Both sides run on a nonlinear denoiser (the exact denoiser of a Gaussian
mixture); the state x and the denoiser output at every step must agree within 1e-4 (relative).
`test_the_tolerance_tells_neighbouring_samplers_apart` shows that tolerance catches the
mistakes that matter (3M run as 2M, the wrong noise, the wrong history).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.sampling.analytic import GaussianMixture, karras_sigmas
from sdjax.sampling.samplers import sample

MIXTURE = GaussianMixture.default(dim=4)
BATCH = 3
SIGMAS = karras_sigmas(8, 0.03, 10.0)  # ends in 0: the last step's special case is covered
TOL = 1e-4


def draw(keys, i, stream=0):
    """The noise sdjax draws for step i, from its contract, one image at a time (B, 4)."""
    out = []
    for b in range(BATCH):
        k = jax.random.fold_in(keys[b], i)
        if stream:
            k = jax.random.fold_in(k, stream)
        out.append(np.asarray(jax.random.normal(k, (4,), jnp.float32), np.float64))
    return np.stack(out)


def denoise(x, sigma):
    return MIXTURE._denoise_np(np.asarray(x, np.float64), float(sigma))


def ancestral(sigma_from, sigma_to, eta):
    """k-diffusion get_ancestral_step."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


# Each reference: (x, sigmas, noise(i, stream), record(x, denoised), **knobs) -> x.

def ref_euler_ancestral(x, sigmas, noise, record, eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        den = denoise(x, sigmas[i])
        record(x, den)
        down, up = ancestral(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - den) / sigmas[i] * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(i, 0) * s_noise * up
    return x


def ref_dpm_2_ancestral(x, sigmas, noise, record, eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        den = denoise(x, sigmas[i])
        record(x, den)
        down, up = ancestral(sigmas[i], sigmas[i + 1], eta)
        d = (x - den) / sigmas[i]
        if down == 0:
            x = x + d * (down - sigmas[i])
        else:
            mid = math.exp((math.log(sigmas[i]) + math.log(down)) / 2)
            x_2 = x + d * (mid - sigmas[i])
            d_2 = (x_2 - denoise(x_2, mid)) / mid
            x = x + d_2 * (down - sigmas[i]) + noise(i, 0) * s_noise * up
    return x


def ref_dpmpp_2s_ancestral(x, sigmas, noise, record, eta=1.0, s_noise=1.0):
    t_fn, sigma_fn = (lambda s: -math.log(s)), (lambda t: math.exp(-t))
    for i in range(len(sigmas) - 1):
        den = denoise(x, sigmas[i])
        record(x, den)
        down, up = ancestral(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + (x - den) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(down)
            h = t_next - t
            s = t + h / 2
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - math.expm1(-h / 2) * den
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - math.expm1(-h) * denoise(x_2, sigma_fn(s))
        if sigmas[i + 1] > 0:
            x = x + noise(i, 0) * s_noise * up
    return x


def brownian_step(noise, i, points):
    """A Brownian path over sigma within step i, at `points` (decreasing from the step's start):
    independent increments z_k sqrt(|dt|) (z_k the draw of stream k). Returns k-diffusion's
    BrownianTreeNoiseSampler for it: (a, b) -> (W(b) - W(a)) / sqrt(|b - a|)."""
    w = {points[0]: 0.0}
    for k, (a, b) in enumerate(zip(points[:-1], points[1:])):
        w[b] = w[a] + math.sqrt(a - b) * noise(i, k)

    def at(s):  # callers pass exp(-(-log sigma)), equal to a point up to rounding
        return w[min(w, key=lambda p: abs(p - s))]

    return lambda a, b: (at(b) - at(a)) / math.sqrt(abs(b - a))


def ref_dpmpp_sde(x, sigmas, noise, record, eta=1.0, s_noise=1.0, r=0.5, brownian=True):
    t_fn, sigma_fn = (lambda s: -math.log(s)), (lambda t: math.exp(-t))
    for i in range(len(sigmas) - 1):
        den = denoise(x, sigmas[i])
        record(x, den)
        if sigmas[i + 1] == 0:
            x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        path = brownian_step(noise, i, [sigmas[i], sigma_fn(s), sigmas[i + 1]])
        if not brownian:  # the mistake a reimplementation could make: two unrelated draws
            path = lambda a, b: noise(i, 0 if b != sigmas[i + 1] else 1)  # noqa: E731
        sd, su = ancestral(sigma_fn(t), sigma_fn(s), eta)
        s_ = t_fn(sd)
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - math.expm1(t - s_) * den
        x_2 = x_2 + path(sigma_fn(t), sigma_fn(s)) * s_noise * su
        den_2 = denoise(x_2, sigma_fn(s))
        sd, su = ancestral(sigma_fn(t), sigma_fn(t_next), eta)
        t_next_ = t_fn(sd)
        den_d = (1 - fac) * den + fac * den_2
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - math.expm1(t - t_next_) * den_d
        x = x + path(sigma_fn(t), sigma_fn(t_next)) * s_noise * su
    return x


def ref_dpmpp_2m_sde(x, sigmas, noise, record, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    old_den, h_last = None, None
    for i in range(len(sigmas) - 1):
        den = denoise(x, sigmas[i])
        record(x, den)
        if sigmas[i + 1] == 0:
            x = den
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * den
            if old_den is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r) * (den - old_den)
                else:
                    x = x + 0.5 * -math.expm1(-h - eta_h) * (1 / r) * (den - old_den)
            x = x + noise(i, 0) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old_den = den
    return x


def ref_dpmpp_3m_sde(x, sigmas, noise, record, eta=1.0, s_noise=1.0, max_order=3):
    den_1, den_2, h, h_1, h_2 = None, None, None, None, None
    for i in range(len(sigmas) - 1):
        den = denoise(x, sigmas[i])
        record(x, den)
        if sigmas[i + 1] == 0:
            x = den
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * den
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and max_order >= 3:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (den - den_1) / r0
                d1_1 = (den_1 - den_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (den - den_1) / (h_1 / h)
            x = x + noise(i, 0) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        den_1, den_2 = den, den_1
        h_1, h_2 = h, h_1
    return x


_AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ab_variable_weights(t, i, order):
    """Variable-step Adams-Bashforth weights (newest first, per unit step) from Newton's
    divided differences: integrate over [t_i, t_{i+1}] the interpolant of the slopes at
    t_i, t_{i-1}, ...; each weight is that integral's coefficient on one slope."""
    nodes = [t[i - k] for k in range(order)]
    h = t[i + 1] - t[i]
    # Newton basis prod_{m<j} (s - nodes[m]) integrated exactly on [t_i, t_i + h] (polynomial).
    weights = np.zeros(order)
    for j in range(order):
        poly = np.poly1d([1.0])
        for m in range(j):
            poly = poly * np.poly1d([1.0, -nodes[m]])
        integral = poly.integ()
        basis_integral = (integral(t[i + 1]) - integral(t[i])) / h
        # divided difference f[nodes[0..j]] = sum_k f(nodes[k]) / prod_{m != k} (nodes[k] - nodes[m])
        for k in range(j + 1):
            weights[k] += basis_integral / np.prod([nodes[k] - nodes[m] for m in range(j + 1) if m != k])
    return weights


def ref_ipndm(x, sigmas, noise, record, variable=False):
    """ComfyUI's sample_ipndm (max_order 4): Euler, then AB2..AB4 on the slopes in sigma, and
    the denoiser's x0 for the step to 0. `variable`: the exact variable-step weights."""
    slopes = []  # newest first
    for i in range(len(sigmas) - 1):
        den = denoise(x, sigmas[i])
        record(x, den)
        slopes.insert(0, (x - den) / sigmas[i])
        order = min(4, i + 1)
        w = ab_variable_weights(sigmas, i, order) if variable else _AB[order]
        if sigmas[i + 1] == 0:
            x = den
        else:
            x = x + (sigmas[i + 1] - sigmas[i]) * sum(c * d for c, d in zip(w, slopes))
        del slopes[3:]
    return x


REFERENCES = {
    "euler_ancestral": ref_euler_ancestral,
    "dpm_2_ancestral": ref_dpm_2_ancestral,
    "dpmpp_2s_ancestral": ref_dpmpp_2s_ancestral,
    "dpmpp_sde": ref_dpmpp_sde,
    "dpmpp_2m_sde": ref_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": lambda *a, **kw: ref_dpmpp_2m_sde(*a, solver_type="heun", **kw),
    "dpmpp_3m_sde": ref_dpmpp_3m_sde,
    "ipndm": ref_ipndm,
    "ipndm_v": lambda *a, **kw: ref_ipndm(*a, variable=True, **kw),
}


def _inputs(seed=0):
    keys = jax.random.split(jax.random.key(seed + 100), BATCH)
    x0 = MIXTURE.sample(jax.random.key(seed), (BATCH, 4))
    x_init = np.asarray(x0 + SIGMAS[0] * jax.random.normal(jax.random.key(seed + 1), (BATCH, 4)), np.float32)
    return keys, x_init


def run_reference(name, keys, x_init, sigmas=SIGMAS, **knobs):
    """(final x, [(x, denoised) at each step]) of the NumPy reference."""
    steps = []
    fn = REFERENCES[name]
    out = fn(np.asarray(x_init, np.float64), [float(s) for s in sigmas], lambda i, k: draw(keys, i, k),
             lambda x, d: steps.append((x, d)), **knobs)
    return out, steps


def run_sdjax(name, keys, x_init, sigmas=SIGMAS, **knobs):
    steps = []
    out = sample(name, MIXTURE.denoise, jnp.asarray(x_init), jnp.asarray(sigmas, jnp.float32),
                 None if name.startswith("ipndm") else keys,
                 callback=lambda i, x, x0, s: steps.append((int(i), np.asarray(x), np.asarray(x0))), **knobs)
    out = np.asarray(out)
    jax.effects_barrier()
    return out, [s[1:] for s in sorted(steps, key=lambda s: s[0])]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


CASES = [
    ("euler_ancestral", {}), ("euler_ancestral", {"eta": 0.6, "s_noise": 0.9}),
    ("dpm_2_ancestral", {}), ("dpm_2_ancestral", {"eta": 0.6, "s_noise": 0.9}),
    ("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.6, "s_noise": 0.9}),
    ("dpmpp_sde", {}), ("dpmpp_sde", {"eta": 0.6, "s_noise": 0.9, "r": 0.4}),
    ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"eta": 0.6, "s_noise": 0.9}), ("dpmpp_2m_sde_heun", {}),
    ("dpmpp_3m_sde", {}), ("dpmpp_3m_sde", {"eta": 0.6, "s_noise": 0.9}),
    ("ipndm", {}), ("ipndm_v", {}),
]


@pytest.mark.parametrize("name,knobs", CASES, ids=[f"{c[0]}-{len(c[1])}" for c in CASES])
def test_sampler_matches_reference_step_by_step(name, knobs):
    keys, x_init = _inputs()
    ref, ref_steps = run_reference(name, keys, x_init, **knobs)
    out, steps = run_sdjax(name, keys, x_init, **knobs)
    assert len(steps) == len(ref_steps) == len(SIGMAS) - 1
    for i, ((x, x0), (x_ref, x0_ref)) in enumerate(zip(steps, ref_steps)):
        assert rel(x, x_ref) < TOL, (name, i, "x", rel(x, x_ref))
        assert rel(x0, x0_ref) < TOL, (name, i, "x0_pred", rel(x0, x0_ref))
    assert rel(out, ref) < TOL, (name, "final", rel(out, ref))


def test_the_tolerance_tells_neighbouring_samplers_apart():
    """The mistakes the comparison is there to catch move the result by far more than TOL."""
    keys, x_init = _inputs()

    def final(name, **kw):
        return run_reference(name, keys, x_init, **kw)[0]

    pairs = [
        (final("dpmpp_3m_sde"), final("dpmpp_3m_sde", max_order=2)),  # 3M running as 2M
        (final("dpmpp_sde"), final("dpmpp_sde", brownian=False)),  # unrelated sub-step noises
        (final("dpmpp_2s_ancestral"), final("euler_ancestral")),  # no second-order correction
        (final("dpmpp_2m_sde"), final("dpmpp_2m_sde_heun")),  # the other solver_type
        (final("ipndm"), final("ipndm_v")),  # constant vs variable step weights
    ]
    for a, b in pairs:
        assert rel(a, b) > 30 * TOL, rel(a, b)
    # And the noise reaches the result: another key moves every stochastic sampler.
    other = jax.random.split(jax.random.key(999), BATCH)
    for name in ("dpmpp_sde", "dpmpp_3m_sde", "dpmpp_2s_ancestral"):
        assert rel(run_reference(name, other, x_init)[0], final(name)) > 30 * TOL


def test_variable_step_weights_integrate_polynomials_exactly():
    """ipndm_v's weights on a Karras grid: order p integrates slopes of degree < p exactly
    (the order conditions), and on uniform steps they are the constant AB weights."""
    from sdjax.sampling.samplers_multistep import _ab_variable

    t = karras_sigmas(10, 0.03, 10.0, zero=False)
    with jax.enable_x64(True):
        for i in range(1, 8):
            order = min(4, i + 1)
            w = np.asarray(_ab_variable(jnp.asarray(t), i))
            assert np.all(w[order:] == 0)
            np.testing.assert_allclose(w[:order], ab_variable_weights(t, i, order), rtol=1e-9, atol=1e-12)
            h = t[i + 1] - t[i]
            for k in range(order):
                exact = ((t[i + 1] - t[i]) ** (k + 1) / (k + 1)) / h
                got = sum(w[j] * (t[i - j] - t[i]) ** k for j in range(order))
                np.testing.assert_allclose(got, exact, rtol=1e-9, atol=1e-12)
        u = np.linspace(10.0, 1.0, 8)
        np.testing.assert_allclose(np.asarray(_ab_variable(jnp.asarray(u), 5)), _AB[4], rtol=1e-9)
