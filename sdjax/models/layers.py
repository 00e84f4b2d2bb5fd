"""Building blocks shared by the UNet, the VAE and ControlNet. Math only.

Layout is NHWC throughout. Attribute names mirror diffusers' module names
(`norm1`, `conv1`, `time_emb_proj`, `conv_shortcut`, `conv`, ...) so that the
checkpoint-name mapping in `sdjax.weights.mapping` is mechanical.

Precision: parameters are stored in `param_dtype`, matmuls and convolutions run in
`dtype`; group/layer-norm statistics and attention softmax run in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models import kernels


_NHWC = ("NHWC", "HWIO", "NHWC")


# Output pixels (Ho*Wo) up to which a CPU conv runs as one im2col matmul. XLA:CPU's
# convolution is pathological on tiny images with many channels: a 3x3 1280->1280 conv
# on 2x2 pixels took 138 ms at batch 2 and 485 ms at batch 8 (1.5 GFLOP/s), the im2col
# matmul 5 and 10 ms; at 4x4 im2col is still 1.3x faster, at 8x8 and up lax wins or ties.
# This is what made an SD UNet step on 8x8 latents (64x64 px) cost 2.5 s at batch 2.
# Narrow convs (Cin*Cout below 256*256) keep lax's conv: there both take under a
# millisecond, and the im2col graph compiles slower (a tiny UNet train step 11 -> 15 s).
_IM2COL_MAX_PIXELS = 16
_IM2COL_MIN_WEIGHTS = 256 * 256


def _out_size(n: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    return (n + pad[0] + pad[1] - k) // stride + 1


def _tap(xp, i: int, j: int, ho: int, wo: int, strides):
    """The (B, Ho, Wo, Cin) input pixels that kernel tap (i, j) meets, from the padded input xp."""
    b, _, _, cin = xp.shape
    sh, sw = strides
    return jax.lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin), (1, sh, sw, 1))


def _im2col_conv(x, w, strides, padding, precision):
    """The conv as (B*Ho*Wo, taps*Cin) @ (taps*Cin, Cout), skipping taps that only ever
    read padding (on a 1x1 image a 3x3 SAME conv is its centre tap, a plain matmul)."""
    b, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    (sh, sw), (ph, pw) = strides, padding
    ho, wo = _out_size(h, kh, sh, ph), _out_size(wd, kw, sw, pw)
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    live_i = [i for i in range(kh) if any(0 <= i + r * sh - ph[0] < h for r in range(ho))]
    live_j = [j for j in range(kw) if any(0 <= j + c * sw - pw[0] < wd for c in range(wo))]
    cols = [_tap(xp, i, j, ho, wo, strides) for i in live_i for j in live_j]
    if len(live_i) == kh and len(live_j) == kw:
        wk = w.reshape(kh * kw * cin, cout)  # free; a concatenation would copy the kernel
    else:
        wk = w[live_i[0]:live_i[-1] + 1, live_j[0]:live_j[-1] + 1].reshape(-1, cout)
    patches = jnp.concatenate(cols, axis=-1).reshape(b * ho * wo, -1)
    return jnp.dot(patches, wk, precision=precision).reshape(b, ho, wo, cout)


def _conv_forward(x, w, strides, padding, precision):
    kh, kw = w.shape[:2]
    pixels = _out_size(x.shape[1], kh, strides[0], padding[0]) * _out_size(x.shape[2], kw, strides[1], padding[1])
    if pixels <= _IM2COL_MAX_PIXELS and w.shape[2] * w.shape[3] >= _IM2COL_MIN_WEIGHTS:
        return _im2col_conv(x, w, strides, padding, precision)
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d(x, w, strides, padding, precision):
    return _conv_forward(x, w, strides, padding, precision)


def _conv2d_fwd(x, w, strides, padding, precision):
    return _conv2d(x, w, strides, padding, precision), (x, w)


def _conv2d_bwd(strides, padding, precision, residuals, g):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x_: _conv_forward(x_, w, strides, padding, precision), x)
    (dx,) = input_vjp(g)
    # The kernel gradient as kh*kw matmuls over (batch x output pixels): XLA:CPU runs
    # its native backward-filter convolution ~10x slower than these dots (it was 2/3
    # of a tiny-UNet train step).
    kh, kw, cin, cout = w.shape
    ho, wo = g.shape[1:3]
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    taps = [jnp.einsum("bhwi,bhwo->io", _tap(xp, i, j, ho, wo, strides), g, precision=precision,
                       preferred_element_type=jnp.float32)
            for i in range(kh) for j in range(kw)]
    dw = jnp.stack(taps).reshape(kh, kw, cin, cout).astype(w.dtype)
    return dx, dw


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_xla(lhs, rhs, window_strides, padding, **kwargs):
    """`jax.lax.conv_general_dilated` itself (the "xla" conv: cuDNN on GPU, the MXU on TPU).
    Everything past the first four arguments is passed by keyword: lax's positional order
    has changed between releases (a positional `precision` once landed in batch_group_count)."""
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def conv_matmul(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`jax.lax.conv_general_dilated` with matmul forms for plain NHWC 2-D convs (the "matmul"
    conv, tuned on CPU).

    The same math: on tiny outputs of wide convs (Ho*Wo <= `_IM2COL_MAX_PIXELS`, Cin*Cout >=
    `_IM2COL_MIN_WEIGHTS`) the forward is one im2col matmul, elsewhere lax's conv; the kernel
    gradient is matmuls, see `_conv2d_bwd`. Anything but a dense, undilated NHWC/HWIO conv with
    explicit non-negative padding goes to `conv_xla` unchanged.
    """
    plain = (lhs.ndim == 4 and feature_group_count == 1 and not isinstance(padding, str)
             and all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and all(v is None for v in kwargs.values())
             and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if plain:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if all(p >= 0 for pair in pads for p in pair):
            return _conv2d(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision)
    return conv_xla(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                    dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                    precision=precision, **kwargs)


CONV_FUNCTIONS = {"xla": conv_xla, "matmul": conv_matmul}


def conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
    """The "auto" conv of a model without `Kernels`: `kernels.choose_conv` on JAX's default backend."""
    return CONV_FUNCTIONS[kernels.choose_conv(None)](lhs, rhs, window_strides, padding, **kwargs)


def apply_kernels(model: nnx.Module, choice: kernels.Kernels) -> nnx.Module:
    """Point every attention layer and conv of `model` at `choice` (in place; returns `model`).

    Attention layers (modules with a `kernels` attribute) get `choice`; every `nnx.Conv` gets
    the conv function `kernels.choose_conv` names. Call it before `nnx.split`: the choice is
    part of the graphdef, so jitted functions specialise on it.
    """
    conv_fn = CONV_FUNCTIONS[kernels.choose_conv(choice.backend, choice.conv)]
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Conv):
            node.conv_general_dilated = conv_fn
        elif isinstance(node, nnx.Module) and hasattr(node, "kernels"):
            node.kernels = choice
    return model


