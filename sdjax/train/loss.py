"""The diffusion training loss (Ho et al. 2020), with the model's own target.

Pure functions of arrays; layouts NHWC. `alphas_cumprod` is the model's (T,)
table (see `sdjax.sampling.DiscreteModel.alphas_cumprod`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def add_noise(latents: jax.Array, noise: jax.Array, timesteps: jax.Array,
              alphas_cumprod: jax.Array) -> jax.Array:
    """q(x_t | x_0): sqrt(acp_t) x0 + sqrt(1 - acp_t) eps. timesteps: int (B,)."""
    acp = alphas_cumprod[timesteps].astype(jnp.float32)[:, None, None, None]
    return jnp.sqrt(acp) * latents + jnp.sqrt(1.0 - acp) * noise


def target(latents: jax.Array, noise: jax.Array, timesteps: jax.Array, alphas_cumprod: jax.Array,
           prediction_type: str) -> jax.Array:
    """What the network should output: eps, v = sqrt(acp) eps - sqrt(1-acp) x0, or x0 itself."""
    if prediction_type == "epsilon":
        return noise
    acp = alphas_cumprod[timesteps].astype(jnp.float32)[:, None, None, None]
    if prediction_type == "v_prediction":
        return jnp.sqrt(acp) * noise - jnp.sqrt(1.0 - acp) * latents
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")


def min_snr_weight(timesteps: jax.Array, alphas_cumprod: jax.Array, gamma: float,
                   prediction_type: str) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023), per example (B,).

    For an eps target the x0-space weight min(SNR, gamma) becomes min(SNR, gamma) / SNR;
    for v it is min(SNR, gamma) / (SNR + 1); for x0 it is min(SNR, gamma).
    """
    acp = alphas_cumprod[timesteps].astype(jnp.float32)
    snr = acp / (1.0 - acp)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def sample_noise(key: jax.Array, shape: tuple[int, ...], offset_noise: float = 0.0) -> jax.Array:
    """Unit Gaussian noise, plus optional offset noise (per-image, per-channel constant shift)."""
    k_noise, k_offset = jax.random.split(key)
    noise = jax.random.normal(k_noise, shape, jnp.float32)
    if offset_noise:
        noise = noise + offset_noise * jax.random.normal(k_offset, (shape[0], 1, 1, shape[-1]), jnp.float32)
    return noise


def diffusion_loss(prediction: jax.Array, target_: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean squared error per example, optionally weighted, averaged over the batch (float32)."""
    per_example = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target_), axis=(1, 2, 3))
    if weights is not None:
        per_example = per_example * weights
    return jnp.mean(per_example)
