"""sdjax.models.layers.conv: its custom kernel gradient equals lax's, and it is what the models use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax.models import layers


def _lax_conv(x, kernel, bias, stride, padding):
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (3, 2, ((0, 1), (0, 1))), (1, 1, 0)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_gradients_equal_lax(kernel, stride, padding, dtype):
    m = layers.conv(5, 7, kernel, stride=stride, padding=padding if isinstance(padding, int) else 0,
                    rngs=nnx.Rngs(0), dtype=dtype)
    if not isinstance(padding, int):  # the VAE's asymmetric downsampling pad
        m.padding = padding
    pad = m.padding if not isinstance(padding, int) else ((padding, padding), (padding, padding))
    graph, state = nnx.split(m)
    x = jax.random.normal(jax.random.key(1), (3, 11, 9, 5))
    w = jax.random.normal(jax.random.key(2), (3, (11 + sum(pad[0]) - kernel) // stride + 1,
                                              (9 + sum(pad[1]) - kernel) // stride + 1, 7))

    def ours(kernel_, bias, x_):
        st = jax.tree.map(lambda a: a, state)
        st["kernel"].value, st["bias"].value = kernel_, bias
        return jnp.sum(nnx.merge(graph, st)(x_).astype(jnp.float32) * w)

    def theirs(kernel_, bias, x_):
        y = _lax_conv(x_.astype(dtype), kernel_.astype(dtype), bias.astype(dtype), stride, pad)
        return jnp.sum(y.astype(jnp.float32) * w)

    args = (state["kernel"][...], state["bias"][...], x)
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(theirs, argnums=(0, 1, 2)))(*args)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, g, r in zip(("kernel", "bias", "input"), got, want):
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))) / jnp.max(jnp.abs(r)))
        assert err < tol, (name, err)


def test_conv_forward_is_lax_and_models_use_it():
    """The forward pass is unchanged, and every conv of the models goes through the custom gradient."""
    m = layers.conv(4, 6, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    np.testing.assert_array_equal(np.asarray(m(x)), np.asarray(_lax_conv(x, m.kernel[...], m.bias[...], 1,
                                                                         ((1, 1), (1, 1)))))
    assert m.conv_general_dilated is layers.conv_general_dilated
    # The kernel gradient comes out of dots, not out of XLA's backward-filter convolution
    # (which lax's own gradient emits, and which XLA:CPU runs ~10x slower).
    dn = jax.lax.conv_dimension_numbers(x.shape, m.kernel.shape, ("NHWC", "HWIO", "NHWC"))

    def hlo(conv_fn):
        loss = lambda k: jnp.sum(conv_fn(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(m.kernel[...]).as_text()

    ours, theirs = hlo(layers.conv_general_dilated), hlo(jax.lax.conv_general_dilated)
    assert theirs.count("convolution") == 2 and ours.count("convolution") == 1
    assert "dot_general" in ours


@pytest.mark.parametrize("hw,kernel,stride,pad", [
    ((1, 1), 3, 1, ((1, 1), (1, 1))),   # the lowest UNet level on 8x8 latents: only the centre tap is live
    ((2, 2), 3, 1, ((1, 1), (1, 1))),
    ((1, 3), 3, 1, ((1, 1), (1, 1))),   # only the live row of taps
    ((4, 4), 3, 1, ((1, 1), (1, 1))),
    ((2, 2), 3, 2, ((1, 1), (1, 1))),   # a UNet downsampler to 1x1
    ((7, 6), 3, 2, ((0, 1), (0, 1))),   # the VAE's asymmetric downsampler, 3x3 out
    ((3, 3), 1, 1, ((0, 0), (0, 0))),   # a 1x1 shortcut
])
def test_tiny_outputs_take_the_im2col_matmul_and_equal_lax(monkeypatch, hw, kernel, stride, pad):
    """On <= 16 output pixels a wide conv is one matmul (no XLA convolution at all, forward or
    backward), with lax's values and gradients (checked here at 6 -> 5 channels, the width
    floor lowered; `test_im2col_only_for_wide_convs` checks the floor)."""
    monkeypatch.setattr(layers, "_IM2COL_MIN_WEIGHTS", 1)
    x = jax.random.normal(jax.random.key(0), (3, *hw, 6))
    k = jax.random.normal(jax.random.key(1), (kernel, kernel, 6, 5))
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    ho, wo = ((n + sum(p) - kernel) // stride + 1 for n, p in zip(hw, pad))
    assert ho * wo <= layers._IM2COL_MAX_PIXELS
    weights = jax.random.normal(jax.random.key(2), (3, ho, wo, 5))

    def loss(fn):
        return lambda x_, k_: jnp.sum(fn(x_, k_, (stride, stride), pad, dimension_numbers=dn) * weights)

    ours, theirs = loss(layers.conv_general_dilated), loss(jax.lax.conv_general_dilated)
    np.testing.assert_allclose(ours(x, k), theirs(x, k), rtol=1e-5, atol=1e-4)
    for g, r in zip(jax.grad(ours, (0, 1))(x, k), jax.grad(theirs, (0, 1))(x, k)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-4)
    hlo = jax.jit(jax.value_and_grad(ours, (0, 1))).lower(x, k).as_text()
    assert "convolution" not in hlo and "dot_general" in hlo


def _softmax_attention(q, k, v, heads):
    b, lq, inner = q.shape
    qh, kh, vh = (a.reshape(a.shape[0], a.shape[1], heads, -1) for a in (q, k, v))
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", qh, kh) * (inner // heads) ** -0.5, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vh).reshape(b, lq, inner)


@pytest.mark.parametrize("lq,lk,max_logits,loops", [
    (24, 24, 10_000, 0),   # all heads at once
    (24, 24, 1_000, 1),    # one (batch, head) at a time, all queries in one chunk
    (24, 24, 200, 2),      # per head, in query chunks of 8 (the largest divisor of 24 with <= 200 logits)
    (24, 7, 100, 2),       # cross-attention shape: chunks of 12 queries over 7 keys
])
def test_cpu_attention_paths_equal_softmax_attention(monkeypatch, lq, lk, max_logits, loops):
    """Every CPU attention path (all heads; per head; per head in query chunks) gives plain
    softmax attention's values and gradients, and the big ones really loop."""
    monkeypatch.setattr(layers, "_MAX_LOGITS", max_logits)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, lq, 12)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, lk, 12)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((2, lq, 12)), jnp.float32)
    ours = lambda q_, k_, v_: jnp.sum(layers.multi_head_attention(q_, k_, v_, 3) * w)  # noqa: E731
    theirs = lambda q_, k_, v_: jnp.sum(_softmax_attention(q_, k_, v_, 3) * w)  # noqa: E731
    np.testing.assert_allclose(layers.multi_head_attention(q, k, v, 3), _softmax_attention(q, k, v, 3),
                               rtol=1e-5, atol=1e-5)
    for g, r in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(theirs, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    hlo = jax.jit(lambda *a: layers.multi_head_attention(*a, 3)).lower(q, k, v).as_text()
    assert hlo.count("stablehlo.while") == loops


@pytest.mark.parametrize("hw,channels,im2col", [
    ((2, 2), 1280, True),    # SD 1.5's lowest level on 8x8 latents: XLA's conv is ~30x slower there
    ((4, 4), 320, True),
    ((5, 4), 320, False),    # 20 output pixels: lax
    ((2, 2), 64, False),     # narrow (tiny test models): lax, which compiles faster
])
def test_im2col_only_for_wide_convs_on_tiny_images(hw, channels, im2col):
    x = jnp.zeros((1, *hw, channels))
    k = jnp.zeros((3, 3, channels, channels))
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    hlo = jax.jit(lambda x_, k_: layers.conv_general_dilated(x_, k_, (1, 1), ((1, 1), (1, 1)),
                                                             dimension_numbers=dn)).lower(x, k).as_text()
    assert ("convolution" not in hlo) == im2col
