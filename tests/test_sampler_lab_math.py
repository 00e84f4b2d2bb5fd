"""The new samplers' math: measured orders against theory on the analytic problem, the adaptive
solver's tolerance and step counts, step-level parity of DEIS, RES multistep and SA-Solver with
NumPy references written here from the formulas (UniPC's parity with diffusers is in
tests/test_samplers.py), and the Brownian-tree noise."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.sampling.analytic import Gaussian, GaussianMixture, convergence, measured_order
from sdjax.sampling.sampler_utils import brownian_point, make_noise
from sdjax.sampling.samplers import DETERMINISTIC_SAMPLERS, sample
from sdjax.sampling.samplers_adaptive import sample_dpm_adaptive
from test_sampler_reference import SIGMAS, _inputs, ancestral, denoise, rel, run_reference, run_sdjax, TOL, REFERENCES

GAUSS = Gaussian(0.3, 0.5)

# Theoretical order of every sampler that is deterministic with its default knobs, and of the
# stochastic ones run deterministically (eta = 0). On a Karras schedule (step ratios drifting by
# O(1/N)), methods with constant uniform-step Adams weights (PLMS, iPNDM) are 2nd order whatever
# their nominal 4th (see samplers_multistep.sample_ipndm); UniPC-2 with its corrector is 3rd;
# heunpp2's slope weights sum to 1 but are not Heun's, so it is 1st; gradient estimation's
# extrapolated slope d + (gamma - 1)(d - d_prev) is not Adams-Bashforth's, so 1st.
THEORY = {
    "euler": 1, "heun": 2, "dpm_2": 2, "lms": 4, "dpmpp_2m": 2, "ddim": 1, "plms": 2, "ipndm": 2,
    "ipndm_v": 4, "unipc": 3, "unipc_bh2": 3, "heunpp2": 1, "deis": 3, "dpm_fast": 3, "euler_cfg_pp": 1,
    "dpmpp_2m_cfg_pp": 2, "res_multistep": 2, "res_multistep_cfg_pp": 2, "gradient_estimation": 1,
    "gradient_estimation_cfg_pp": 1,
}
ODE_KNOBS = {"seeds_2": ({"eta": 0.0}, 2), "seeds_3": ({"eta": 0.0}, 3), "sa_solver": ({"eta": 0.0}, 4),
             "sa_solver_pece": ({"eta": 0.0}, 4)}
# The 4th-order methods reach their asymptotic range later.
STEPS = {"lms": [64, 128, 256], "ipndm_v": [64, 128, 256], "sa_solver": [16, 32, 64],
         "sa_solver_pece": [16, 32, 64]}
ORDER_CASES = [(n, {}, o) for n, o in THEORY.items()] + [(n, k, o) for n, (k, o) in ODE_KNOBS.items()]


def test_every_deterministic_sampler_has_a_theoretical_order():
    # dpm_adaptive chooses its own steps: tested on a tolerance below instead.
    assert set(DETERMINISTIC_SAMPLERS) == set(THEORY)


@pytest.mark.parametrize("name,knobs,order", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_measured_order_matches_theory(name, knobs, order):
    nfes, errors = convergence(name, GAUSS, STEPS.get(name, [32, 64, 128]), batch=4, **knobs)
    measured = measured_order(nfes, errors)
    assert abs(measured - order) <= 0.3, (name, measured, nfes, errors)


def test_dpm_adaptive_hits_the_tolerance_and_reports_its_steps():
    mixture = GaussianMixture.default(dim=2)
    with jax.enable_x64(True):
        x0 = mixture.sample(jax.random.key(0), (16, 2))
        x = x0 + 20.0 * jax.random.normal(jax.random.key(1), x0.shape, jnp.float64)
        sigmas = jnp.asarray([20.0, 0.02, 0.0])  # adaptive: only the ends count
        exact = mixture.ode_solution(np.asarray(x), 20.0, 0.02)
        run = jax.jit(lambda x, s, tol: sample_dpm_adaptive(mixture.denoise, x, s, rtol=tol, atol=tol,
                                                            return_info=True))
        nfes = []
        for tol in (1e-3, 1e-4, 1e-5):
            out, info = run(x, sigmas, tol)
            assert np.abs(np.asarray(out) - exact).max() <= 3 * tol, tol
            assert float(info["t_reached"]) == pytest.approx(float(info["t_end"]))
            assert int(info["nfe"]) == 3 * (int(info["n_accept"]) + int(info["n_reject"]))
            nfes.append(int(info["nfe"]))
        assert run._cache_size() == 1  # the tolerance is traced
        assert nfes[0] < nfes[1] < nfes[2]
        # The step cap: order 2 at 1e-5 needs more than 100 attempts, and stops there.
        out, info = sample_dpm_adaptive(mixture.denoise, x, sigmas, rtol=1e-5, atol=1e-5, order=2,
                                        max_steps=100, return_info=True)
        assert int(info["n_accept"]) + int(info["n_reject"]) == 100
        assert float(info["t_reached"]) < float(info["t_end"])


# ---- NumPy references, step by step (the harness of tests/test_sampler_reference.py) ------

_BETA_D = 2 * (math.log(0.002**2 + 1) / 1e-3 - math.log(80.0**2 + 1)) / (1e-3 - 1)
_BETA_MIN = math.log(80.0**2 + 1) - 0.5 * _BETA_D


def ref_deis(x, sigmas, noise, record, max_order=3):
    """ComfyUI's sample_deis / deis.get_deis_coeff_list ('tab'): VP times of the EDM sigmas,
    coefficients int L_j(tau) (-1/2 dlog(alpha)/dtau / sqrt(alpha (1 - alpha))) dtau by a
    20000-point midpoint rule."""
    taus = [(math.sqrt(_BETA_MIN**2 + 2 * _BETA_D * math.log(s**2 + 1)) - _BETA_MIN) / _BETA_D for s in sigmas]
    b0, b1 = _BETA_MIN, _BETA_D + _BETA_MIN
    ds = []
    for i in range(len(sigmas) - 1):
        d0 = denoise(x, sigmas[i])
        record(x, d0)
        d = (x - d0) / sigmas[i]
        order = min(max_order, i + 1)
        if sigmas[i + 1] <= 0 or order == 1:
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            n = 20000
            edges = np.linspace(taus[i], taus[i + 1], n + 1)
            tau = (edges[:-1] + edges[1:]) / 2
            alpha = np.exp(-0.5 * tau**2 * (b1 - b0) - tau * b0)
            integrand = -0.5 * (-tau * (b1 - b0) - b0) / np.sqrt(alpha * (1 - alpha))
            prev = [taus[i - k] for k in range(order)]
            x_next = x.copy()
            for j in range(order):
                poly = np.ones_like(tau)
                for k in range(order):
                    if k != j:
                        poly *= (tau - prev[k]) / (prev[j] - prev[k])
                coeff = np.sum(integrand * poly) * (edges[1] - edges[0])
                x_next = x_next + coeff * (d if j == 0 else ds[-j])
        ds.append(d)
        x = x_next
    return x


def ref_res_multistep(x, sigmas, noise, record, eta=0.0, s_noise=1.0):
    """ComfyUI's res_multistep (cfg_pp=False) in sigma space."""
    old_x0, old_sigma_down = None, None
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        record(x, x0)
        sigma_down, sigma_up = ancestral(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0 or old_x0 is None:
            x = x + (x - x0) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = (-math.log(s) for s in (sigmas[i], old_sigma_down, sigma_down, sigmas[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            x = math.exp(-h) * x + h * (b1 * x0 + b2 * old_x0)
        if sigmas[i + 1] > 0 and eta:
            x = x + noise(i, 0) * s_noise * sigma_up
        old_x0, old_sigma_down = x0, sigma_down
    return x


def _sa_b(sigma_next, lams, lam_s, lam_t, tau):
    """SA-Solver's b coefficients (ComfyUI sa_solver.compute_stochastic_adams_b_coeffs)."""
    p = len(lams)
    tau_mul = 1 + tau**2
    h = lam_t - lam_s
    prod = np.array([lam_t**k - lam_s**k * math.exp(-tau_mul * h) for k in range(p)])
    mat = np.zeros((p, p))
    for a in range(p):
        for b in range(a + 1):
            mat[a, b] = math.exp(math.lgamma(a + 1) - math.lgamma(b + 1) - (a - b) * math.log(tau_mul)) * (-1) ** (a - b)
    coeffs = mat @ prod
    vander_t = np.vander(np.asarray(lams), p, increasing=True).T
    return sigma_next * math.exp(lam_t) * np.linalg.solve(vander_t, coeffs)


def ref_sa_solver(x, sigmas, noise, record, eta=1.0, s_noise=1.0, use_pece=False):
    """ComfyUI's sample_sa_solver (predictor 3, corrector 4, tau = eta on [0.5712, 5.0924])."""
    lams = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    tau_func = lambda s: eta if 5.0924 >= s >= 0.5712 else 0.0  # noqa: E731
    x_pred, h, tau_t, nz, preds = x, 0.0, 0.0, 0.0, []
    n = len(sigmas) - 1
    for i in range(n):
        x0 = denoise(x_pred, sigmas[i])
        record(x_pred, x0)
        preds = (preds + [x0])[-4:]
        p_used = min(3, len(preds))
        c_used = 0 if i == 0 or (sigmas[i + 1] == 0 and not use_pece) else min(4, len(preds))
        p_used, c_used = min(p_used, n - 1 - i), min(c_used, n - i)
        if c_used == 0:
            x = x_pred
        else:
            b = _sa_b(sigmas[i], lams[i - c_used + 1:i + 1], lams[i - 1], lams[i], tau_t)
            x = sigmas[i] / sigmas[i - 1] * math.exp(-(tau_t**2) * h) * x + sum(
                bk * pk for bk, pk in zip(b, preds[-c_used:]))
            if tau_t > 0:
                x = x + nz
            if use_pece:
                x0 = denoise(x, sigmas[i])
                preds[-1] = x0
        if sigmas[i + 1] == 0:
            x_pred = x0
        else:
            tau_t = tau_func(sigmas[i + 1])
            b = _sa_b(sigmas[i + 1], lams[i - p_used + 1:i + 1], lams[i], lams[i + 1], tau_t)
            h = lams[i + 1] - lams[i]
            x_pred = sigmas[i + 1] / sigmas[i] * math.exp(-(tau_t**2) * h) * x + sum(
                bk * pk for bk, pk in zip(b, preds[-p_used:]))
            if tau_t > 0:
                nz = noise(i, 0) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * tau_t**2 * h)) * s_noise
                x_pred = x_pred + nz
    return x_pred


REFERENCES.update({
    "deis": ref_deis, "res_multistep": ref_res_multistep,
    "res_multistep_ancestral": lambda *a, **kw: ref_res_multistep(*a, **{"eta": 1.0, **kw}),
    "sa_solver": ref_sa_solver,
})
PARITY = [("deis", {}), ("deis", {"max_order": 2}), ("res_multistep", {}), ("res_multistep_ancestral", {}),
          ("res_multistep_ancestral", {"eta": 0.5, "s_noise": 0.8}), ("sa_solver", {}),
          ("sa_solver", {"eta": 0.0}), ("sa_solver", {"eta": 0.7, "s_noise": 0.9})]


@pytest.mark.parametrize("name,knobs", PARITY, ids=[f"{c[0]}-{len(c[1])}" for c in PARITY])
def test_new_sampler_matches_reference_step_by_step(name, knobs):
    keys, x_init = _inputs()
    ref, ref_steps = run_reference(name, keys, x_init, **knobs)
    out, steps = run_sdjax(name, keys, x_init, **knobs)
    assert len(steps) == len(ref_steps) == len(SIGMAS) - 1
    for i, ((x, x0), (x_ref, x0_ref)) in enumerate(zip(steps, ref_steps)):
        assert rel(x, x_ref) < TOL, (name, i, "x", rel(x, x_ref))
        assert rel(x0, x0_ref) < TOL, (name, i, "x0_pred", rel(x0, x0_ref))
    assert rel(out, ref) < TOL, (name, "final", rel(out, ref))


def test_parity_tolerance_tells_deis_orders_and_sa_noise_apart():
    keys, x_init = _inputs()
    out, _ = run_sdjax("deis", keys, x_init, max_order=2)
    assert rel(out, run_reference("deis", keys, x_init)[0]) > 10 * TOL
    out, _ = run_sdjax("sa_solver", keys, x_init, eta=0.0)
    assert rel(out, run_reference("sa_solver", keys, x_init)[0]) > 10 * TOL


# ---- Brownian-tree noise -----------------------------------------------------------------

def test_brownian_increments_have_the_law_of_one_brownian_path():
    """Normalised increments over [0.5, 1] and [1, 3] are independent N(0, 1); the increment over
    [0.5, 3] is their sqrt-weighted sum, and W(1) is the same value whoever asks."""
    keys = jax.random.split(jax.random.key(0), 4000)
    point = jax.vmap(lambda k, t: brownian_point(k, t, 0.1, 10.0, ()), in_axes=(0, None))
    w05, w1, w3 = (np.asarray(point(keys, jnp.float32(t)), np.float64) for t in (0.5, 1.0, 3.0))
    a, b = (w1 - w05) / math.sqrt(0.5), (w3 - w1) / math.sqrt(2.0)
    for z in (a, b, (w3 - w05) / math.sqrt(2.5)):
        assert abs(z.mean()) < 0.06 and abs(z.std() - 1) < 0.04
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
    # Overlapping intervals [0.5, 3] and [1, 3]: correlation sqrt(2 / 2.5).
    assert abs(np.corrcoef((w3 - w05), (w3 - w1))[0, 1] - math.sqrt(2 / 2.5)) < 0.03


def test_noise_type_is_traced_and_changes_the_noise():
    sigmas = jnp.asarray(SIGMAS, jnp.float32)
    keys = jax.random.split(jax.random.key(3), 2)
    x = jnp.ones((2, 4)) * 5.0
    run = jax.jit(lambda x, k, nt: sample("dpmpp_2m_sde", denoise_jax, x, sigmas, k, noise_type=nt))
    a = run(x, keys, jnp.int32(0))
    b = run(x, keys, jnp.int32(1))
    assert run._cache_size() == 1 and not np.allclose(a, b)
    # 0 is the default Gaussian noise, the same numbers as noise_type="gaussian".
    np.testing.assert_allclose(a, sample("dpmpp_2m_sde", denoise_jax, x, sigmas, keys), rtol=1e-6)
    noise = make_noise(keys, sigmas, (4,), jnp.float32, "brownian")
    # Sub-intervals' increments add up to the whole interval's (the tree is one path).
    s0, s1, s2 = sigmas[1], (sigmas[1] + sigmas[2]) / 2, sigmas[2]
    whole = noise(0, s0, s2) * jnp.sqrt(s0 - s2)
    parts = noise(0, s0, s1) * jnp.sqrt(s0 - s1) + noise(5, s1, s2) * jnp.sqrt(s1 - s2)
    np.testing.assert_allclose(whole, parts, rtol=1e-4, atol=1e-5)


def denoise_jax(x, sigma):
    return GaussianMixture.default(dim=4).denoise(x, sigma)
