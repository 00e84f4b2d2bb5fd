"""The model components of a pipeline: a loaded NNX model as (graphdef, state, config, apply).

Each model component is a small object holding

    graphdef   the NNX graph definition (static structure)
    state      the weights pytree (an `nnx.State` of jax Arrays; `jax.tree.leaves(c.state)`)
    config     the model's config dataclass
    apply      a jitted pure function `apply(state, *inputs)` (`nnx.merge` inside `jax.jit`)

and `component(*inputs)` is `component.apply(component.state, *inputs)`. Use
`apply` with your own state (a fine-tuned copy, sharded weights, LoRA-merged
weights) inside your own jitted code; nothing in it closes over the weights.

    pipe = sdjax.load_pipeline("path/to/stable-diffusion-v1-5", dtype="bfloat16")
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="np").input_ids
    context = pipe.text_encoder(ids)                       # (B, 77, D)
    eps = pipe.unet(latents_nhwc, timesteps, context)      # (B, h, w, 4)
    images = pipe.vae.decode(latents_nhwc / pipe.vae.scaling_factor)   # (B, 8h, 8w, 3) in [-1, 1]
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.errors import ConfigError
from sdjax.models.kernels import Kernels
from sdjax.models.layers import apply_kernels

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def _pure(graphdef: nnx.GraphDef, method: str) -> Callable[..., Any]:
    """`fn(state, *args, **kwargs)`: rebuild the module from `state` and call `method` on it."""

    def fn(state, *args, **kwargs):
        model = nnx.merge(graphdef, state)
        return getattr(model, method)(*args, **kwargs)

    fn.__name__ = f"apply_{method.strip('_') or 'call'}"
    return fn


@functools.lru_cache(maxsize=64)
def jitted(graphdef: nnx.GraphDef, method: str = "__call__",
           static_argnames: tuple[str, ...] = ()) -> Callable[..., Any]:
    """The jitted pure function for (graphdef, method), shared by equal graphdefs.

    GraphDefs of models with the same config and dtype compare equal, so loading
    the same architecture again (another checkpoint, a reload) reuses the compiled code.
    """
    return jax.jit(_pure(graphdef, method), static_argnames=static_argnames)


class Component:
    """A model as (graphdef, state, config) plus `apply(state, *inputs)`, jitted.

    `apply` is the model's `__call__` as a pure function of the weights; `state`
    is the weights pytree; `nnx.merge(c.graphdef, c.state)` gives the NNX module back.
    """

    def __init__(self, model: nnx.Module, config: Any, source: Path | None = None, kernels: Kernels | None = None):
        if kernels is not None:
            apply_kernels(model, kernels)
        self.graphdef, self.state = nnx.split(model)
        self.config = config
        self.source = source
        self.kernels = kernels
        self.apply = jitted(self.graphdef)

    def module(self) -> nnx.Module:
        """The NNX module with this component's weights (shares the arrays)."""
        return nnx.merge(self.graphdef, self.state)

    def __call__(self, *inputs, **kwargs):
        return self.apply(self.state, *inputs, **kwargs)

    def __repr__(self) -> str:
        n = sum(x.size for x in jax.tree.leaves(self.state))
        return f"{type(self).__name__}({n / 1e6:.1f}M parameters, config={self.config!r:.120})"


class TextEncoder(Component):
    """CLIP text encoder. `apply(state, input_ids, output_hidden_states=False) -> CLIPTextOutput`
    (`output_hidden_states` is static). input_ids: (B, L) int, L <= 77."""

    def __init__(self, model, config, source=None, kernels=None):
        super().__init__(model, config, source, kernels)
        self.apply = jitted(self.graphdef, "__call__", ("output_hidden_states",))

    def __call__(self, input_ids, *, output_hidden_states: bool = False):
        """(B, L) token ids -> last hidden state (B, L, D) after the final layer norm; with
        `output_hidden_states=True`, the whole `CLIPTextOutput` (last_hidden_state,
        pooled_output, hidden_states: embeddings + every layer, before the final norm)."""
        out = self.apply(self.state, jnp.asarray(input_ids, jnp.int32), output_hidden_states=output_hidden_states)
        return out if output_hidden_states else out.last_hidden_state


class UNet(Component):
    """UNet2DConditionModel. `apply(state, latents_nhwc, timesteps, context, down_residuals=None,
    mid_residual=None)` -> model output (B, h, w, out_channels): eps or v, per the scheduler config."""

    def __call__(self, latents_nhwc, timesteps, context, *, down_residuals=None, mid_residual=None):
        """latents (B, h, w, C), timesteps scalar or (B,) in [0, 1000), context (B, L, D) -> NHWC."""
        if down_residuals is None and mid_residual is None:
            # Same call signature as `apply(state, x, t, c)`, so both share one compilation.
            return self.apply(self.state, latents_nhwc, timesteps, context)
        return self.apply(self.state, latents_nhwc, timesteps, context,
                          down_residuals=down_residuals, mid_residual=mid_residual)


class VAE(Component):
    """AutoencoderKL. `apply(state, images)` reconstructs; `apply_encode(state, images_nhwc)`
    -> (mean, logvar) and `apply_decode(state, latents_nhwc)` -> images are the pure halves.
    Latents are unscaled: multiply by `scaling_factor` after encoding, divide before decoding."""

    def __init__(self, model, config, source=None, kernels=None):
        super().__init__(model, config, source, kernels)
        self.apply_encode = jitted(self.graphdef, "encode")
        self.apply_decode = jitted(self.graphdef, "decode")

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    def encode(self, images_nhwc):
        """Images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/8, W/8, 4), unscaled."""
        return self.apply_encode(self.state, images_nhwc)

    def decode(self, latents_nhwc):
        """Unscaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3), nominally in [-1, 1]."""
        return self.apply_decode(self.state, latents_nhwc)


def check_dtype(dtype) -> jnp.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d.name not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    return d



_check_dtype = check_dtype  # the name other modules used before
