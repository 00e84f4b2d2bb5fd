"""Shared pieces of the samplers: per-image noise, the scan driver, ancestral steps.

Conventions used by every sampler (k-diffusion's): `x` is the sample in "VE" scaling,
x = x0 + sigma * eps, layout (B, ...) (NHWC latents or anything else with a leading batch
axis); `sigma` is the noise level (the standard deviation of the added noise, no unit);
a denoiser is `denoise(x, sigma) -> x0_pred` with `sigma` a 0-d float array.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
# callback(i, x, x0_pred, sigma): host-side progress/preview hook.
Callback = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], None]


def as_keys(key, batch: int):
    """A typed key array of shape (batch,), or None. Raw uint32 keys (batch, 2) are wrapped."""
    if key is None:
        return None
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape != (batch,):
        raise ValueError(
            f"key must be a typed key array of shape (B,) = ({batch},), one key per image; "
            f"got shape {key.shape}. Use jax.random.split(key, B) or one key per seed."
        )
    return key


def step_noise(keys: jax.Array, step, shape, dtype=jnp.float32, stream: int = 0) -> jax.Array:
    """Standard normal noise (B, *shape) for one sampler step.

    Image b's noise depends only on keys[b] and the step index (and `stream`, for samplers
    that draw twice per step): normal(fold_in(keys[b], step)), with a further
    fold_in(., stream) for stream > 0. Drawn in float32 then cast, so the values do not
    depend on the compute dtype, the batch size or the device count.
    """

    def one(k):
        k = jax.random.fold_in(k, step)
        if stream:
            k = jax.random.fold_in(k, stream)
        return jax.random.normal(k, tuple(shape), jnp.float32)

    return jax.vmap(one)(keys).astype(dtype)


def require_keys(keys, name: str):
    if keys is None:
        raise ValueError(f"sampler {name!r} is stochastic: pass `key`, a typed key array of shape (B,)")
    return keys


def sampler_noise(key, x, sigmas, noise_type, name: str):
    """The per-step noise function of a stochastic sampler `name` for latents like x: one key per
    image (required), noise of `noise_type` over `sigmas` (`make_noise`)."""
    keys = require_keys(as_keys(key, x.shape[0]), name)
    return make_noise(keys, sigmas, x.shape[1:], x.dtype, noise_type)


def is_literal_zero(v) -> bool:
    """True for a Python/NumPy number equal to 0 (a traced value is never known to be 0)."""
    return isinstance(v, (int, float)) and v == 0


def setup(denoise: Denoiser, x_init, sigmas):
    """Common preparation: compute dtype, a dtype-stable denoiser, sigmas in that dtype.

    Sampling math runs in float32 (float64 under x64) whatever the latent dtype: latents
    are small and the multistep coefficients are sensitive to rounding.
    """
    x_init = jnp.asarray(x_init)
    # float32, or float64 for float64 latents (x64): never narrower than float32.
    dtype = x_init.dtype if x_init.dtype == jnp.float64 else jnp.dtype(jnp.float32)
    sigmas = jnp.asarray(sigmas, dtype)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must have shape (steps + 1,) with steps >= 1; got {sigmas.shape}")

    def model(x, sigma):
        return jnp.asarray(denoise(x, sigma)).astype(dtype)

    return x_init.astype(dtype), sigmas, model, dtype


def per_step_inputs(sigmas):
    """Scanned inputs: step index, sigma, sigma_next and the two previous sigmas.

    Missing history (i < 1, i < 2) repeats sigmas[0]; multistep samplers only read it
    after their warm-up, so the placeholder never reaches a result.
    """
    n = sigmas.shape[0] - 1
    head = jnp.repeat(sigmas[:1], 2)
    padded = jnp.concatenate([head, sigmas])
    return {
        "i": jnp.arange(n, dtype=jnp.int32),
        "sigma": sigmas[:-1],
        "sigma_next": sigmas[1:],
        "sigma_prev": padded[1 : n + 1],
        "sigma_prev2": padded[:n],
    }


def run(step, carry, sigmas):
    """Scans `step(carry, inputs) -> carry` over the steps; returns the final carry.

    A step that does not lower sigma (sigma_next >= sigma) is skipped: the carry passes
    through unchanged and the denoiser is not called. Such steps carry no work (an ODE step
    of length 0), and skipping them lets `from_step` start a sampler at a traced step index
    by padding the schedule with its last sigma, at a fixed shape (img2img strength).
    """

    def body(c, inp):
        active = inp["sigma_next"] < inp["sigma"]
        return jax.lax.cond(active, step, lambda c_, _: c_, c, inp), None

    carry, _ = jax.lax.scan(body, carry, per_step_inputs(sigmas))
    return carry


def active_steps(sigmas):
    """The number of steps that lower sigma (a traced int32): the steps `run` executes."""
    return jnp.sum(sigmas[1:] < sigmas[:-1]).astype(jnp.int32)


def from_step(sigmas, start):
    """sigmas[start:] padded with its last value to the same shape (steps + 1,).

    `start` may be traced (0 <= start < steps): running a sampler on the result equals
    running it on sigmas[start:], because `run` skips the padding's zero-length steps.
    """
    n = sigmas.shape[0] - 1
    idx = jnp.minimum(jnp.arange(n + 1) + jnp.asarray(start, jnp.int32), n)
    return jnp.take(sigmas, idx)


def emit(callback, i, x, x0_pred, sigma):
    """Host callback for progress/previews; nothing is staged when callback is None."""
    if callback is not None:
        jax.debug.callback(callback, i, x, x0_pred, sigma)


def to_d(x, sigma, x0_pred):
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - x0_pred) / sigma


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to.

    Deterministic move to sigma_down, then fresh noise of std sigma_up, with
    sigma_down^2 + sigma_up^2 = sigma_to^2; eta = 1 is the DDPM posterior, eta = 0 is DDIM.
    """
    var = sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2
    sigma_up = jnp.minimum(sigma_to, eta * jnp.sqrt(jnp.maximum(var, 0.0)))
    sigma_down = jnp.sqrt(jnp.maximum(sigma_to**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


def log_sigma(sigma):
    """log(sigma) with sigma = 0 mapped to a finite stand-in (callers select it away)."""
    return jnp.log(jnp.where(sigma > 0, sigma, 1.0))


# ---- interval noise: Gaussian per step, or a Brownian tree over sigma ----------------------

NOISE_TYPES = ("gaussian", "brownian")
# The tree's keys are fold_in(key, _TREE_KEY + stream), far from the step indices step_noise uses.
_TREE_KEY = 1 << 30


def noise_flag(noise_type):
    """1 for "brownian", 0 for "gaussian": a Python int for a string, else the traced value
    (0/1, so a compiled function can switch noise type without recompiling)."""
    if isinstance(noise_type, str):
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type must be one of {NOISE_TYPES}, not {noise_type!r}")
        return NOISE_TYPES.index(noise_type)
    return jnp.asarray(noise_type)


def brownian_point(key, t, t_lo, t_hi, shape, depth: int = 20):
    """W(t) of a Brownian motion on [t_lo, t_hi] with W(t_lo) = 0, a pure function of (key, t).

    The construction (a fixed dyadic Brownian tree, as torchsde's BrownianTree / k-diffusion's
    BrownianTreeNoiseSampler, without their cache): W(t_hi) = sqrt(t_hi - t_lo) z_0; the value at
    the midpoint m of a node [a, b] is the Brownian bridge draw
        W(m) = (W(a) + W(b)) / 2 + sqrt((b - a) / 4) z_n,
    with z_n = normal(fold_in(key, n)) for heap-numbered nodes (root 1, children 2n, 2n + 1).
    W(t) descends `depth` levels to the leaf holding t, then interpolates linearly in the leaf.
    Every query sees the same z_n, so answers for different t are jointly those of one Brownian
    path: exactly at the 2^depth dyadic points, and in between with a variance deficit of at most
    (t_hi - t_lo) / 2^(depth + 2) (depth 20 on sigma in [0.03, 15]: 4e-6, against step increments
    of 1e-3 and more).
    """
    t = jnp.clip(t, t_lo, t_hi)
    w_hi = jnp.sqrt(t_hi - t_lo) * jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)

    def level(_, carry):
        a, b, wa, wb, node = carry
        m = (a + b) / 2
        z = jax.random.normal(jax.random.fold_in(key, node), shape, jnp.float32)
        wm = (wa + wb) / 2 + jnp.sqrt(jnp.maximum(b - a, 0.0) / 4) * z
        left = t < m
        return (jnp.where(left, a, m), jnp.where(left, m, b), jnp.where(left, wa, wm),
                jnp.where(left, wm, wb), 2 * node + jnp.where(left, 0, 1).astype(node.dtype))

    zero = jnp.zeros(shape, jnp.float32)
    a, b, wa, wb, _ = jax.lax.fori_loop(0, depth, level, (t_lo, t_hi, zero, w_hi, jnp.uint32(1)))
    frac = jnp.where(b > a, (t - a) / jnp.where(b > a, b - a, 1.0), 0.0)
    return wa + frac * (wb - wa)


def make_noise(keys, sigmas, shape, dtype, noise_type="gaussian"):
    """`noise(i, sigma_from, sigma_to, stream=0) -> (B, *shape)` standard normal noise for the
    interval [sigma_to, sigma_from] of step i.

    "gaussian": `step_noise(keys, i, ...)`, fresh per step and stream. "brownian": the normalised
    increment (W(sigma_from) - W(sigma_to)) / sqrt(sigma_from - sigma_to) of one Brownian path per
    image over [min positive sigma, max sigma] (`brownian_point`), so sub-steps that split an
    interval (dpmpp_sde, SEEDS) get increments that add up, as k-diffusion's
    BrownianTreeNoiseSampler (same law, not the same numbers). `noise_type` may be traced (0/1).
    """
    flag = noise_flag(noise_type)
    sig = jnp.asarray(sigmas, jnp.float32)
    t_lo = jnp.min(jnp.where(sig > 0, sig, jnp.inf))
    t_hi = jnp.max(sig)

    def gaussian(i, s_from, s_to, stream):
        return step_noise(keys, i, shape, dtype, stream=stream)

    def brownian(i, s_from, s_to, stream):
        s_from, s_to = s_from.astype(jnp.float32), s_to.astype(jnp.float32)
        hi, lo = jnp.maximum(s_from, s_to), jnp.minimum(s_from, s_to)
        lo = jnp.maximum(lo, t_lo)
        scale = jnp.sqrt(jnp.maximum(hi - lo, 1e-12))

        def one(k):
            k = jax.random.fold_in(k, _TREE_KEY + stream)
            return (brownian_point(k, hi, t_lo, t_hi, shape) - brownian_point(k, lo, t_lo, t_hi, shape)) / scale

        return jax.vmap(one)(keys).astype(dtype)

    def noise(i, s_from, s_to, stream: int = 0):
        if isinstance(flag, int):
            return (brownian if flag else gaussian)(i, s_from, s_to, stream)
        return jax.lax.cond(flag != 0, lambda: brownian(i, s_from, s_to, stream),
                            lambda: gaussian(i, s_from, s_to, stream))

    return noise


# ---- the unguided prediction, for CFG++ ----------------------------------------------------

def with_uncond(denoise_pair):
    """A denoiser D(x, sigma) -> guided x0 that also offers `.with_uncond(x, sigma) ->
    (guided, uncond)` from the same network call (CFG++ samplers read the unguided x0)."""

    def denoise(x, sigma):
        return denoise_pair(x, sigma)[0]

    denoise.with_uncond = denoise_pair
    return denoise


def uncond_model(denoise, dtype):
    """`model(x, sigma) -> (guided, uncond)` in `dtype`. A denoiser without `.with_uncond` has no
    guidance, so its unguided prediction is its prediction (CFG++ then equals its base sampler)."""
    pair = getattr(denoise, "with_uncond", None)

    def model(x, sigma):
        if pair is None:
            out = jnp.asarray(denoise(x, sigma)).astype(dtype)
            return out, out
        g, u = pair(x, sigma)
        return jnp.asarray(g).astype(dtype), jnp.asarray(u).astype(dtype)

    return model
