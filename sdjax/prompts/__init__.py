"""Prompts: A1111 attention syntax, prompt editing / alternation / AND, 75-token chunks,
<lora:...> tags, weighted encoding.

Host side (numpy, no JAX): `parse_prompt_attention`, `prompt_schedule`, `split_and`,
`plan_conditioning`, `tokenize_prompt`, `pad_to_same_chunks`, `extract_lora_tags`. Device side (jnp, jit-friendly):
`apply_emphasis`, `encode_prompt`.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from sdjax.prompts.chunks import (
    CHUNK_LENGTH,
    ExtraNetworkTags,
    PromptTokens,
    extract_lora_tags,
    pad_to_same_chunks,
    tokenize_prompt,
)
from sdjax.prompts.emphasis import PromptError, parse_prompt_attention
from sdjax.prompts.scheduling import (
    ConditioningPlan,
    bucket,
    get_schedules,
    plan_conditioning,
    prompt_schedule,
    split_and,
)

__all__ = [
    "CHUNK_LENGTH",
    "ConditioningPlan",
    "bucket",
    "get_schedules",
    "plan_conditioning",
    "prompt_schedule",
    "split_and",
    "ExtraNetworkTags",
    "PromptError",
    "PromptTokens",
    "apply_emphasis",
    "encode_prompt",
    "extract_lora_tags",
    "pad_to_same_chunks",
    "parse_prompt_attention",
    "tokenize_prompt",
]


def apply_emphasis(hidden: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """A1111's "Original" emphasis, then the chunks joined along the sequence axis.

    hidden: (n_chunks, 77, D) text-encoder output, one row per chunk.
    weights: (n_chunks, 77) per-token multipliers from `tokenize_prompt`.
    Returns float32 (1, n_chunks * 77, D).

    Each chunk is multiplied token-wise by its weights and then rescaled so its
    mean over all (77, D) values equals the mean before weighting. A1111 does
    this per encoder call, i.e. per chunk (`sd_emphasis.EmphasisOriginal`), not
    over the whole prompt.
    """
    hidden = hidden.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    original_mean = jnp.mean(hidden, axis=(1, 2), keepdims=True)
    weighted = hidden * weights[..., None]
    new_mean = jnp.mean(weighted, axis=(1, 2), keepdims=True)
    weighted = weighted * (original_mean / new_mean)
    n_chunks, length, dim = weighted.shape
    return weighted.reshape(1, n_chunks * length, dim)


def encode_prompt(
    encode_fn: Callable[..., jnp.ndarray], tokens: PromptTokens, clip_skip: int = 1
) -> jnp.ndarray:
    """Encode a chunked prompt and apply its emphasis weights.

    encode_fn: `encode_fn(ids int32 (n, 77), clip_skip=int) -> hidden (n, 77, D)`,
        supplied by the pipeline; it chooses the layer (A1111 "Clip skip": 1 = last
        layer, 2 = the one before, with the final layer norm) itself.
    tokens: from `tokenize_prompt` (pad cond/uncond with `pad_to_same_chunks` first).
    Returns float32 (1, n_chunks * 77, D).
    """
    if clip_skip < 1:
        raise PromptError(f"clip_skip must be >= 1 (1 = last layer), got {clip_skip}")
    hidden = encode_fn(jnp.asarray(tokens.ids, dtype=jnp.int32), clip_skip=clip_skip)
    return apply_emphasis(hidden, jnp.asarray(tokens.weights))
