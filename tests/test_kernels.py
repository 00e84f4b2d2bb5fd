"""The kernel choice (sdjax.models.kernels) and every attention/conv implementation that runs on CPU.

The accelerator implementations are run here on CPU, selected explicitly: XLA's
dot_product_attention, the Pallas TPU flash kernel (in TPU interpret mode) and lax's own conv
(the path every GPU/TPU conv takes). Each is checked against plain softmax attention or
lax.conv, values and gradients, float32 and bfloat16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from sdjax.models import kernels, layers
from sdjax.models.kernels import Kernels, KernelError, choose_attention, choose_conv

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
SD_SELF = (2, 4096, 8, 40)     # SD 1.5 self-attention at 64x64 latents
SD_CROSS_K = (2, 77, 8, 40)    # its cross-attention keys
VAE = (1, 4096, 1, 512)        # the VAE's single 512-wide head


@pytest.mark.parametrize("backend, dtype, q, k, causal, expected", [
    # GPU: cuDNN flash for half precision where it takes the head dim, XLA otherwise
    ("gpu", BF16, SD_SELF, SD_SELF, False, "cudnn"),
    ("gpu", F16, SD_SELF, SD_CROSS_K, False, "cudnn"),
    ("gpu", BF16, (2, 77, 12, 64), (2, 77, 12, 64), True, "cudnn"),       # CLIP, causal
    ("gpu", F32, SD_SELF, SD_SELF, False, "xla"),                          # cuDNN takes no float32
    ("gpu", BF16, VAE, VAE, False, "xla"),                                 # head dim 512
    ("gpu", BF16, (2, 64, 8, 160), (2, 64, 8, 160), False, "xla"),         # head dim 160 > 128
    ("gpu", BF16, (2, 64, 8, 36), (2, 64, 8, 36), False, "xla"),           # not a multiple of 8
    # TPU: Pallas flash where the sequences fill its 128-blocks and it is not causal
    ("tpu", BF16, SD_SELF, SD_SELF, False, "pallas"),
    ("tpu", F32, SD_SELF, SD_SELF, False, "pallas"),
    ("tpu", BF16, SD_SELF, SD_CROSS_K, False, "xla"),                      # 77 keys
    ("tpu", BF16, (2, 128, 12, 64), (2, 128, 12, 64), True, "xla"),        # causal
    # CPU: the chunked form, the plain one for causal attention
    ("cpu", F32, SD_SELF, SD_SELF, False, "chunked"),
    ("cpu", BF16, SD_SELF, SD_CROSS_K, False, "chunked"),
    ("cpu", F32, (2, 77, 12, 64), (2, 77, 12, 64), True, "softmax"),
    ("cpu", F16, (2, 77, 12, 64), (2, 77, 12, 64), True, "softmax"),
])
def test_auto_attention_per_backend_dtype_and_shape(backend, dtype, q, k, causal, expected):
    assert choose_attention(backend, dtype, q, k, causal=causal) == expected


def test_requested_attention_is_honoured_where_it_can_run():
    assert choose_attention("gpu", BF16, SD_SELF, SD_SELF, "xla") == "xla"
    assert choose_attention("gpu", BF16, SD_SELF, SD_SELF, "softmax") == "softmax"
    assert choose_attention("cpu", BF16, SD_SELF, SD_SELF, "xla") == "xla"
    assert choose_attention("tpu", F32, SD_SELF, SD_SELF, "chunked") == "chunked"
    # where the named kernel cannot take the shape, XLA's
    assert choose_attention("gpu", F32, SD_SELF, SD_SELF, "cudnn") == "xla"
    assert choose_attention("tpu", F32, SD_SELF, SD_CROSS_K, "pallas") == "xla"
    assert choose_attention("cpu", F32, (1, 77, 1, 8), (1, 77, 1, 8), "chunked", causal=True) == "softmax"
    assert choose_attention("cpu", F16, (1, 77, 1, 8), (1, 77, 1, 8), "xla", causal=True) == "softmax"


def test_impossible_or_unknown_requests_are_errors():
    with pytest.raises(KernelError, match="only on GPU"):
        choose_attention("cpu", BF16, SD_SELF, SD_SELF, "cudnn")
    with pytest.raises(KernelError, match="only on TPU"):
        Kernels(attention="pallas", backend="gpu")
    with pytest.raises(KernelError, match="choose one of"):
        Kernels(attention="flash")
    with pytest.raises(KernelError, match="tuned for CPU"):
        Kernels(conv="matmul", backend="gpu")
    with pytest.raises(KernelError, match="unknown backend"):
        choose_conv("npu")


def test_conv_choice_per_backend():
    assert choose_conv("cpu") == "matmul"
    assert choose_conv("gpu") == "xla"
    assert choose_conv("tpu") == "xla"
    assert choose_conv("cpu", "xla") == "xla"
    assert Kernels(backend="cuda").backend == "gpu"


def test_environment_overrides_resolve(monkeypatch):
    monkeypatch.setenv("SDJAX_ATTENTION", "xla")
    monkeypatch.setenv("SDJAX_CONV", "xla")
    assert Kernels.resolve() == Kernels(attention="xla", conv="xla", backend=jax.default_backend())
    assert Kernels.resolve(attention="softmax").attention == "softmax"  # an argument beats the variable
    monkeypatch.setenv("SDJAX_ATTENTION", "nonsense")
    with pytest.raises(KernelError):
        Kernels.resolve()


# ---- every implementation that runs on CPU, against softmax attention ----------------------

def _qkv(dtype, lq=256, lk=256, heads=2, dh=32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (2, lq, heads * dh), F32)
    k = jax.random.normal(kk, (2, lk, heads * dh), F32)
    v = jax.random.normal(kv, (2, lk, heads * dh), F32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _run(impl, q, k, v, heads, causal, grad=False):
    # The Pallas kernel is TPU-only: its Kernels say so, and it runs here in TPU interpret mode.
    choice = Kernels(attention=impl, backend="tpu" if impl == "pallas" else "cpu")

    def f(q, k, v):
        return layers.multi_head_attention(q, k, v, heads, choice, causal=causal)

    def g(q, k, v):
        return jax.grad(lambda *a: jnp.sum(f(*a).astype(F32) * jnp.cos(jnp.arange(q.shape[-1]))), (0, 1, 2))(q, k, v)

    fn = g if grad else f
    if impl == "pallas":
        with pltpu.force_tpu_interpret_mode():
            return jax.jit(fn)(q, k, v)
    return jax.jit(fn)(q, k, v)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = [("xla", False), ("xla", True), ("chunked", False), ("pallas", False)]


@pytest.mark.parametrize("impl, causal", CASES)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_implementation_matches_softmax_attention(impl, causal, dtype):
    lk = 256 if impl == "pallas" else 77  # cross-attention length where the kernel takes it
    q, k, v = _qkv(dtype, lk=256 if causal else lk)
    out = _run(impl, q, k, v, 2, causal)
    ref = _run("softmax", q.astype(F32), k.astype(F32), v.astype(F32), 2, causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, ref) < (1e-5 if dtype == F32 else 1e-2)
    backend = "tpu" if impl == "pallas" else "cpu"
    assert kernels.choose_attention(backend, dtype, (2, 256, 2, 32), (2, k.shape[1], 2, 32), impl, causal=causal) == impl


@pytest.mark.parametrize("impl, causal", CASES)
def test_implementation_gradients_match_softmax_attention(impl, causal):
    q, k, v = _qkv(F32, lq=128, lk=128)
    grads = _run(impl, q, k, v, 2, causal, grad=True)
    ref = _run("softmax", q, k, v, 2, causal, grad=True)
    for g, r in zip(grads, ref):
        assert _rel(g, r) < 1e-4


def test_chunked_attention_in_chunks_matches_softmax(monkeypatch):
    # Past _MAX_LOGITS the chunked form loops over heads and query chunks; force that here.
    monkeypatch.setattr(layers, "_MAX_LOGITS", 64 * 77)
    q, k, v = _qkv(F32, lq=256, lk=77)
    assert _rel(_run("chunked", q, k, v, 2, False), _run("softmax", q, k, v, 2, False)) < 1e-5


def test_softmax_causal_masks_the_future():
    q, k, v = _qkv(F32, lq=16, lk=16)
    out = _run("softmax", q, k, v, 2, True)
    # The first position sees only itself: its output is its own value.
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-5, atol=1e-5)


# ---- convolutions --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 16, 16, 8), (3, 3, 8, 16), 1, ((1, 1), (1, 1))),
    ((2, 4, 4, 256), (3, 3, 256, 256), 1, ((1, 1), (1, 1))),   # im2col form in the matmul conv
    ((2, 9, 9, 8), (3, 3, 8, 8), 2, ((0, 1), (0, 1))),          # the VAE's asymmetric downsample
])
def test_conv_implementations_match_lax(dtype, shape, kernel, stride, padding):
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, shape, F32).astype(dtype)
    w = (jax.random.normal(kw, kernel, F32) * 0.1).astype(dtype)
    dn = jax.lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))
    args = dict(dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST)

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, **args)

    expected = ref(x, w)
    g = jax.random.normal(kg, expected.shape, F32).astype(dtype)
    ref_grads = jax.vjp(ref, x, w)[1](g)
    for fn in (layers.conv_xla, layers.conv_matmul, layers.conv_general_dilated):
        def f(x, w, fn=fn):
            return fn(x, w, (stride, stride), padding, lhs_dilation=None, rhs_dilation=None,
                      feature_group_count=1, **args)
        out, vjp = jax.vjp(jax.jit(f), x, w)
        tol = 1e-5 if dtype == F32 else 2e-2
        assert _rel(out, expected) < tol
        for a, b in zip(vjp(g), ref_grads):
            assert _rel(a, b) < tol


def test_dilated_and_grouped_convs_reach_lax_by_keyword():
    # The bug that broke every accelerator conv: precision passed positionally into
    # batch_group_count. Dilation or groups send the matmul conv to lax on CPU too.
    x = jax.random.normal(jax.random.key(2), (1, 12, 12, 4), F32)
    w = jax.random.normal(jax.random.key(3), (3, 3, 2, 4), F32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    for fn in (layers.conv_xla, layers.conv_matmul, layers.conv_general_dilated):
        out = fn(x, w, (1, 1), ((2, 2), (2, 2)), lhs_dilation=(1, 1), rhs_dilation=(2, 2),
                 dimension_numbers=dn, feature_group_count=2, precision=jax.lax.Precision.HIGHEST)
        expected = jax.lax.conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
                                                dimension_numbers=dn, feature_group_count=2,
                                                precision=jax.lax.Precision.HIGHEST)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_apply_kernels_sets_modules_and_changes_the_graphdef():
    from conftest import reference
    from sdjax.models.attention import Attention
    from sdjax.models.unet import UNet2DConditionModel, UNetConfig
    from sdjax_tiny import tiny_configs

    config = UNetConfig.from_dict(tiny_configs(reference("sd15"))["unet"])
    model = UNet2DConditionModel(config, rngs=nnx.Rngs(0))
    before = nnx.graphdef(model)
    choice = Kernels(attention="xla", conv="xla", backend="cpu")
    layers.apply_kernels(model, choice)
    convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
    atts = [m for _, m in nnx.iter_graph(model) if isinstance(m, Attention)]
    assert convs and atts
    assert all(c.conv_general_dilated is layers.conv_xla for c in convs)
    assert all(a.kernels == choice for a in atts)
    assert nnx.graphdef(model) != before
