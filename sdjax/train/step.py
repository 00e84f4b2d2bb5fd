"""The jitted train step: loss, gradients, AdamW update, EMA. Pure functions of a state pytree.

The state is a plain dict pytree:
    {"params": {"unet": State, ["text_encoder": State]}, "opt_state": ..., "ema": params-like | None,
     "step": int32 scalar}
Frozen weights (VAE, and the text encoder when it is not trained) are passed apart.
Data parallelism comes from the shardings of the inputs: the batch is sharded over
the mesh's data axis, parameters replicated (or FSDP-sharded), and XLA inserts the
gradient reduction; there are no hand-written collectives.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sdjax.train import loss as L
from sdjax.train.config import TrainConfig


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay, after global-norm gradient clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.lr_warmup_steps else cfg.learning_rate,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.lr_warmup_steps,
        decay_steps=max(cfg.max_steps, cfg.lr_warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.lr_end_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay),
    )


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """diffusers' EMAModel warmup: min(decay, (1 + step) / (10 + step))."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(
    cfg: TrainConfig,
    optimizer: optax.GradientTransformation,
    *,
    unet_apply: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array],
    text_apply: Callable[[Any, jax.Array], jax.Array],
    vae_encode: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
    scaling_factor: float,
    alphas_cumprod: jax.Array,
    prediction_type: str,
    merge_params: Callable[[Any, Any], Any] | None = None,
) -> Callable:
    """Build `train_step(state, frozen, batch, key) -> (state, metrics)`.

    unet_apply(unet_state, latents_nhwc, timesteps (B,), context, **added) -> prediction NHWC;
    text_apply(te_state, input_ids (B, 77)) -> context (B, 77, D);
    SDXL (frozen has "text_encoder_2"): text_apply((te_state, te2_state), input_ids (B, 2, 77)) ->
    (context (B, 77, D1 + D2), pooled (B, P)), and the UNet also gets `text_embeds=pooled` and
    `time_ids=batch["time_ids"]` (B, 6) (original size, crop top-left, target size of each example);
    vae_encode(vae_state, images_nhwc in [-1, 1]) -> (mean, logvar).
    batch: {"images": (A, B, H, W, 3) float32, "input_ids": (A, B, 77) int32} with A = grad_accum
    micro-batches, scanned; gradients are averaged over them. `key` is the step's key
    (fold_in(run_key, step)), so a resumed run draws the same noise.
    merge_params(trainable, frozen) -> {"unet": State[, "text_encoder": State]}: the model
    weights built from the trainable params (LoRA: frozen base + low-rank factors); None
    means the trainable params are the weights.
    """
    num_t = alphas_cumprod.shape[0]

    def micro_loss(trainable, frozen, images, input_ids, time_ids, key):
        k_lat, k_t, k_noise = jax.random.split(key, 3)
        if merge_params is not None:
            trainable = merge_params(trainable, frozen)
        mean, logvar = vae_encode(frozen["vae"], images)
        latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_lat, mean.shape, mean.dtype)
        latents = jax.lax.stop_gradient(latents.astype(jnp.float32) * scaling_factor)
        te_state = trainable["text_encoder"] if "text_encoder" in trainable else frozen["text_encoder"]
        added = {}
        if "text_encoder_2" in frozen:  # SDXL: both (frozen) encoders, pooled embedding, time ids
            context, pooled = text_apply((te_state, frozen["text_encoder_2"]), input_ids)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        else:
            context = text_apply(te_state, input_ids)
        b = latents.shape[0]
        timesteps = jax.random.randint(k_t, (b,), 0, num_t)
        noise = L.sample_noise(k_noise, latents.shape, cfg.offset_noise)
        noisy = L.add_noise(latents, noise, timesteps, alphas_cumprod)
        pred = unet_apply(trainable["unet"], noisy, timesteps, context, **added)
        tgt = L.target(latents, noise, timesteps, alphas_cumprod, prediction_type)
        weights = (L.min_snr_weight(timesteps, alphas_cumprod, cfg.min_snr_gamma, prediction_type)
                   if cfg.min_snr_gamma else None)
        return L.diffusion_loss(pred, tgt, weights)

    grad_fn = jax.value_and_grad(micro_loss)

    def train_step(state, frozen, batch, key):
        params = state["params"]
        keys = jax.random.split(key, batch["images"].shape[0])

        def accumulate(carry, xs):
            loss_sum, grad_sum = carry
            images, ids, time_ids, k = xs
            value, grads = grad_fn(params, frozen, images, ids, time_ids, k)
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return (loss_sum + value, grad_sum), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (loss_sum, grad_sum), _ = jax.lax.scan(
            accumulate, (jnp.zeros((), jnp.float32), zeros),
            (batch["images"], batch["input_ids"], batch.get("time_ids"), keys))
        n = batch["images"].shape[0]
        grads = jax.tree.map(lambda g: g / n, grad_sum)
        # optax is not strict-promotion clean (Adam's bias correction takes decay ** an int32
        # count): its update runs under standard promotion, the rest of the step stays strict.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1,
                     "ema": state["ema"]}
        if state["ema"] is not None:
            d = ema_decay_at(state["step"], cfg.ema_decay)
            new_state["ema"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(e.dtype),
                                            state["ema"], new_params)
        metrics = {"loss": loss_sum / n, "grad_norm": optax.global_norm(grads)}
        return new_state, metrics

    return train_step


def init_state(params: dict, optimizer: optax.GradientTransformation, ema: bool) -> dict:
    """The initial train state around trainable `params` (a dict of component states)."""
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        # A real copy: the EMA must not share buffers with the (donated) params.
        "ema": jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params) if ema else None,
        "step": jnp.zeros((), jnp.int32),
    }
