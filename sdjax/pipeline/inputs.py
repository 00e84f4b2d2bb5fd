"""The traced inputs of the compiled generation function (`sdjax.pipeline.core.build`), one typed pytree.

Built in one place (`sdjax.pipeline.generator`; a benchmark may build its own for txt2img).
Every field is traced: changing a value never recompiles; only shapes (and which optional
fields are present) do. Latents are NHWC and scaled by the VAE's scaling_factor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import struct

from sdjax import parallel


@struct.dataclass
class Inputs:
    """cond, uncond: (B, L, D) prompt embeddings; cfg_scale: () or (B, 1, 1, 1); noise:
    (B, h, w, c) unit-variance; sigmas: (steps + 1,) the full schedule; start: () int32, the first
    step (0 for txt2img; img2img starts at sigmas[start]); keys: (B,) sampler keys; knobs:
    {name: scalar} numeric sampler knobs (eta, s_noise, ...).
    Per task (None when absent): init_latents (B, h, w, c) (img2img, inpaint); mask (B, h, w, 1),
    1 = repaint (inpaint); fill_keep, fill_noise () (inpaint: the masked latents become
    init * fill_keep + noise * fill_noise -- A1111 "original"/"fill" = (1, 0), "latent noise" =
    (0, 1), "latent nothing" = (0, 0)); masked_latents (B, h, w, c) (9-channel inpaint);
    control: {"states", "images" (1, H, W, 3) each, "scales" (steps, n_units)} (ControlNet).
    Prompt scheduling and AND (`sdjax.prompts.scheduling`): cond_table (K, L, D) every distinct
    conditioning (prompts and negative prompts; K padded to a bucket); cond_index int32
    (B, steps, S): the table row of sub-prompt s at 0-based run step k; uncond_index int32
    (B, steps); cond_weights (B, S) the AND weights (0 = padding). With them cond and uncond are
    None; without them cond, uncond are used for every step.
    SDXL (None otherwise): pooled, uncond_pooled (B, P) pooled text embeddings; time_ids,
    uncond_time_ids (B, n). Refiner hand-over: refiner_state (its UNet weights), refiner_cond /
    refiner_uncond (B, L', D'), refiner_pooled / refiner_uncond_pooled, refiner_time_ids /
    refiner_uncond_time_ids, and switch_sigma (): the base denoises at sigmas above it, the refiner
    at and below it.
    """

    cond: jax.Array
    uncond: jax.Array
    cfg_scale: jax.Array
    noise: jax.Array
    sigmas: jax.Array
    start: jax.Array
    keys: jax.Array
    knobs: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    init_latents: jax.Array | None = None
    mask: jax.Array | None = None
    fill_keep: jax.Array | None = None
    fill_noise: jax.Array | None = None
    masked_latents: jax.Array | None = None
    control: dict[str, Any] | None = None
    cond_table: jax.Array | None = None
    cond_index: jax.Array | None = None
    uncond_index: jax.Array | None = None
    cond_weights: jax.Array | None = None
    pooled: jax.Array | None = None
    uncond_pooled: jax.Array | None = None
    time_ids: jax.Array | None = None
    uncond_time_ids: jax.Array | None = None
    refiner_state: Any = None
    refiner_cond: jax.Array | None = None
    refiner_uncond: jax.Array | None = None
    refiner_pooled: jax.Array | None = None
    refiner_uncond_pooled: jax.Array | None = None
    refiner_time_ids: jax.Array | None = None
    refiner_uncond_time_ids: jax.Array | None = None
    switch_sigma: jax.Array | None = None


# Fields without a batch axis (replicated when the batch is sharded).
UNBATCHED = ("sigmas", "start", "knobs", "fill_keep", "fill_noise", "control", "cond_table", "refiner_state",
             "switch_sigma")


def shard(inputs: Inputs, mesh, batch: int) -> Inputs:
    """`inputs` with every batched field padded to the mesh's batch multiple and sharded over it
    (`sdjax.parallel.shard_batch`); the UNBATCHED fields replicated."""
    fields = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
    return Inputs(**parallel.shard_batch(fields, mesh, batch, unbatched=UNBATCHED))
