"""Which attention and convolution implementation runs where: the one place that decides.

Every implementation computes the same math (logits and softmax in float32, values back in
the inputs' dtype); they differ only in speed and memory on each backend.

Attention (`ATTENTION`):
    "softmax"  einsum + float32 softmax with the (B, H, Lq, Lk) logits materialised: the plain
               reference form, any backend.
    "xla"      `jax.nn.dot_product_attention(implementation="xla")`: XLA's own, any backend.
    "cudnn"    `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention,
               NVIDIA GPUs only, bfloat16/float16 with a head dim <= 128 and a multiple of 8
               (cuDNN's limit before Hopper; taking 128 everywhere keeps the choice a function of
               the shapes alone). Softmax in float32 inside the kernel.
    "chunked"  sdjax's CPU form (`layers._attend_cpu`): (B, H, L, D) einsums normalised after
               the PV product, one (batch, head) and query chunk at a time past 16 MiB of
               logits. XLA:CPU does not fuse attention; this keeps each pass in cache.
    "pallas"   `jax.experimental.pallas.ops.tpu.flash_attention`: TPU flash attention, for
               non-causal attention whose sequence lengths are multiples of 128 (its blocks).

Convolution (`CONV`):
    "xla"      `jax.lax.conv_general_dilated` (cuDNN on GPU, the TPU's convolution units).
    "matmul"   CPU only where measured: wide convs on tiny outputs as one im2col matmul, and the
               kernel gradient as matmuls (`layers._conv2d`); other convs go to lax.

`choose_attention` and `choose_conv` are pure functions of (backend, dtype, shapes, request).
"auto" picks per backend: cudnn on GPU (xla where cuDNN cannot take the shape or the dtype,
e.g. float32 or the VAE's 512-wide single head), pallas on TPU (xla where its blocks do not
fit), chunked on CPU (softmax for causal attention, which the chunked form does not mask);
convs are matmul on CPU and xla elsewhere. A named request is honoured where that
implementation can take the call, else it falls back as "auto" does ("chunked" to softmax,
the others to xla; xla itself to softmax for float16 on CPU, whose F16_F16_F32 dot XLA:CPU
cannot compile); naming an implementation the backend cannot run at all ("cudnn" on CPU) is
an error.

Models carry a `Kernels` value (`layers.apply_kernels`); one that carries none resolves "auto"
on the default backend when it is traced. `Kernels.resolve` reads SDJAX_ATTENTION / SDJAX_CONV.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from sdjax.errors import KernelError

ATTENTION = ("auto", "softmax", "xla", "cudnn", "chunked", "pallas")
CONV = ("auto", "xla", "matmul")
BACKENDS = ("cpu", "gpu", "tpu")
# Implementations a backend cannot run at all, whatever the shapes.
_ATTENTION_BACKENDS = {"cudnn": ("gpu",), "pallas": ("tpu",)}
_CUDNN_MAX_HEAD_DIM = 128
_PALLAS_BLOCK = 128


def _backend(backend: str | None) -> str:
    if backend is None:
        backend = jax.default_backend()
    backend = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
    if backend not in BACKENDS:
        raise KernelError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise KernelError(f"{name}={value!r} is not an implementation sdjax has; choose one of {', '.join(allowed)}")


def check_attention(requested: str, backend: str | None = None) -> None:
    """KernelError if `requested` is unknown or cannot run on `backend` at all."""
    _check("attention", requested, ATTENTION)
    backend = _backend(backend)
    needs = _ATTENTION_BACKENDS.get(requested)
    if needs and backend not in needs:
        raise KernelError(f"attention={requested!r} runs only on {'/'.join(needs).upper()}, and this backend is "
                          f"{backend}; use 'auto' (or one of softmax, xla, chunked)")


def choose_attention(backend: str | None, dtype, q_shape: tuple[int, ...], k_shape: tuple[int, ...],
                     requested: str = "auto", *, causal: bool = False) -> str:
    """The attention implementation for one call.

    backend: "cpu" / "gpu" / "tpu" (None: JAX's default backend); dtype: of q, k, v;
    q_shape (B, Lq, H, D), k_shape (B, Lk, H, D); requested: a name from `ATTENTION`.
    Returns a concrete name (never "auto").
    """
    backend = _backend(backend)
    check_attention(requested, backend)
    _, lq, _, head_dim = q_shape
    lk = k_shape[1]
    dtype = jnp.dtype(dtype)

    def cudnn_takes() -> bool:
        return (dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
                and head_dim <= _CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0)

    def pallas_takes() -> bool:
        return not causal and lq % _PALLAS_BLOCK == 0 and lk % _PALLAS_BLOCK == 0

    if requested == "auto":
        requested = {"gpu": "cudnn", "tpu": "pallas", "cpu": "chunked"}[backend]
    if requested == "chunked" and causal:
        # The chunked form has no mask; CLIP's 77 causal tokens are small: the plain form.
        return "softmax"
    if (requested == "cudnn" and not cudnn_takes()) or (requested == "pallas" and not pallas_takes()):
        requested = "xla"
    if requested == "xla" and backend == "cpu" and dtype == jnp.dtype(jnp.float16):
        # XLA's attention asks for an F16_F16_F32 dot, which XLA:CPU cannot compile.
        return "softmax"
    return requested


def choose_conv(backend: str | None, requested: str = "auto") -> str:
    """The conv implementation: "matmul" on CPU, "xla" elsewhere, unless `requested` names one.
    ("matmul" itself leaves every conv its forms were not measured for to lax.)"""
    backend = _backend(backend)
    _check("conv", requested, CONV)
    if requested == "auto":
        return "matmul" if backend == "cpu" else "xla"
    if requested == "matmul" and backend != "cpu":
        raise KernelError(f"conv='matmul' is tuned for CPU only, and this backend is {backend}; use 'auto' or 'xla'")
    return requested


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The requested implementations and the backend they run on (a static model attribute).

    attention: a name from `ATTENTION`; conv: a name from `CONV`; backend: "cpu"/"gpu"/"tpu"
    (None: JAX's default backend, fixed when the value is made).
    """

    attention: str = "auto"
    conv: str = "auto"
    backend: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "backend", _backend(self.backend))
        check_attention(self.attention, self.backend)
        choose_conv(self.backend, self.conv)

    @classmethod
    def resolve(cls, attention: str | None = None, conv: str | None = None,
                backend: str | None = None) -> "Kernels":
        """Kernels for `backend` (default: JAX's default backend); a None request reads
        SDJAX_ATTENTION / SDJAX_CONV, else "auto"."""
        return cls(attention=attention or os.environ.get("SDJAX_ATTENTION") or "auto",
                   conv=conv or os.environ.get("SDJAX_CONV") or "auto",
                   backend=_backend(backend))

    def attention_for(self, dtype, q_shape, k_shape, *, causal: bool = False) -> str:
        return choose_attention(self.backend, dtype, q_shape, k_shape, self.attention, causal=causal)


def attention_impl(kernels: Kernels | None, dtype, q_shape, k_shape, *, causal: bool = False) -> str:
    """`kernels.attention_for(...)`, or "auto" on JAX's default backend for a model without kernels."""
    if kernels is None:
        return choose_attention(None, dtype, q_shape, k_shape, causal=causal)
    return kernels.attention_for(dtype, q_shape, k_shape, causal=causal)
