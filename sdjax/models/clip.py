"""The CLIP text encoders (transformers `CLIPTextModel`, `CLIPTextModelWithProjection`) in Flax NNX. Math only.

Attribute names mirror transformers v5 (no `text_model.` level), so torch names
map mechanically: `embeddings.token_embedding`, `encoder.layers.3.self_attn.q_proj`,
`final_layer_norm`, ... (v4 checkpoints are renamed by `sdjax.weights.names.clip_text`).
`CLIPTextModelWithProjection` (SDXL's OpenCLIP ViT-bigG second encoder) has the same names
plus `text_projection` (a bias-free Linear, pooled -> projection_dim).

Precision: parameters in `param_dtype`, matmuls and the residual stream in `dtype`;
layer-norm statistics and the attention softmax in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.errors import ConfigError
from sdjax.models.layers import LayerNorm, multi_head_attention

# transformers' ACT2FN entries we implement exactly.
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
_DTYPES = ("float32", "float16", "bfloat16")
_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool))


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """A transformers CLIPTextConfig, as read from a text encoder's `config.json`.

    Defaults are transformers' own, so a key missing from the file behaves as in transformers.
    `projection_dim` is the width of `CLIPTextModelWithProjection.text_projection` (unused by CLIPTextModel);
    `checkpoint_dtype` is the file's `torch_dtype`/`dtype` (metadata).
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    projection_dim: int | None = 512
    checkpoint_dtype: str | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """Validate a transformers CLIPTextConfig dict; unknown keys or unsupported values raise ConfigError."""
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key.startswith("_"):
                continue  # `_name_or_path`, `_commit_hash`, ...: metadata.
            if key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "max_position_embeddings"):
                if not _is_int(value) or value <= 0:
                    raise ConfigError(f"text encoder config: {key}={value!r} must be a positive integer")
                kw[key] = value
            elif key == "hidden_act":
                if value not in _ACTIVATIONS:
                    raise ConfigError(f"text encoder config: hidden_act={value!r} is not supported; "
                                      f"supported: {', '.join(_ACTIVATIONS)}")
                kw[key] = value
            elif key == "layer_norm_eps":
                if not _is_number(value) or value <= 0:
                    raise ConfigError(f"text encoder config: layer_norm_eps={value!r} must be a positive number")
                kw[key] = float(value)
            elif key == "eos_token_id":
                # transformers pools at the eos position; a list of eos ids has no defined pooling there.
                if not _is_int(value):
                    raise ConfigError(f"text encoder config: eos_token_id={value!r} must be one integer")
                kw[key] = value
            elif key in ("pad_token_id", "bos_token_id", "projection_dim"):
                if value is not None and not _is_int(value):
                    raise ConfigError(f"text encoder config: {key}={value!r} must be an integer or null")
                kw[key] = value
            elif key in ("attention_dropout", "dropout", "initializer_range", "initializer_factor"):
                # Training-time only (inference has no dropout): any number is accepted and unused.
                if value is not None and not _is_number(value):
                    raise ConfigError(f"text encoder config: {key}={value!r} must be a number")
            elif key in ("torch_dtype", "dtype"):
                if value is not None and value not in _DTYPES:
                    raise ConfigError(f"text encoder config: {key}={value!r} is not supported; "
                                      f"supported: {', '.join(_DTYPES)} or null")
                kw["checkpoint_dtype"] = value
            elif key == "architectures":
                if value is not None and (not isinstance(value, list)
                                          or any(a not in _ARCHITECTURES for a in value)):
                    raise ConfigError(f"text encoder config: architectures={value!r} is not supported; "
                                      f"supported: a list of {', '.join(_ARCHITECTURES)}")
            elif key == "model_type":
                if value != "clip_text_model":
                    raise ConfigError(f"text encoder config: model_type={value!r} is not supported; "
                                      f"supported: 'clip_text_model'")
            elif key == "transformers_version":
                if not isinstance(value, str):
                    raise ConfigError(f"text encoder config: transformers_version={value!r} must be a string")
            else:
                raise ConfigError(f"text encoder config: unknown key {key!r} (value {value!r}); "
                                  f"sdjax supports transformers CLIPTextConfig keys only")
        cfg = cls(**kw)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"text encoder config: hidden_size={cfg.hidden_size} is not a multiple of "
                              f"num_attention_heads={cfg.num_attention_heads}")
        return cfg


