"""diffusers' ControlNetModel (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models") for SD 1.x / 2.x and SDXL, in Flax NNX. Math only, NHWC.

A ControlNet is a trainable copy of the UNet's encoder (conv_in, time embedding, down blocks,
mid block; the classes are imported from `sdjax.models.unet`, not copied) plus

    controlnet_cond_embedding   a small conv net taking the control image (pixel resolution,
                                in [0, 1]) to the latent resolution and block_out_channels[0]
    controlnet_down_blocks[i]   one zero-initialised 1x1 conv per UNet skip activation
    controlnet_mid_block        one zero-initialised 1x1 conv on the mid-block output

An SDXL ControlNet (`addition_embed_type="text_time"`) also has the UNet's `add_embedding`: the
pooled text embedding and the time ids join the timestep embedding exactly as in the UNet.

Its outputs are the residuals the UNet adds to its skips and mid-block output
(`UNet2DConditionModel.__call__(..., down_residuals=, mid_residual=)`). Attribute names
mirror diffusers so its state_dict maps mechanically.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.errors import ConfigError
from sdjax.models.layers import conv
from sdjax.models.unet import (CrossAttnDownBlock2D, DownBlock2D, TimestepEmbedding, UNetConfig,
                               UNetMidBlock2DCrossAttn, num_down_residuals, timestep_embedding)

__all__ = ["ControlNetConfig", "ControlNetModel", "ControlNetConditioningEmbedding", "guess_mode_scales",
           "sum_residuals"]

# Keys of diffusers' ControlNetModel.__init__ that are UNet settings: validated by UNetConfig.
_UNET_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim",
    "num_attention_heads", "use_linear_projection", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "addition_embed_type_num_heads",
)
# Keys only a ControlNet has.
_CONTROLNET_KEYS = ("conditioning_channels", "controlnet_conditioning_channel_order",
                    "conditioning_embedding_out_channels", "global_pool_conditions")
_DOWN = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}


def _positive_ints(key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise ConfigError(f"controlnet config: {key}={value!r} must be a non-empty list of positive integers")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """diffusers ControlNetModel config, normalised.

    `unet` holds the encoder settings shared with the UNet (validated exactly as a UNet
    config: same supported values); the other fields are ControlNet's own. `flip_channels`
    is diffusers' `controlnet_conditioning_channel_order == "bgr"`: the control image's
    channels are reversed before the conditioning embedding.
    """

    unet: UNetConfig = UNetConfig()
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    flip_channels: bool = False
    global_pool_conditions: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        """Read a diffusers ControlNetModel `config.json` dict; unsupported keys or values raise ConfigError."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(d) - set(_UNET_KEYS) - set(_CONTROLNET_KEYS))
        if unknown:
            raise ConfigError(f"controlnet config: unknown key(s) {unknown}; not a diffusers ControlNetModel "
                              "config sdjax knows")
        # diffusers' ControlNetModel passes these whole to every down block (no per-block lists).
        for key in ("layers_per_block", "cross_attention_dim"):
            if isinstance(d.get(key), (list, tuple)):
                raise ConfigError(f"controlnet config: {key}={d[key]!r}: diffusers' ControlNetModel takes "
                                  "one integer here, not a list per block")
        unet_dict = {k: v for k, v in d.items() if k in _UNET_KEYS}
        # Unlike the UNet, ControlNetModel accepts num_attention_heads: `heads = num_attention_heads or
        # attention_head_dim`, which is UNetConfig's legacy rule once the value is moved over.
        heads = unet_dict.pop("num_attention_heads", None)
        if heads is not None:
            unet_dict["attention_head_dim"] = heads
        # A ControlNet has no up path; give UNetConfig the mirror of the down path so its
        # one-up-block-per-level check holds for any number of levels.
        down = unet_dict.get("down_block_types", UNetConfig.down_block_types)
        if isinstance(down, (list, tuple)) and all(isinstance(t, str) for t in down):
            unet_dict["up_block_types"] = [t.replace("Down", "Up") for t in reversed(down)]
        try:
            unet = UNetConfig.from_dict(unet_dict)
        except ConfigError as e:
            raise ConfigError(f"controlnet config: {str(e).removeprefix('unet config: ')}") from None

        order = d.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ConfigError(f"controlnet config: controlnet_conditioning_channel_order={order!r}; "
                              "diffusers supports 'rgb' or 'bgr'")
        channels = d.get("conditioning_channels", 3)
        _positive_ints("conditioning_channels", [channels])
        embed = _positive_ints("conditioning_embedding_out_channels",
                               d.get("conditioning_embedding_out_channels", [16, 32, 96, 256]))
        pool = d.get("global_pool_conditions", False)
        if not isinstance(pool, bool):
            raise ConfigError(f"controlnet config: global_pool_conditions={pool!r} must be a bool")
        return cls(unet=unet, conditioning_channels=channels, conditioning_embedding_out_channels=embed,
                   flip_channels=order == "bgr", global_pool_conditions=pool)

    @property
    def num_down_residuals(self) -> int:
        """How many down residuals the ControlNet returns (= the UNet's skip activations)."""
        return num_down_residuals(self.unet)

    @property
    def image_downscale(self) -> int:
        """Control image pixels per latent pixel: 2 ** (len(conditioning_embedding_out_channels) - 1)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


def _zero(c: nnx.Conv) -> nnx.Conv:
    """diffusers' `zero_module`: a conv whose kernel and bias start at zero (training from scratch)."""
    c.kernel.set_value(jnp.zeros_like(c.kernel.get_value()))
    c.bias.set_value(jnp.zeros_like(c.bias.get_value()))
    return c


