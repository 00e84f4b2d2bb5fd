"""The Stable Diffusion VAE: diffusers' `AutoencoderKL` in Flax NNX, NHWC. Math only.

Attribute names mirror diffusers' module names (`encoder.down_blocks[0].resnets[1]`,
`encoder.mid_block.attentions[0].to_q`, `quant_conv`, `decoder.up_blocks[2].upsamplers[0].conv`,
...) so a diffusers state dict maps mechanically through `sdjax.weights.names.vae` and
`sdjax.weights.mapping.load_state`.

Scaling is not done here: `encode` returns the unscaled posterior and `decode` takes
unscaled latents. The pipeline multiplies by `config.scaling_factor` after encoding and
divides by it before decoding (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", sec. 4.3.2 and D.1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.errors import ConfigError
from sdjax.models.layers import (Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv,
                                 multi_head_attention)

# Every diffusers VAE uses these; they are hard-coded in diffusers' Encoder/Decoder too.
_EPS = 1e-6
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers `AutoencoderKL` config (the `vae/config.json` of a checkpoint).

    `scaling_factor`, `force_upcast` and `sample_size` do not change the network; they are
    kept for the pipeline (latent scaling; run the VAE in float32 when the rest is fp16;
    nominal image size). `shift_factor`, `latents_mean` and `latents_std` are accepted
    only as null, since the pipeline applies `scaling_factor` alone.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """Read a diffusers AutoencoderKL config dict; `_`-prefixed keys are metadata.

        Raises ConfigError naming every unknown key or unsupported value.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        # Keys sdjax accepts only at diffusers' default (they change the latent space
        # normalisation that the pipeline would have to apply).
        only_null = ("shift_factor", "latents_mean", "latents_std")
        kwargs, errors = {}, []
        for key, value in d.items():
            if key.startswith("_"):
                continue
            if key in only_null:
                if value is not None:
                    errors.append(f"{key}={value!r} (only null is supported)")
                continue
            if key not in fields:
                errors.append(f"unknown key {key}={value!r}")
                continue
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        cfg = None
        try:
            cfg = cls(**kwargs)
        except TypeError as e:  # pragma: no cover - only on malformed dicts
            errors.append(str(e))
        if cfg is not None:
            errors.extend(cfg._problems())
        if errors:
            raise ConfigError("unsupported AutoencoderKL config: " + "; ".join(errors))
        return cfg

    def _problems(self) -> list[str]:
        out = []
        n = len(self.block_out_channels)
        bad_down = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad_up = [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad_down:
            out.append(f"down_block_types={list(self.down_block_types)!r} (only DownEncoderBlock2D is supported)")
        if bad_up:
            out.append(f"up_block_types={list(self.up_block_types)!r} (only UpDecoderBlock2D is supported)")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            out.append(f"down_block_types/up_block_types must have len(block_out_channels)={n} entries")
        if self.act_fn not in ("silu", "swish"):
            out.append(f"act_fn={self.act_fn!r} (only 'silu' is supported)")
        bad_groups = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad_groups:
            out.append(f"block_out_channels={list(self.block_out_channels)!r} not divisible by "
                       f"norm_num_groups={self.norm_num_groups}")
        if not isinstance(self.scaling_factor, (int, float)) or isinstance(self.scaling_factor, bool):
            out.append(f"scaling_factor={self.scaling_factor!r} (must be a number)")
        for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, key), bool):
                out.append(f"{key}={getattr(self, key)!r} (must be true or false)")
        return out

    @property
    def downscale(self) -> int:
        """Pixels per latent pixel along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)


class VAEAttention(nnx.Module):
    """diffusers `Attention` as built by `UNetMidBlock2D` for the VAE: single head over
    all pixels, group-normed input, residual connection. x: (B, H, W, C) -> same."""

    def __init__(self, ch: int, groups: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.group_norm = GroupNorm(ch, groups, _EPS, **kw)
        self.to_q = nnx.Linear(ch, ch, **kw)
        self.to_k = nnx.Linear(ch, ch, **kw)
        self.to_v = nnx.Linear(ch, ch, **kw)
        self.to_out = nnx.List([nnx.Linear(ch, ch, **kw)])
        self.kernels = None  # sdjax.models.kernels.Kernels, set by layers.apply_kernels

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        seq = self.group_norm(x).reshape(b, h * w, c)
        out = multi_head_attention(self.to_q(seq), self.to_k(seq), self.to_v(seq), 1, self.kernels)
        out = self.to_out[0](out).reshape(b, h, w, c)
        return out + x.astype(out.dtype)


class MidBlock(nnx.Module):
    """diffusers `UNetMidBlock2D` without time embedding: resnet, (attention, resnet)."""

    def __init__(self, ch: int, groups: int, add_attention: bool, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, temb_ch=None, groups=groups, eps=_EPS, **kw)
                                 for _ in range(2)])
        # diffusers keeps a None slot when attention is off; so do we (no parameters).
        self.attentions = nnx.List([VAEAttention(ch, groups, **kw) if add_attention else None])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_downsample: bool,
                 *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch=None, groups=groups, eps=_EPS, **kw)
            for i in range(num_layers)])
        # padding=0: diffusers' VAE pads right/bottom by one pixel before the stride-2 conv.
        self.downsamplers = nnx.List([Downsample2D(out_ch, padding=0, **kw)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_upsample: bool,
                 *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch=None, groups=groups, eps=_EPS, **kw)
            for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_ch, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """Images (B, H, W, in_channels) -> posterior moments (B, H/f, W/f, 2 * latent_channels)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chs, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, chs[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, g,
                               add_downsample=i < len(chs) - 1, **kw)
            for i in range(len(chs))])
        self.mid_block = MidBlock(chs[-1], g, cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(chs[-1], g, _EPS, **kw)
        self.conv_out = conv(chs[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        rev, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = MidBlock(rev[0], g, cfg.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g,
                             add_upsample=i < len(rev) - 1, **kw)
            for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(rev[-1], g, _EPS, **kw)
        self.conv_out = conv(rev[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers `AutoencoderKL` (the SD 1.x/2.x/XL VAE), NHWC.

    Latents are *unscaled* on both sides; see the module docstring for `scaling_factor`.
    """

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.dtype = dtype
        lc = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = conv(2 * lc, 2 * lc, 1, padding=0, **kw) if config.use_quant_conv else None
        self.post_quant_conv = conv(lc, lc, 1, padding=0, **kw) if config.use_post_quant_conv else None

    def encode(self, images_nhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels).

        f = `config.downscale` (8 for SD); H and W should be multiples of f. The latents are
        unscaled (multiply by `config.scaling_factor` before diffusion); logvar is clamped
        to [-30, 20] as diffusers' DiagonalGaussianDistribution does. Output dtype: `dtype`.
        """
        moments = self.encoder(images_nhwc.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, _LOGVAR_MIN, _LOGVAR_MAX)

    def decode(self, latents_nhwc: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels).

        Images are nominally in [-1, 1] but not clipped (as diffusers). Divide diffusion
        latents by `config.scaling_factor` first. Output dtype: `dtype`.
        """
        z = latents_nhwc.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode_tiled(self, latents_nhwc: jax.Array, *, tile: int = 64, overlap: int = 16) -> jax.Array:
        """`decode` in overlapping tiles, one at a time, for images too large to decode at once.

        latents_nhwc: unscaled (B, h, w, latent_channels); tile, overlap: in latent pixels
        (defaults match diffusers' 512-pixel tiles with 25% overlap). Returns images
        (B, h*f, w*f, out_channels) in `dtype`. Tiles are decoded sequentially by a
        `lax.scan`, so peak activation memory is that of one tile; overlaps are blended
        with linear ramps. Because the decoder's group norms see one tile at a time, the
        result differs slightly from `decode` (as in diffusers' tiled decoding); when the
        latents fit in one tile it equals `decode`.
        """
        b, h, w, _ = latents_nhwc.shape
        f = self.config.downscale
        th, tw = min(tile, h), min(tile, w)
        if overlap < 0 or (th < h and overlap >= th) or (tw < w and overlap >= tw):
            raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        starts_y, starts_x = _tile_starts(h, th, overlap), _tile_starts(w, tw, overlap)
        grid = jnp.array([(y, x) for y in starts_y for x in starts_x], jnp.int32)
        ramp = max(overlap * f, 1)

        def edge_weights(start, size_px, total_px):
            # Rising over the overlap unless the tile touches the image start; falling likewise.
            i = jnp.arange(size_px, dtype=jnp.float32) + 0.5
            up = jnp.where(start > 0, jnp.clip(i / ramp, 0.0, 1.0), 1.0)
            down = jnp.where(start + size_px < total_px, jnp.clip((size_px - i) / ramp, 0.0, 1.0), 1.0)
            return up * down

        out_c = self.config.out_channels
        acc0 = jnp.zeros((b, h * f, w * f, out_c), jnp.float32)
        wsum0 = jnp.zeros((h * f, w * f), jnp.float32)

        def step(carry, yx):
            acc, wsum = carry
            y, x = yx[0], yx[1]
            z = jax.lax.dynamic_slice(latents_nhwc, (0, y, x, 0), (b, th, tw, latents_nhwc.shape[-1]))
            img = self.decode(z).astype(jnp.float32)
            wgt = edge_weights(y * f, th * f, h * f)[:, None] * edge_weights(x * f, tw * f, w * f)[None, :]
            py, px = y * f, x * f
            old = jax.lax.dynamic_slice(acc, (0, py, px, 0), img.shape)
            acc = jax.lax.dynamic_update_slice(acc, old + img * wgt[None, :, :, None], (0, py, px, 0))
            old_w = jax.lax.dynamic_slice(wsum, (py, px), wgt.shape)
            wsum = jax.lax.dynamic_update_slice(wsum, old_w + wgt, (py, px))
            return (acc, wsum), None

        (acc, wsum), _ = jax.lax.scan(step, (acc0, wsum0), grid)
        return (acc / wsum[None, :, :, None]).astype(self.dtype)

    def __call__(self, images_nhwc: jax.Array) -> jax.Array:
        """Reconstruction: decode(encode(images).mean). NHWC in [-1, 1] -> NHWC."""
        mean, _ = self.encode(images_nhwc)
        return self.decode(mean)


def _tile_starts(total: int, size: int, overlap: int) -> list[int]:
    """Tile origins covering [0, total) with tiles of `size` overlapping by at least `overlap`;
    the last tile is aligned to the end so every tile has the same shape."""
    if size >= total:
        return [0]
    starts = list(range(0, total - size, size - overlap))
    return starts + [total - size]


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from N(mean, exp(logvar)) (diffusers' `latent_dist.sample()`), same layout as `mean`.

    Noise is drawn in float32 and the result returned in float32.
    """
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps
