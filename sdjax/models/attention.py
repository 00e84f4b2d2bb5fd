"""The UNet's spatial transformer: diffusers' Transformer2DModel (continuous input),
BasicTransformerBlock, Attention, FeedForward and GEGLU. Math only, NHWC.

Attribute names mirror diffusers so torch names map mechanically, e.g.
`transformer_blocks.0.attn1.to_out.0.weight` or `transformer_blocks.0.ff.net.2.weight`:
diffusers' `to_out` and `ff.net` hold a parameterless `Dropout` (index 1); we keep an
`nnx.Dropout(0.0)` there as a placeholder so the indices, and hence the names, agree.
The placeholders are never called: SD's dropout rate is 0.

Precision: matmuls in `dtype`; layer/group-norm statistics and the attention softmax
in float32 (see `layers.multi_head_attention`), so diffusers' `upcast_attention`
semantics always hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.layers import GroupNorm, LayerNorm, conv, multi_head_attention


class Attention(nnx.Module):
    """diffusers `Attention` as used by SD: no q/k/v bias, biased output projection.

    x: (B, Lq, query_dim), context: (B, Lk, cross_attention_dim) or None (self-attention)
    -> (B, Lq, query_dim).
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 *, upcast_attention: bool = False, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        # Kept for the record: logits and softmax are always float32 here, which is what
        # upcast_attention asks for; in float32 compute it changes nothing.
        self.upcast_attention = upcast_attention
        self.to_q = nnx.Linear(query_dim, inner, use_bias=False, **kw)
        self.to_k = nnx.Linear(kv_dim, inner, use_bias=False, **kw)
        self.to_v = nnx.Linear(kv_dim, inner, use_bias=False, **kw)
        self.to_out = nnx.List([nnx.Linear(inner, query_dim, **kw), nnx.Dropout(0.0)])
        self.kernels = None  # sdjax.models.kernels.Kernels, set by layers.apply_kernels

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.kernels)
        return self.to_out[0](out)


class GEGLU(nnx.Module):
    """Gated GELU (Shazeer 2020): proj -> (h, gate) -> h * gelu(gate), exact (erf) GELU."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.dtype = dtype
        self.proj = nnx.Linear(dim_in, dim_out * 2, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        # torch evaluates gelu of a bf16 tensor in float32 and rounds once; so do we.
        return h * jax.nn.gelu(gate.astype(jnp.float32), approximate=False).astype(self.dtype)


class FeedForward(nnx.Module):
    """diffusers FeedForward with GEGLU: `net` = [GEGLU, Dropout, Linear]. (B, L, dim) -> same."""

    def __init__(self, dim: int, mult: int = 4, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, **kw), nnx.Dropout(0.0), nnx.Linear(inner, dim, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention, GEGLU feed-forward; each with a residual.

    x: (B, L, dim), context: (B, Lc, cross_attention_dim) -> (B, L, dim).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, *,
                 upcast_attention: bool = False, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(dim, 1e-5, **kw)
        self.attn1 = Attention(dim, heads, dim_head, None, upcast_attention=upcast_attention, **kw)
        self.norm2 = LayerNorm(dim, 1e-5, **kw)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim,
                               upcast_attention=upcast_attention, **kw)
        self.norm3 = LayerNorm(dim, 1e-5, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
    """diffusers Transformer2DModel on continuous (latent) input, NHWC.

    GroupNorm -> proj_in (1x1 conv, or Linear when `use_linear_projection`) -> transformer
    blocks over the H*W tokens -> proj_out -> + input.
    x: (B, H, W, in_channels), context: (B, Lc, cross_attention_dim) -> (B, H, W, in_channels).
    """

    def __init__(self, heads: int, dim_head: int, in_channels: int, *, cross_attention_dim: int,
                 num_layers: int = 1, norm_num_groups: int = 32, use_linear_projection: bool = False,
                 upcast_attention: bool = False, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(in_channels, norm_num_groups, 1e-6, **kw)
        if use_linear_projection:
            self.proj_in = nnx.Linear(in_channels, inner, **kw)
            self.proj_out = nnx.Linear(inner, in_channels, **kw)
        else:
            self.proj_in = conv(in_channels, inner, 1, padding=0, **kw)
            self.proj_out = conv(inner, in_channels, 1, padding=0, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim,
                                  upcast_attention=upcast_attention, **kw)
            for _ in range(num_layers)])

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = self.proj_in(x.reshape(b, h * w, -1))
        else:
            x = self.proj_in(x).reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x).reshape(b, h, w, -1)
        else:
            x = self.proj_out(x.reshape(b, h, w, -1))
        return x + residual.astype(x.dtype)