def conv(in_ch: int, out_ch: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1,
         padding: int | str = "same", dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Conv:
    """A 2-D convolution with PyTorch-style symmetric integer padding (NHWC)."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    elif padding == "same":
        pad = kernel // 2
        padding = ((pad, pad), (pad, pad))
    return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride), padding=padding,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs, conv_general_dilated=conv_general_dilated)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over the channel (last) axis, statistics in float32.

    Params: `scale` (C,), `bias` (C,) -- torch's `weight` and `bias`.
    """

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-5, *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        del rngs
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, c = x.shape
        xg = x.astype(jnp.float32).reshape(lead[0], -1, self.num_groups, c // self.num_groups)
        mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
        xg = (xg - mean) * jax.lax.rsqrt(var + self.eps)
        y = xg.reshape(x.shape) * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis, statistics in float32. Params `scale`, `bias`."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        del rngs
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


# On CPU, attention with more logits than this (over all batch rows and heads) runs one
# (batch, head) at a time, in query chunks of at most this many logits. XLA:CPU does not
# fuse the logits, exp and PV product, so each is a pass over memory; a chunk of 16 MiB of
# float32 logits stays in cache. At SD's 4096 tokens (batch 2, 8 heads) this took a layer
# from 1.2 s (all heads at once, 1024-query chunks, 256 MiB of logits each) to 0.45 s
# (torch's fused SDPA: 0.38 s); at 1024 tokens 0.12 -> 0.06 s.
_MAX_LOGITS = 1024 * 4096


def _query_chunk(lq: int, lk: int) -> int:
    """The largest divisor of lq whose chunk of logits fits _MAX_LOGITS (lq when all fit)."""
    if lq * lk <= _MAX_LOGITS:
        return lq
    chunk = max(1, _MAX_LOGITS // lk)
    while lq % chunk:
        chunk -= 1
    return chunk


def _attend_heads(q, k, v, scale: float):
    """Head-major attention: q (..., Lq, D), k and v (..., Lk, D) -> (..., Lq, D) in q's dtype.
    Logits and exp in float32; the softmax is normalised after the PV product (a division
    over D, not over Lk)."""
    logits = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
    # The shift cancels in the softmax; no gradient needs to flow through it.
    e = jnp.exp((logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))) * scale)
    out = jnp.einsum("...qk,...kd->...qd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(q.dtype)


def _attend_cpu(qh, kh, vh, scale: float):
    """(B, L, H, D) attention for XLA:CPU, in the (B, H, L, D) layout; past `_MAX_LOGITS`
    logits, one (batch, head) and query chunk at a time (see `_MAX_LOGITS`). Each row's
    softmax always spans all keys, so the chunks change nothing but speed and peak memory."""
    b, lq, h, d = qh.shape
    lk = kh.shape[1]
    qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (qh, kh, vh))
    if b * h * lq * lk <= _MAX_LOGITS:
        return jnp.swapaxes(_attend_heads(qt, kt, vt, scale), 1, 2)
    chunk = _query_chunk(lq, lk)
    qt = qt.reshape(b * h, lq // chunk, chunk, d)
    kt, vt = kt.reshape(b * h, lk, d), vt.reshape(b * h, lk, d)

    def one_head(args):
        q_, k_, v_ = args
        if chunk == lq:
            return _attend_heads(q_, k_, v_, scale)
        return jax.lax.map(lambda qc: _attend_heads(qc, k_, v_, scale), q_)

    out = jax.lax.map(one_head, (qt, kt, vt))
    return jnp.swapaxes(out.reshape(b, h, lq, d), 1, 2)


def _attend_softmax(qh, kh, vh, scale: float, causal: bool):
    """The plain form: (B, H, Lq, Lk) float32 logits, softmax, PV. q, k, v: (B, L, H, D)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh, preferred_element_type=jnp.float32) * scale
    if causal:
        lq, lk = qh.shape[1], kh.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((lq, lk), jnp.bool_)), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(vh.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, vh)


def _attend_pallas(qh, kh, vh, scale: float, causal: bool):
    """TPU flash attention (Pallas), in its (B, H, L, D) layout."""
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash  # TPU-only, heavy

    qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (qh, kh, vh))
    out = pallas_flash.flash_attention(qt, kt, vt, causal=causal, sm_scale=scale)
    return jnp.swapaxes(out, 1, 2).astype(qh.dtype)


def _attend(impl: str, qh, kh, vh, scale: float, causal: bool):
    if impl == "softmax":
        return _attend_softmax(qh, kh, vh, scale, causal)
    if impl in ("xla", "cudnn"):
        # JAX's own implementation promotes bf16 with float32 implicitly; under a caller's
        # strict dtype promotion that would raise in the forward pass, so it is traced under
        # the standard rules (its backward pass is not: sdjax's defaults on CPU avoid it).
        with jax.numpy_dtype_promotion("standard"):
            return jax.nn.dot_product_attention(qh, kh, vh, scale=scale, is_causal=causal, implementation=impl)
    if impl == "chunked":
        return _attend_cpu(qh, kh, vh, scale)
    if impl == "pallas":
        return _attend_pallas(qh, kh, vh, scale, causal)
    raise kernels.KernelError(f"unknown attention implementation {impl!r}")


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                         choice: kernels.Kernels | None = None, *, causal: bool = False) -> jax.Array:
    """Scaled dot-product attention, logits and softmax in float32.

    q: (B, Lq, heads * Dh), k and v: (B, Lk, heads * Dh) -> (B, Lq, heads * Dh), in q's dtype.
    causal: position i attends to keys j <= i. The implementation is
    `kernels.attention_impl(choice, ...)`: cuDNN flash attention on NVIDIA GPUs, Pallas flash
    attention on TPU, the chunked CPU form on CPU, XLA's where those cannot take the shapes.
    """
    b, lq, inner = q.shape
    dh = inner // heads
    qh = q.reshape(b, lq, heads, dh)
    kh = k.reshape(b, k.shape[1], heads, dh)
    vh = v.reshape(b, v.shape[1], heads, dh)
    impl = kernels.attention_impl(choice, q.dtype, qh.shape, kh.shape, causal=causal)
    out = _attend(impl, qh, kh, vh, dh ** -0.5, causal)
    return out.astype(q.dtype).reshape(b, lq, inner)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D (default "default" time-embedding norm), NHWC.

    x: (B, H, W, in_ch), temb: (B, temb_ch) or None -> (B, H, W, out_ch).
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, *, temb_ch: int | None, groups: int = 32,
                 eps: float = 1e-6, output_scale_factor: float = 1.0, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        out_ch = out_ch or in_ch
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(in_ch, groups, eps, **kw)
        self.conv1 = conv(in_ch, out_ch, 3, **kw)
        self.time_emb_proj = nnx.Linear(temb_ch, out_ch, **kw) if temb_ch else None
        self.norm2 = GroupNorm(out_ch, groups, eps, **kw)
        self.conv2 = conv(out_ch, out_ch, 3, **kw)
        self.conv_shortcut = conv(in_ch, out_ch, 1, padding=0, **kw) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x.astype(h.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. `padding=1` (UNet) or 0 (VAE: pad right/bottom by one, as diffusers does)."""

    def __init__(self, ch: int, out_ch: int | None = None, *, padding: int = 1, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.padding = padding
        self.conv = conv(ch, out_ch or ch, 3, stride=2, padding=padding, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv, NHWC."""

    def __init__(self, ch: int, out_ch: int | None = None, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.conv = conv(ch, out_ch or ch, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        if output_size is None:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            # torch's "nearest" picks source index floor(i * in / out); jax.image.resize rounds
            # half-pixel centres instead and differs for non-integer ratios (e.g. 5 -> 9).
            h, w = x.shape[1:3]
            rows = (jnp.arange(output_size[0]) * h) // output_size[0]
            cols = (jnp.arange(output_size[1]) * w) // output_size[1]
            x = x[:, rows][:, :, cols]
        return self.conv(x)
