"""Samplers on the analytic problem: convergence orders, noise contract, no recompilation,
batch invariance, callbacks, and the error-vs-NFE plot script."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.sampling.analytic import Gaussian, GaussianMixture, convergence, karras_sigmas, measured_order
from sdjax.sampling.samplers import sample

ROOT = Path(__file__).resolve().parents[1]
GAUSS = Gaussian(0.3, 0.5)
MIXTURE = GaussianMixture.default(dim=2)

# (name, lowest and highest accepted order) measured over NFE in the asymptotic range.
ORDERS = [("euler", 0.8, 1.2), ("heun", 1.7, 2.4), ("dpm_2", 1.7, 2.4), ("dpmpp_2m", 1.7, 2.4),
          ("lms", 2.5, 5.0), ("unipc", 2.5, 4.5), ("unipc_bh2", 2.5, 4.5), ("ipndm_v", 2.5, 5.0),
          # iPNDM's constant AB4 weights are exact only for uniform steps; a Karras schedule's
          # step ratios drift by O(1/N), which leaves an O(h^3) local error: 2nd order (2.1).
          ("ipndm", 1.7, 2.5)]


@pytest.mark.parametrize("name,lo,hi", ORDERS, ids=[o[0] for o in ORDERS])
def test_measured_order_on_gaussian(name, lo, hi):
    nfes, errors = convergence(name, GAUSS, [16, 32, 64], batch=8)
    order = measured_order(nfes, errors)
    assert lo <= order <= hi, (name, order, nfes, errors)


def test_ipndm_is_fourth_order_on_uniform_steps():
    """Where its constant weights are the right ones (uniform steps in sigma, rho = 1) iPNDM
    converges at the order of AB4 (its Euler/AB2/AB3 warm-up is at large sigma, where the flow
    is nearly straight); a wrong weight table would drop it to 1st or 2nd order here."""
    nfes, errors = convergence("ipndm", GAUSS, [32, 64, 128], batch=8, rho=1.0)
    order = measured_order(nfes, errors)
    assert 3.0 <= order <= 5.0, (order, nfes, errors)


def test_nfe_counts_and_mixture_orders():
    # Heun and DPM2 spend 2 evaluations a step, PLMS one extra for its first step.
    assert convergence("heun", GAUSS, [5], batch=2)[0] == [10]
    assert convergence("plms", GAUSS, [5], batch=2)[0] == [6]
    for name, lo in (("euler", 0.8), ("dpmpp_2m", 1.7)):
        order = measured_order(*convergence(name, MIXTURE, [16, 32, 64], batch=4))
        assert order >= lo, (name, order)


def test_gaussian_exact_flow_and_mixture_reference():
    # The closed form solves the ODE: its sigma-derivative matches (x - D(x, sigma)) / sigma.
    x = np.linspace(-3, 3, 7)[None]
    s, ds = 2.0, 1e-6
    deriv = (GAUSS.ode_solution(x, s, s + ds) - GAUSS.ode_solution(x, s, s - ds)) / (2 * ds)
    np.testing.assert_allclose(deriv, (x - np.asarray(GAUSS.denoise(x, s))) / s, rtol=1e-6)
    # A one-component mixture is a Gaussian: the RK4 reference must reproduce the closed form.
    single = GaussianMixture(means=np.full((1, 3), 0.3), stds=np.array([0.5]), weights=np.array([1.0]))
    x = np.random.default_rng(0).normal(size=(4, 3)) * 10
    np.testing.assert_allclose(single.ode_solution(x, 10.0, 0.0), GAUSS.ode_solution(x, 10.0, 0.0), atol=1e-8)
    np.testing.assert_allclose(np.asarray(single.denoise(jnp.asarray(x), 1.5)),
                               np.asarray(GAUSS.denoise(jnp.asarray(x), 1.5)), rtol=1e-5)


def test_convergence_reuses_the_exact_flow_only_for_the_same_problem_and_start():
    """convergence() remembers exact flows (the mixture's RK4 reference is its costliest part)
    and runs all step counts in one program: the same numbers as each step count on its own,
    and a problem, start or sigma range that differs in any way gets its own flow."""
    from sdjax.sampling import analytic

    mixture = GaussianMixture.default(dim=2)
    moved = GaussianMixture(means=mixture.means + 1e-3, stds=mixture.stds, weights=mixture.weights)
    together = convergence("dpmpp_2m", mixture, [4, 8], batch=4)
    alone = [convergence("dpmpp_2m", mixture, [n], batch=4) for n in (4, 8)]
    assert together == ([a[0][0] for a in alone], [a[1][0] for a in alone])
    x = np.random.default_rng(1).normal(size=(4, 2)) * 20
    for problem, start, ends in ((mixture, x, (20.0, 0.02)), (moved, x, (20.0, 0.02)),
                                 (mixture, x + 1e-9, (20.0, 0.02)), (mixture, x, (20.0, 0.03)),
                                 (GAUSS, x, (20.0, 0.02)), (Gaussian(0.3, 0.6), x, (20.0, 0.02))):
        for _ in range(2):  # computed, then remembered: both equal to a fresh solution
            np.testing.assert_array_equal(analytic._exact_flow(problem, start, *ends),
                                          problem.ode_solution(start, *ends))
    # The remembered array is not handed out: a caller changing it changes nothing stored.
    analytic._exact_flow(mixture, x, 20.0, 0.02)[:] = 0.0
    np.testing.assert_array_equal(analytic._exact_flow(mixture, x, 20.0, 0.02), mixture.ode_solution(x, 20.0, 0.02))


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def test_traced_knobs_and_sigmas_do_not_recompile():
    den = MIXTURE.denoise
    x = jnp.ones((2, 2)) * 5.0
    sigmas = jnp.asarray(karras_sigmas(6, 0.03, 10.0))

    @jax.jit
    def run_ancestral(x, sigmas, key, eta, s_noise):
        return sample("euler_ancestral", den, x, sigmas, key, eta=eta, s_noise=s_noise)

    @jax.jit
    def run_churn(x, sigmas, key, s_churn, s_tmin, s_tmax, s_noise):
        return sample("euler", den, x, sigmas, key, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)

    @jax.jit
    def run_sde(x, sigmas, key, eta, s_noise, r):
        return sample("dpmpp_sde", den, x, sigmas, key, eta=eta, s_noise=s_noise, r=r)

    outs = [
        run_ancestral(x, sigmas, _keys(2), 1.0, 1.0),
        run_ancestral(x, sigmas * 1.1, _keys(2), 1.0, 1.0),
        run_ancestral(x, sigmas, _keys(2, seed=1), 1.0, 1.0),
        run_ancestral(x, sigmas, _keys(2), 0.5, 1.0),
        run_ancestral(x, sigmas, _keys(2), 1.0, 0.8),
    ]
    # Every change reached the result, and none compiled again.
    for a in outs[1:]:
        assert not np.allclose(outs[0], a)
    assert run_ancestral._cache_size() == 1
    a = run_churn(x, sigmas, _keys(2), 0.0, 0.0, 1e9, 1.0)
    b = run_churn(x, sigmas, _keys(2), 4.0, 0.0, 1e9, 1.0)
    c = run_churn(x, sigmas, _keys(2), 4.0, 0.0, 0.5, 1.0)
    assert not np.allclose(a, b) and not np.allclose(b, c)
    assert run_churn._cache_size() == 1
    run_sde(x, sigmas, _keys(2), 1.0, 1.0, 0.5)
    run_sde(x, sigmas * 0.9, _keys(2, 3), 0.3, 0.9, 0.4)
    assert run_sde._cache_size() == 1


STOCHASTIC = [("euler_ancestral", {}), ("dpm_2_ancestral", {}), ("dpmpp_2s_ancestral", {}),
              ("dpmpp_sde", {}), ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde_heun", {}), ("dpmpp_3m_sde", {}),
              ("ddpm", {}), ("ddim", {"eta": 0.5}), ("lcm", {}), ("euler", {"s_churn": 2.0})]


@pytest.mark.parametrize("name,knobs", STOCHASTIC, ids=[s[0] for s in STOCHASTIC])
def test_batch_invariance(name, knobs):
    """Image i of a batch of 4 equals the same key run alone: noise never depends on the batch."""
    sigmas = jnp.asarray(karras_sigmas(6, 0.03, 10.0))
    keys = _keys(4, seed=5)
    x = MIXTURE.sample(jax.random.key(1), (4, 2)) + 10.0 * jax.random.normal(jax.random.key(2), (4, 2))
    run = jax.jit(lambda x, s, k: sample(name, MIXTURE.denoise, x, s, k, **knobs))  # one compile per shape
    batch = np.asarray(run(x, sigmas, keys))
    for i in (0, 3):
        alone = np.asarray(run(x[i:i + 1], sigmas, keys[i:i + 1]))
        np.testing.assert_allclose(batch[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    other = np.asarray(run(x, sigmas, _keys(4, seed=6)))
    assert not np.allclose(batch, other), "the key must change the result"


# Euler-ancestral steps (and DDPM, the same step) are first order in distribution: at 40
# steps their std is ~10% low (0.45; 0.48 at 150 steps); the 2nd-order ones are within 3%.
DISTRIBUTION = [("euler_ancestral", 0.07), ("ddpm", 0.07), ("dpm_2_ancestral", 0.03),
                ("dpmpp_2s_ancestral", 0.03), ("dpmpp_sde", 0.03), ("dpmpp_2m_sde", 0.03), ("dpmpp_3m_sde", 0.03)]


@pytest.mark.parametrize("name,std_tol", DISTRIBUTION, ids=[d[0] for d in DISTRIBUTION])
def test_stochastic_samplers_sample_the_data_distribution(name, std_tol):
    """With the exact denoiser, SDE samplers draw from N(0.3, 0.5^2): checks noise scaling."""
    n = 4000
    sigmas = jnp.asarray(karras_sigmas(40, 0.01, 40.0))
    x = 40.0 * jax.random.normal(jax.random.key(3), (n, 1))
    out = np.asarray(sample(name, GAUSS.denoise, x, sigmas, _keys(n, seed=9)))
    assert abs(out.mean() - 0.3) < 0.03 and abs(out.std() - 0.5) < std_tol, (out.mean(), out.std())


def test_eta_zero_reduces_to_the_ode_solver():
    sigmas = jnp.asarray(karras_sigmas(8, 0.03, 10.0))
    x = 10.0 * jax.random.normal(jax.random.key(4), (3, 2))
    keys = _keys(3)
    pairs = [("dpmpp_2m_sde", "dpmpp_2m"), ("euler_ancestral", "euler"), ("ddim", "euler")]
    for sde, ode in pairs:
        a = sample(sde, MIXTURE.denoise, x, sigmas, keys, eta=0.0)
        b = sample(ode, MIXTURE.denoise, x, sigmas, None)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_callback_per_step_and_none_stages_nothing():
    sigmas = jnp.asarray(karras_sigmas(5, 0.03, 10.0))
    x = jnp.ones((2, 2))
    seen = []
    sample("dpmpp_2m", MIXTURE.denoise, x, sigmas, None,
           callback=lambda i, x, x0, s: seen.append((int(i), x.shape, x0.shape, float(s))))
    jax.effects_barrier()
    assert [s[0] for s in seen] == list(range(5))
    assert all(s[1] == s[2] == (2, 2) for s in seen)
    np.testing.assert_allclose([s[3] for s in seen], np.asarray(sigmas[:-1]), rtol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda x, s: sample("dpmpp_2m", MIXTURE.denoise, x, s, None))(x, sigmas))
    assert "callback" not in jaxpr


def test_plot_script_writes_png(tmp_path):
    out = tmp_path / "order.png"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_sampler_order.py"), "--out", str(out),
                    "--steps", "3,6", "--samplers", "euler,heun", "--batch", "4"],
                   check=True, cwd=ROOT, timeout=600, capture_output=True)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
