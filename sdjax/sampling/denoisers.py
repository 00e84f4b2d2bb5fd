"""Denoiser wrappers D(x, sigma) -> x0_pred around a network, and classifier-free guidance.

The preconditioning is kept apart from the network, as NVlabs/edm's `EDMPrecond`:
x0_pred = c_skip * x + c_out * F(c_in * x, t(sigma)). For DDPM-trained networks (k-diffusion's
CompVisDenoiser / CompVisVDenoiser) c_in = 1 / sqrt(sigma^2 + 1) and t is the fractional
training timestep of sigma. The network knows nothing of sigmas or guidance.

Layouts: `x` is a batch of latents (B, ...), e.g. NHWC; `sigma` is a scalar or shape (B,).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from sdjax.sampling.schedules import DiscreteModel

_TIMESTEP_MODES = ("continuous", "nearest", "round")


def _expand(sigma, x):
    """sigma () or (B,) -> broadcastable against x (B, ...)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def scalings(prediction_type: str, sigma):
    """(c_skip, c_out, c_in) for a DDPM network of `prediction_type` at noise level `sigma`.

    epsilon: x0 = x - sigma * eps; v_prediction: c_skip = 1/(sigma^2+1),
    c_out = -sigma/sqrt(sigma^2+1); sample: x0 = output. All float32, shaped like `sigma`.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    c_in = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    if prediction_type == "epsilon":
        return jnp.ones_like(sigma), -sigma, c_in
    if prediction_type == "v_prediction":
        return 1.0 / (sigma**2 + 1.0), -sigma * c_in, c_in
    if prediction_type == "sample":
        return jnp.zeros_like(sigma), jnp.ones_like(sigma), c_in
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, not {prediction_type!r}")


def x0_from_prediction(prediction_type: str, x, sigma, raw):
    """x0_pred from the network's raw output `raw` (eps, v or x0) at the unscaled input x (B, ...)."""
    c_skip, c_out, _ = scalings(prediction_type, _expand(sigma, x))
    return (c_skip * x.astype(jnp.float32) + c_out * raw.astype(jnp.float32)).astype(x.dtype)


def prediction_from_x0(prediction_type: str, x, sigma, x0):
    """Inverse of `x0_from_prediction`: the eps / v / x0 a network would output for `x0`
    (sigma > 0). Useful for guidance rescale in the network's own prediction space."""
    c_skip, c_out, _ = scalings(prediction_type, _expand(sigma, x))
    return ((x0.astype(jnp.float32) - c_skip * x.astype(jnp.float32)) / c_out).astype(x.dtype)


def make_denoiser(model: DiscreteModel, network: Callable, *, timestep_mode: str = "continuous"):
    """Wrap `network(x_scaled, t, *args) -> eps | v | x0` as `denoise(x, sigma, *args) -> x0_pred`.

    x: (B, ...) latents at noise level sigma (x = x0 + sigma * eps, unscaled); sigma: scalar or
    (B,). The network gets x * c_in in x's dtype and t of shape (B,), float32:
    "continuous" = log-sigma interpolated timestep (A1111, diffusers Euler), "nearest" = nearest
    table index (ComfyUI, k-diffusion quantize=True), "round" = rounded (diffusers DPM-Solver with
    Karras sigmas). The output is x0_pred in x's dtype, computed in float32. Extra `args`
    (text embeddings, inpainting channels...) go to the network unchanged.
    """
    if timestep_mode not in _TIMESTEP_MODES:
        raise ValueError(f"timestep_mode must be one of {_TIMESTEP_MODES}, not {timestep_mode!r}")
    prediction_type = model.prediction_type

    def denoise(x, sigma, *args):
        sigma = jnp.asarray(sigma, jnp.float32)
        _, _, c_in = scalings(prediction_type, _expand(sigma, x))
        t = model.sigma_to_t(sigma, quantize=timestep_mode == "nearest")
        if timestep_mode == "round":
            t = jnp.round(t)
        t = jnp.broadcast_to(t, x.shape[:1])
        raw = network((x.astype(jnp.float32) * c_in).astype(x.dtype), t, *args)
        return x0_from_prediction(prediction_type, x, sigma, raw)

    return denoise


def cfg(cond, uncond, scale):
    """Classifier-free guidance: uncond + scale * (cond - uncond). `scale` may be traced, a scalar
    or shaped to broadcast (e.g. (B, 1, 1, 1) for a per-image scale). Linear, so it is the same
    in x0, eps or v space."""
    return uncond + scale * (cond - uncond)


def rescale_cfg(guided, cond, phi):
    """Guidance rescale (Lin et al. 2023, arXiv:2305.08891 sec. 3.4), as diffusers' rescale_noise_cfg.

    Scales `guided` to the per-image standard deviation of `cond` (over all axes but the batch),
    then mixes: phi * rescaled + (1 - phi) * guided. diffusers applies it to the network's raw
    prediction (eps or v), not to x0: convert with `prediction_from_x0` first. phi may be traced.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond.astype(jnp.float32), axis=axes, keepdims=True)
    std_guided = jnp.std(guided.astype(jnp.float32), axis=axes, keepdims=True)
    rescaled = guided.astype(jnp.float32) * (std_cond / std_guided)
    return (phi * rescaled + (1.0 - phi) * guided.astype(jnp.float32)).astype(guided.dtype)
