"""Training an AutoencoderKL from scratch (used for sdjax's embedded model; VAE first, then UNet).

Loss: L1 + L2 reconstruction of x from a sampled latent, plus a small KL term toward
N(0, I) (Rombach et al. 2022 use a KL weight of 1e-6 with perceptual and GAN terms; on
flat synthetic images the pixel losses alone suffice). Resumable: orbax checkpoints of
(params, optimizer state, step) via `sdjax.train.checkpoint`, the data order from
`sdjax.data.CaptionLoader`, and the step's key folded from (seed, step).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sdjax.data.datasets import CaptionLoader
from sdjax.train.checkpoint import Checkpointer


def vae_loss(params, graphdef, images: jax.Array, key: jax.Array, kl_weight: float) -> jax.Array:
    """images: (B, H, W, 3) in [-1, 1]."""
    vae = nnx.merge(graphdef, params)
    mean, logvar = vae.encode(images)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    recon = vae.decode(z)
    err = recon - images
    rec = jnp.mean(jnp.abs(err)) + jnp.mean(jnp.square(err))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return rec + kl_weight * kl


def train_vae(vae_component, dataset, out_dir: str | Path, *, steps: int, batch_size: int = 16,
              learning_rate: float = 2e-3, kl_weight: float = 1e-4, seed: int = 0,
              checkpoint_every: int = 200, log=print):
    """Train `vae_component` (a pipeline Component: graphdef + state) on `dataset` images.

    Returns (trained state, recommended scaling_factor = 1 / std of the latent means).
    Resumes from `<out_dir>/checkpoints` if present.
    """

    graphdef, params = vae_component.graphdef, vae_component.state
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10 + 1), steps,
                                                  learning_rate * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    ckpt = Checkpointer(Path(out_dir) / "checkpoints", keep=2)
    start = 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        start = int(meta["step"])
        log(f"vae: resumed at step {start}")

    @jax.jit
    def step_fn(state, images, key):
        value, grads = jax.value_and_grad(vae_loss)(state["params"], graphdef, images, key, kl_weight)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1}, value

    loader = CaptionLoader(dataset, batch_size, seed=seed)
    run_key = jax.random.key(seed)
    for step in range(start, steps):
        images = jnp.asarray(loader.batch(step)["images"])
        state, value = step_fn(state, images, jax.random.fold_in(run_key, step))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"vae step {step + 1}/{steps} loss {float(value):.5f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            ckpt.save(step + 1, state, {"step": step + 1})
    ckpt.close()

    vae = nnx.merge(graphdef, state["params"])
    encode = jax.jit(lambda x: vae.encode(x)[0])
    means = [np.asarray(encode(jnp.asarray(loader.batch(i)["images"]))) for i in range(4)]
    scaling = float(1.0 / np.std(np.concatenate(means)))
    return state["params"], scaling
