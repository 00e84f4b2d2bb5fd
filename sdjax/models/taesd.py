"""TAESD, the tiny autoencoder's decoder (madebyollin; diffusers `AutoencoderTiny.decoder`). Math only.

Used for live previews: it turns the UNet's latents (already scaled, as the sampler sees them:
TAESD's own scaling_factor is 1) into an image in [-1, 1], ~100x cheaper than the SD VAE.

Layout NHWC. The module tree mirrors diffusers' `DecoderTiny.layers`, an `nn.Sequential`
whose parameter-free entries (ReLU, Upsample) are kept as None here so the indices match:

    layers.0        conv latent -> C0, then ReLU at 1
    per stage i:    num_blocks[i] x AutoencoderTinyBlock, nearest x2 upsample (not the last
                    stage), conv C_i -> C_i without bias (the last stage: C -> 3 with bias)

with the input soft-clamped to tanh(x / 3) * 3 and the output mapped from [0, 1] to [-1, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.errors import ConfigError
from sdjax.models.layers import conv


@dataclasses.dataclass(frozen=True)
class TAESDConfig:
    """diffusers `AutoencoderTiny` config (only the decoder's fields change the network).

    The encoder's fields, latent_magnitude / latent_shift (the encoder's byte packing),
    force_upcast, scaling_factor (1.0) and shift_factor (0.0) are accepted and kept."""

    latent_channels: int = 4
    out_channels: int = 3
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    upsampling_scaling_factor: int = 2
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    in_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    block_out_channels: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TAESDConfig":
        """Read an AutoencoderTiny config.json dict; `_`-prefixed keys are metadata.
        ConfigError names unknown keys and unsupported values (act_fn other than relu,
        upsample_fn other than nearest, a scaling_factor other than 1 or a shift_factor)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in fields)
        if unknown:
            raise ConfigError(f"unknown AutoencoderTiny config keys {unknown}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
        config = cls(**kw)
        problems = []
        if config.act_fn != "relu":
            problems.append(f"act_fn {config.act_fn!r} (only 'relu')")
        if config.upsample_fn != "nearest":
            problems.append(f"upsample_fn {config.upsample_fn!r} (only 'nearest')")
        if float(config.scaling_factor) != 1.0 or float(config.shift_factor or 0.0) != 0.0:
            problems.append("scaling_factor / shift_factor other than 1 / 0")
        if len(config.decoder_block_out_channels) != len(config.num_decoder_blocks):
            problems.append("decoder_block_out_channels and num_decoder_blocks differ in length")
        if problems:
            raise ConfigError("unsupported AutoencoderTiny config: " + "; ".join(problems))
        return config


class TinyBlock(nnx.Module):
    """diffusers `AutoencoderTinyBlock`: relu(conv(relu(conv(relu(conv(x))))) + skip(x))."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv = nnx.List([conv(in_ch, out_ch, 3, **kw), None, conv(out_ch, out_ch, 3, **kw), None,
                              conv(out_ch, out_ch, 3, **kw)])
        self.skip = (nnx.Conv(in_ch, out_ch, (1, 1), use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs) if in_ch != out_ch else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.conv[0](x))
        h = jax.nn.relu(self.conv[2](h))
        h = self.conv[4](h)
        return jax.nn.relu(h + (self.skip(x) if self.skip is not None else x))


class TAESDDecoder(nnx.Module):
    """decode(latents (B, h, w, C) scaled as the UNet sees them) -> images (B, 8h, 8w, 3) in [-1, 1]
    (for 4 stages: 2 ** (stages - 1) per side)."""

    def __init__(self, config: TAESDConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans, blocks = config.decoder_block_out_channels, config.num_decoder_blocks
        layers: list = [conv(config.latent_channels, chans[0], 3, **kw), None]
        self.upsample_at: tuple[int, ...] = ()
        ups = []
        for i, n in enumerate(blocks):
            last = i == len(blocks) - 1
            layers += [TinyBlock(chans[i], chans[i], **kw) for _ in range(n)]
            if not last:
                ups.append(len(layers))
                layers.append(None)
            out = config.out_channels if last else chans[i]
            c = conv(chans[i], out, 3, **kw)
            if not last:
                c = nnx.Conv(chans[i], out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs, conv_general_dilated=c.conv_general_dilated)
            layers.append(c)
        self.upsample_at = tuple(ups)
        self.relu_at = (1,)
        self.layers = nnx.List(layers)

    def __call__(self, latents: jax.Array) -> jax.Array:
        x = jnp.tanh(latents / 3.0) * 3.0
        f = int(self.config.upsampling_scaling_factor)
        for i, layer in enumerate(self.layers):
            if i in self.relu_at:
                x = jax.nn.relu(x)
            elif i in self.upsample_at:
                x = jnp.repeat(jnp.repeat(x, f, axis=1), f, axis=2)  # nearest
            else:
                x = layer(x)
        return x * 2.0 - 1.0


__all__ = ["TAESDConfig", "TAESDDecoder", "TinyBlock"]