class CLIPTextOutput(NamedTuple):
    """last_hidden_state (B, L, D) after the final layer norm; pooled_output (B, D) at the eos
    position; hidden_states: num_hidden_layers + 1 arrays (B, L, D) -- the embeddings, then each
    layer's output, all before the final layer norm -- or None; text_embeds (B, projection_dim):
    `text_projection(pooled_output)` of a CLIPTextModelWithProjection, else None."""

    last_hidden_state: jax.Array
    pooled_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None
    text_embeds: jax.Array | None = None


class CLIPTextEmbeddings(nnx.Module):
    """Token plus learned absolute position embeddings. input_ids (B, L) int -> (B, L, D)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[-1]
        max_len = self.position_embedding.num_embeddings
        if length > max_len:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {max_len}")
        positions = jnp.arange(length, dtype=jnp.int32)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
    """Multi-head causal self-attention with q/k/v/out projections (with biases). (B, L, D) -> (B, L, D)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        d = config.hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads = config.num_attention_heads
        self.k_proj = nnx.Linear(d, d, **kw)
        self.v_proj = nnx.Linear(d, d, **kw)
        self.q_proj = nnx.Linear(d, d, **kw)
        self.out_proj = nnx.Linear(d, d, **kw)
        self.kernels = None  # sdjax.models.kernels.Kernels, set by layers.apply_kernels

    def __call__(self, x: jax.Array) -> jax.Array:
        out = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, self.kernels,
                                   causal=True)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    """fc1 -> activation (config.hidden_act) -> fc2. (B, L, D) -> (B, L, D)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.hidden_act = config.hidden_act
        self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(.)). (B, L, D) -> (B, L, D)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = CLIPAttention(config, **kw)
        self.layer_norm1 = LayerNorm(config.hidden_size, config.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(config, **kw)
        self.layer_norm2 = LayerNorm(config.hidden_size, config.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """The stack of `num_hidden_layers` encoder layers, in `layers` (an nnx.List)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.layers = nnx.List([CLIPEncoderLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(config.num_hidden_layers)])

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """x: (B, L, D) -> (last output, (x, output of layer 0, ..., output of the last layer))."""
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return x, tuple(states)


class CLIPTextModel(nnx.Module):
    """transformers CLIPTextModel: causal transformer over token ids, pooled at the eos token.

    Attribute names: `embeddings`, `encoder.layers[i]`, `final_layer_norm` (transformers v5 names).
    `final_layer_norm` may be applied to any entry of `hidden_states` (clip skip).
    """

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.eos_token_id = config.eos_token_id
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, **kw)

    def __call__(self, input_ids: jax.Array, *, output_hidden_states: bool = False) -> CLIPTextOutput:
        """input_ids: (B, L) integer token ids, L <= max_position_embeddings.

        Returns CLIPTextOutput with arrays in the compute dtype; see its docstring for shapes.
        """
        hidden = self.embeddings(input_ids)
        last, states = self.encoder(hidden)
        last_hidden_state = self.final_layer_norm(last)
        ids = input_ids.astype(jnp.int32)
        if self.eos_token_id == 2:
            # transformers keeps this legacy rule for configs with the pre-PR-#24773 eos id:
            # the eot token has the largest id in CLIP's vocabulary, so pool at argmax(ids).
            eos_pos = jnp.argmax(ids, axis=-1)
        else:
            # The first occurrence of eos (pad may equal eos).
            eos_pos = jnp.argmax((ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last_hidden_state, eos_pos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last_hidden_state, pooled, states if output_hidden_states else None)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers CLIPTextModelWithProjection: CLIPTextModel plus `text_projection` (no bias),
    applied to the eos-pooled output (`CLIPTextOutput.text_embeds`). SDXL's second text encoder."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if config.projection_dim is None:
            raise ConfigError("text encoder config: CLIPTextModelWithProjection needs projection_dim")
        self.text_projection = nnx.Linear(config.hidden_size, config.projection_dim, use_bias=False, rngs=rngs,
                                          dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, *, output_hidden_states: bool = False) -> CLIPTextOutput:
        """As CLIPTextModel, with `text_embeds` (B, projection_dim) filled in."""
        out = super().__call__(input_ids, output_hidden_states=output_hidden_states)
        return out._replace(text_embeds=self.text_projection(out.pooled_output))
