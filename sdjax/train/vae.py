"""Training an AutoencoderKL from scratch (used for sdjax's embedded model; VAE first, then UNet).

Loss: L1 + L2 reconstruction of x from a sampled latent, plus a small KL term toward
N(0, I) (Rombach et al. 2022 use a KL weight of 1e-6 with perceptual and GAN terms; on
flat synthetic images the pixel losses alone suffice). `edge_weight` weighs the pixels at the
target's edges more (on flat images almost every pixel is background, and a plain mean lets
the decoder round a small square's corners off). `parts="decoder"` trains the decoder alone,
the encoder frozen: the latents, and so a UNet trained on them, stay valid; `latent_noise` then
adds Gaussian noise of that standard deviation (in the UNet's scaled latent units) to the
latents it decodes, so that the decoder also draws clean shapes from a sampler's slightly
imperfect latents. Resumable: orbax checkpoints of
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


PARTS = {"all": ("encoder", "quant_conv", "decoder", "post_quant_conv"), "decoder": ("decoder", "post_quant_conv")}


def edge_map(images: jax.Array) -> jax.Array:
    """(B, H, W, 1) in [0, 1]: how much a pixel differs from its 4-neighbours (the largest
    absolute channel difference; a step of a quarter of the [-1, 1] range or more counts 1), so
    the pixels on both sides of an edge."""
    pad = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = images.shape[1], images.shape[2]
    diffs = [jnp.abs(pad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] - images).max(-1, keepdims=True)
             for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    return jnp.clip(jnp.max(jnp.stack(diffs), axis=0) * 2.0, 0.0, 1.0)


def vae_loss(params, graphdef, images: jax.Array, key: jax.Array, kl_weight: float,
             edge_weight: float = 0.0, parts: str = "all", latent_noise: float = 0.0) -> jax.Array:
    """images: (B, H, W, 3) in [-1, 1]; latent_noise: extra noise std in raw latent units."""
    vae = nnx.merge(graphdef, params)
    mean, logvar = vae.encode(images)
    if parts == "decoder":  # the encoder is frozen: no gradient reaches it, and its KL is constant
        mean, logvar = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(logvar)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    if latent_noise:
        z = z + latent_noise * jax.random.normal(jax.random.fold_in(key, 1), mean.shape, mean.dtype)
    recon = vae.decode(z)
    err = recon - images
    weight = 1.0 + edge_weight * edge_map(images)
    weight = weight / jnp.mean(weight)
    rec = jnp.mean(weight * jnp.abs(err)) + jnp.mean(weight * jnp.square(err))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return rec + kl_weight * kl


def _labels(params, parts: str):
    """"train" / "freeze" per leaf of `params`, by its top-level module name."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if getattr(path[0], "key", None) in PARTS[parts] else "freeze", params)


def train_vae(vae_component, dataset, out_dir: str | Path, *, steps: int, batch_size: int = 16,
              learning_rate: float = 2e-3, kl_weight: float = 1e-4, seed: int = 0,
              checkpoint_every: int = 200, edge_weight: float = 0.0, parts: str = "all",
              latent_noise: float = 0.0, log=print):
    """Train `vae_component` (a pipeline Component: graphdef + state) on `dataset` images.

    parts: "all", or "decoder" (the encoder and quant_conv stay as they are, so the latents
    do too); edge_weight: extra weight of the target's edge pixels (`edge_map`); latent_noise:
    extra latent noise in the UNet's units (scaled by the component's scaling_factor).

    Returns (trained state, recommended scaling_factor = 1 / std of the latent means).
    Resumes from `<out_dir>/checkpoints` if present.
    """

    if parts not in PARTS:
        raise ValueError(f"parts={parts!r}: use one of {sorted(PARTS)}")
    graphdef, params = vae_component.graphdef, vae_component.state
    noise = latent_noise / vae_component.scaling_factor if latent_noise else 0.0
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10 + 1), steps,
                                                  learning_rate * 0.05)
    optimizer = optax.multi_transform(
        {"train": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0)),
         "freeze": optax.set_to_zero()}, _labels(params, parts))
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    ckpt = Checkpointer(Path(out_dir) / "checkpoints", keep=2)
    start = 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        start = int(meta["step"])
        log(f"vae: resumed at step {start}")

    @jax.jit
    def step_fn(state, images, key):
        value, grads = jax.value_and_grad(vae_loss)(state["params"], graphdef, images, key, kl_weight,
                                                     edge_weight, parts, noise)
        with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean (see step.py)
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