class ControlNetConditioningEmbedding(nnx.Module):
    """Control image (B, H, W, conditioning_channels) -> (B, H / 2**(n-1), W / 2**(n-1), out_channels).

    conv_in -> SiLU -> [3x3 conv -> SiLU -> 3x3 stride-2 conv -> SiLU] per channel step -> conv_out
    (zero-initialised); `blocks` alternates the two convs, as in diffusers.
    """

    def __init__(self, out_channels: int, conditioning_channels: int, block_out_channels: Sequence[int], *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_in = conv(conditioning_channels, block_out_channels[0], 3, **kw)
        blocks = []
        for ch_in, ch_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            blocks.append(conv(ch_in, ch_in, 3, **kw))
            blocks.append(conv(ch_in, ch_out, 3, stride=2, padding=1, **kw))
        self.blocks = nnx.List(blocks)
        self.conv_out = _zero(conv(block_out_channels[-1], out_channels, 3, **kw))

    def __call__(self, cond: jax.Array) -> jax.Array:
        x = jax.nn.silu(self.conv_in(cond))
        for block in self.blocks:
            x = jax.nn.silu(block(x))
        return self.conv_out(x)


def guess_mode_scales(n_down: int, conditioning_scale: jax.Array | float = 1.0) -> jax.Array:
    """diffusers' guess-mode weights: `logspace(-1, 0, n_down + 1) * conditioning_scale`, float32.

    Entry i scales down residual i (0.1 for conv_in's, rising geometrically); the last (1.0)
    scales the mid residual.
    """
    return jnp.logspace(-1.0, 0.0, n_down + 1, dtype=jnp.float32) * jnp.asarray(conditioning_scale, jnp.float32)


class ControlNetModel(nnx.Module):
    """ControlNet for the SD 1.x / 2.x and SDXL UNets. Params in `param_dtype`, compute in `dtype`."""

    def __init__(self, config: ControlNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        cfg = config.unet
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans = cfg.block_out_channels
        temb_ch = chans[0] * 4
        self.conv_in = conv(cfg.in_channels, chans[0], 3, **kw)
        self.time_embedding = TimestepEmbedding(chans[0], temb_ch, **kw)
        # diffusers' `add_time_proj` (Timesteps) has no weights: `timestep_embedding` in __call__.
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_ch, **kw) \
            if cfg.addition_embed_type == "text_time" else None
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            chans[0], config.conditioning_channels, config.conditioning_embedding_out_channels, **kw)

        down, zero_convs, out_ch = [], [_zero(conv(chans[0], chans[0], 1, padding=0, **kw))], chans[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, chans[i]
            last = i == len(chans) - 1
            down.append(_DOWN[kind](cfg, i, in_ch, out_ch, temb_ch, add_downsample=not last, kw=kw))
            # One zero conv per skip activation the block emits: its resnets, then its downsampler.
            for _ in range(cfg.layers_per_block[i] + (0 if last else 1)):
                zero_convs.append(_zero(conv(out_ch, out_ch, 1, padding=0, **kw)))
        self.down_blocks = nnx.List(down)
        self.controlnet_down_blocks = nnx.List(zero_convs)
        self.mid_block = UNetMidBlock2DCrossAttn(cfg, chans[-1], temb_ch, kw=kw)
        self.controlnet_mid_block = _zero(conv(chans[-1], chans[-1], 1, padding=0, **kw))

    def __call__(self, latents_nhwc: jax.Array, timesteps: jax.Array | float | int, context: jax.Array,
                 cond_image_nhwc: jax.Array, conditioning_scale: jax.Array | float = 1.0,
                 guess_mode: bool = False, text_embeds: jax.Array | None = None,
                 time_ids: jax.Array | None = None) -> tuple[list[jax.Array], jax.Array]:
        """diffusers' `ControlNetModel.forward`, returning (down residuals, mid residual).

        latents_nhwc: (B, h, w, in_channels) noisy latents, as given to the UNet.
        timesteps: scalar or (B,) diffusion step indices (0..num_train_timesteps-1).
        context: (B, L, cross_attention_dim) text-encoder hidden states.
        cond_image_nhwc: (B, h * image_downscale, w * image_downscale, conditioning_channels)
          control image in [0, 1], RGB (channels are reversed here when the config says "bgr").
        conditioning_scale: scalar multiplier of every residual (may be traced, e.g. a per-step
          value computed host-side).
        guess_mode: Python bool (static): residual i is further scaled by
          `guess_mode_scales(n)[i]` (0.1 .. 1.0), unless `global_pool_conditions`.
        text_embeds, time_ids: SDXL ControlNets only (and required there): (B, pooled width) and
          (B, n), as for the UNet (`UNet2DConditionModel.__call__`).
        Returns `config.num_down_residuals` arrays, the i-th shaped like the UNet's i-th skip
        activation, and the mid residual (B, h / 2**(n-1), w / 2**(n-1), C_last); with
        `global_pool_conditions` each is averaged over H and W to (B, 1, 1, C). In `dtype`.
        """
        config, cfg = self.config, self.config.unet
        b = latents_nhwc.shape[0]
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   freq_shift=cfg.freq_shift)
        temb = self.time_embedding(t_emb.astype(self.dtype))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this is an SDXL ControlNet (addition_embed_type='text_time'): pass text_embeds "
                                 "(B, pooled width) and time_ids (B, n)")
            ids = timestep_embedding(jnp.reshape(time_ids, (-1,)), cfg.addition_time_embed_dim,
                                     flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift).reshape(b, -1)
            pooled = jnp.broadcast_to(text_embeds, (b, text_embeds.shape[-1])).astype(jnp.float32)
            temb = temb + self.add_embedding(jnp.concatenate([pooled, ids], axis=-1).astype(self.dtype))
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds / time_ids are SDXL conditioning; this ControlNet has no add_embedding")

        cond = cond_image_nhwc.astype(self.dtype)
        if config.flip_channels:
            cond = cond[..., ::-1]
        x = latents_nhwc.astype(self.dtype)
        if cfg.center_input_sample:  # never set by a ControlNet config; kept in step with the UNet
            x = 2 * x - 1.0
        x = self.conv_in(x) + self.controlnet_cond_embedding(cond)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)

        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        if guess_mode and not config.global_pool_conditions:
            scales = guess_mode_scales(len(down), conditioning_scale)
        else:
            scales = jnp.broadcast_to(jnp.asarray(conditioning_scale, jnp.float32), (len(down) + 1,))
        # torch multiplies by a 0-dim float32 tensor, which keeps the residual's dtype.
        down = [r * scales[i].astype(r.dtype) for i, r in enumerate(down)]
        mid = mid * scales[-1].astype(mid.dtype)
        if config.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid


def sum_residuals(outputs: Sequence[tuple[Sequence[jax.Array], jax.Array]]) -> tuple[list[jax.Array], jax.Array]:
    """Several ControlNets at once: elementwise sums of their (down, mid) residuals.

    diffusers' `MultiControlNetModel`: each ControlNet runs with its own image and scale, and
    the UNet receives the sums. Pooled (B, 1, 1, C) residuals broadcast against full ones.
    """
    if not outputs:
        raise ValueError("sum_residuals needs at least one ControlNet output")
    down, mid = list(outputs[0][0]), outputs[0][1]
    for other_down, other_mid in outputs[1:]:
        if len(other_down) != len(down):
            raise ValueError(f"ControlNets disagree on the number of down residuals ({len(down)} vs "
                             f"{len(other_down)}): they were made for different UNets")
        down = [a + b for a, b in zip(down, other_down)]
        mid = mid + other_mid
    return down, mid
