"""diffusers' UNet2DConditionModel as used by Stable Diffusion 1.x / 2.x and SDXL, in Flax NNX. Math only.

Layout NHWC. Attribute names mirror diffusers (`conv_in`, `time_embedding.linear_1`,
`down_blocks[i].resnets[j]`, `down_blocks[i].attentions[j]`, `down_blocks[i].downsamplers[0]`,
`mid_block`, `up_blocks[i].upsamplers[0]`, `conv_norm_out`, `conv_out`, and SDXL's
`add_embedding.linear_1/2`) so diffusers' state_dict loads through
`sdjax.weights.mapping.load_state` unchanged.

SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis") adds `addition_embed_type="text_time"`: the pooled text embedding and sinusoidal
embeddings of the size/crop (or aesthetic-score) "time ids" go through `add_embedding` and are
added to the timestep embedding.

The UNet is the bare eps/v network of Rombach et al. 2022 ("High-Resolution Image
Synthesis with Latent Diffusion Models"): it knows nothing of sigmas or guidance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.errors import ConfigError
from sdjax.models.attention import Transformer2DModel
from sdjax.models.layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv

__all__ = [
    "UNetConfig", "UNet2DConditionModel", "timestep_embedding", "TimestepEmbedding", "num_down_residuals",
    "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D",
]


_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn",)

# Keys of diffusers' UNet2DConditionModel config that sdjax accepts only at these values.
_FIXED: dict[str, tuple[Any, ...]] = {
    "only_cross_attention": (False,),
    "dropout": (0.0,),
    "reverse_transformer_layers_per_block": (None,),
    "num_attention_heads": (None,),  # diffusers itself refuses it; the head count comes from attention_head_dim
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "addition_embed_type_num_heads": (64,),
}
# Kandinsky/IF conditioning: refused with its own message.
_NOT_YET = ("encoder_hid_dim", "encoder_hid_dim_type")
# addition_embed_type values sdjax implements (None: SD 1.x / 2.x; "text_time": SDXL).
_ADDITION_TYPES = (None, "text_time")


def _same(value: Any, allowed: Any) -> bool:
    if isinstance(value, bool) or isinstance(allowed, bool) or value is None or allowed is None:
        return value is allowed
    return value == allowed


def _per_block(d: dict, key: str, default: Any, n: int, kind=int) -> tuple:
    """A config value that is either one value for all blocks or a list with one per block."""
    value = d.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"unet config: {key}={value!r} must have one entry per down block ({n})")
        values = tuple(value)
    else:
        values = (value,) * n
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind) or v < 1:
            raise ConfigError(f"unet config: {key}={value!r}: sdjax supports a positive {kind.__name__} "
                              f"or a list of them, one per block")
    return values


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers UNet2DConditionModel config, normalised: per-block settings are tuples.

    `num_attention_heads[i]` is the head count of block i (the up path reads it reversed, the
    mid block uses the last): diffusers' legacy rule, `num_attention_heads or attention_head_dim`,
    which makes SD's `attention_head_dim` a head COUNT (8 for SD 1.x, [5, 10, 20, 20] for SD 2.x).
    Defaults are diffusers' defaults.
    """

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | tuple[int, int] | None = None
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple[int, ...] = (1280,) * 4
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    attention_head_dim: tuple[int, ...] = (8, 8, 8, 8)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Read a diffusers `unet/config.json` dict; unsupported keys or values raise ConfigError."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        for key in _NOT_YET:
            if d.get(key) is not None:
                raise ConfigError(f"unet config: {key}={d[key]!r} is not supported (Kandinsky / IF-style "
                                  "encoder projection); sdjax's UNet supports SD 1.x / 2.x and SDXL, where it is null")
        for key, allowed in _FIXED.items():
            if key not in d:
                continue
            value = d[key]
            ok = any(_same(value, a) for a in allowed)
            if key == "only_cross_attention" and isinstance(value, (list, tuple)):
                ok = all(v is False for v in value)
            if not ok:
                raise ConfigError(f"unet config: {key}={value!r} is not supported; sdjax supports "
                                  f"{' or '.join(repr(a) for a in allowed)}")
        known = {f.name for f in dataclasses.fields(cls)} | set(_FIXED) | set(_NOT_YET)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unet config: unknown key(s) {unknown}; not a diffusers UNet2DConditionModel config "
                              "sdjax knows")

        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        chans = tuple(d.get("block_out_channels", cls.block_out_channels))
        n = len(chans)
        for key, types, allowed in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
            bad = [t for t in types if t not in allowed]
            if bad or len(types) != n:
                raise ConfigError(f"unet config: {key}={list(types)!r}: sdjax supports {n} blocks (one per "
                                  f"block_out_channels) of types {allowed}")
        mid = d.get("mid_block_type", cls.mid_block_type)
        if mid not in _MID_TYPES:
            raise ConfigError(f"unet config: mid_block_type={mid!r} is not supported; sdjax supports {_MID_TYPES}")
        act = d.get("act_fn", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"unet config: act_fn={act!r} is not supported; sdjax supports 'silu'")
        groups = d.get("norm_num_groups", cls.norm_num_groups)
        if not isinstance(groups, int) or any(c % groups for c in chans):
            raise ConfigError(f"unet config: norm_num_groups={groups!r} must be an integer dividing every "
                              f"block_out_channels {list(chans)}")
        if not isinstance(d.get("use_linear_projection", False), bool):
            raise ConfigError(f"unet config: use_linear_projection={d['use_linear_projection']!r} must be a bool")
        padding = d.get("downsample_padding", 1)
        if padding not in (0, 1) or isinstance(padding, bool):
            raise ConfigError(f"unet config: downsample_padding={padding!r} is not supported; sdjax supports 0 or 1")

        # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`, and a non-null
        # num_attention_heads is refused above (as diffusers refuses it), so this is a head count.
        heads = _per_block(d, "attention_head_dim", 8, n)
        if any(c < h for c, h in zip(chans, heads)):
            raise ConfigError(f"unet config: attention_head_dim={d.get('attention_head_dim')!r} (a head count "
                              f"in diffusers' legacy naming) exceeds block_out_channels {list(chans)}")
        addition = d.get("addition_embed_type")
        if addition not in _ADDITION_TYPES:
            raise ConfigError(f"unet config: addition_embed_type={addition!r} is not supported; sdjax supports "
                              "null (SD 1.x / 2.x) or 'text_time' (SDXL)")
        time_dim, proj_dim = d.get("addition_time_embed_dim"), d.get("projection_class_embeddings_input_dim")
        cross = _per_block(d, "cross_attention_dim", 1280, n)
        if addition == "text_time":
            for key, v in (("addition_time_embed_dim", time_dim), ("projection_class_embeddings_input_dim", proj_dim)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ConfigError(f"unet config: {key}={v!r} must be a positive integer with "
                                      "addition_embed_type='text_time'")
            if time_dim % 2:
                raise ConfigError(f"unet config: addition_time_embed_dim={time_dim} must be even")
        else:
            for key, v in (("addition_time_embed_dim", time_dim), ("projection_class_embeddings_input_dim", proj_dim)):
                if v is not None:
                    raise ConfigError(f"unet config: {key}={v!r} needs addition_embed_type='text_time' (SDXL); "
                                      "sdjax supports null here otherwise")
        sample_size = d.get("sample_size")
        return cls(
            in_channels=int(d.get("in_channels", 4)),
            out_channels=int(d.get("out_channels", 4)),
            sample_size=tuple(sample_size) if isinstance(sample_size, (list, tuple)) else sample_size,
            center_input_sample=bool(d.get("center_input_sample", False)),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=d.get("freq_shift", 0),
            down_block_types=down,
            mid_block_type=mid,
            up_block_types=up,
            block_out_channels=chans,
            layers_per_block=_per_block(d, "layers_per_block", 2, n),
            downsample_padding=padding,
            mid_block_scale_factor=float(d.get("mid_block_scale_factor", 1.0)),
            act_fn="silu",
            norm_num_groups=groups,
            norm_eps=float(d.get("norm_eps", 1e-5)),
            cross_attention_dim=cross,
            transformer_layers_per_block=_per_block(d, "transformer_layers_per_block", 1, n),
            attention_head_dim=heads,
            num_attention_heads=heads,
            use_linear_projection=d.get("use_linear_projection", False),
            # null (seen in SDXL configs) means diffusers' default, False.
            upcast_attention=bool(d.get("upcast_attention") or False),
            addition_embed_type=addition,
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=proj_dim,
        )


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (B,) -> (B, dim), float32; exactly diffusers' `get_timestep_embedding`.

    timesteps are diffusion step indices (0..999 for SD), possibly fractional.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / (half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2: (B, in_dim) -> (B, time_embed_dim)."""

    def __init__(self, in_dim: int, time_embed_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = nnx.Linear(in_dim, time_embed_dim, **kw)
        self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def _transformer(cfg: UNetConfig, channels: int, heads: int, cross_dim: int, layers: int, kw):
    # diffusers passes (heads, channels // heads): the legacy head rule lives in UNetConfig.
    return Transformer2DModel(heads, channels // heads, channels, cross_attention_dim=cross_dim,
                              num_layers=layers, norm_num_groups=cfg.norm_num_groups,
                              use_linear_projection=cfg.use_linear_projection,
                              upcast_attention=cfg.upcast_attention, **kw)


class _DownBlock(nnx.Module):
    """Shared body of DownBlock2D and CrossAttnDownBlock2D (attentions None for the former)."""

    def __init__(self, cfg: UNetConfig, i: int, in_ch: int, out_ch: int, temb_ch: int, *,
                 cross_attention: bool, add_downsample: bool, kw):
        n = cfg.layers_per_block[i]
        self.resnets = nnx.List([
            ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_ch=temb_ch, groups=cfg.norm_num_groups,
                          eps=cfg.norm_eps, **kw) for j in range(n)])
        self.attentions = nnx.List([
            _transformer(cfg, out_ch, cfg.num_attention_heads[i], cfg.cross_attention_dim[i],
                         cfg.transformer_layers_per_block[i], kw) for _ in range(n)]) if cross_attention else None
        self.downsamplers = nnx.List([Downsample2D(out_ch, padding=cfg.downsample_padding, **kw)]) \
            if add_downsample else None

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list]:
        """x: (B, H, W, C) -> (output, skip activations for the up path)."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(_DownBlock):
    def __init__(self, cfg, i, in_ch, out_ch, temb_ch, *, add_downsample, kw):
        super().__init__(cfg, i, in_ch, out_ch, temb_ch, cross_attention=True,
                         add_downsample=add_downsample, kw=kw)


class DownBlock2D(_DownBlock):
    def __init__(self, cfg, i, in_ch, out_ch, temb_ch, *, add_downsample, kw):
        super().__init__(cfg, i, in_ch, out_ch, temb_ch, cross_attention=False,
                         add_downsample=add_downsample, kw=kw)


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet -> (transformer -> resnet); resnets scaled by `mid_block_scale_factor`. NHWC."""

    def __init__(self, cfg: UNetConfig, channels: int, temb_ch: int, *, kw):
        def resnet():
            return ResnetBlock2D(channels, channels, temb_ch=temb_ch, groups=cfg.norm_num_groups,
                                 eps=cfg.norm_eps, output_scale_factor=cfg.mid_block_scale_factor, **kw)
        self.resnets = nnx.List([resnet(), resnet()])
        self.attentions = nnx.List([_transformer(cfg, channels, cfg.num_attention_heads[-1],
                                                 cfg.cross_attention_dim[-1],
                                                 cfg.transformer_layers_per_block[-1], kw)])

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class _UpBlock(nnx.Module):
    """Shared body of UpBlock2D and CrossAttnUpBlock2D (attentions None for the former).

    `i` is the up-block index; per-block settings are read in reverse, as diffusers does.
    """

    def __init__(self, cfg: UNetConfig, i: int, in_ch: int, out_ch: int, prev_out_ch: int, temb_ch: int,
                 *, cross_attention: bool, add_upsample: bool, kw):
        r = len(cfg.block_out_channels) - 1 - i
        n = cfg.layers_per_block[r] + 1
        self.resnets = nnx.List([
            ResnetBlock2D((prev_out_ch if j == 0 else out_ch) + (in_ch if j == n - 1 else out_ch), out_ch,
                          temb_ch=temb_ch, groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw)
            for j in range(n)])
        self.attentions = nnx.List([
            _transformer(cfg, out_ch, cfg.num_attention_heads[r], cfg.cross_attention_dim[r],
                         cfg.transformer_layers_per_block[r], kw) for _ in range(n)]) if cross_attention else None
        self.upsamplers = nnx.List([Upsample2D(out_ch, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, context: jax.Array,
                 upsample_size: tuple[int, int] | None = None) -> jax.Array:
        """skips: this block's skip activations, consumed last-first (channels concatenated after x's)."""
        skips = list(skips)
        for j, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class CrossAttnUpBlock2D(_UpBlock):
    def __init__(self, cfg, i, in_ch, out_ch, prev_out_ch, temb_ch, *, add_upsample, kw):
        super().__init__(cfg, i, in_ch, out_ch, prev_out_ch, temb_ch, cross_attention=True,
                         add_upsample=add_upsample, kw=kw)


class UpBlock2D(_UpBlock):
    def __init__(self, cfg, i, in_ch, out_ch, prev_out_ch, temb_ch, *, add_upsample, kw):
        super().__init__(cfg, i, in_ch, out_ch, prev_out_ch, temb_ch, cross_attention=False,
                         add_upsample=add_upsample, kw=kw)


_DOWN = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}
_UP = {"CrossAttnUpBlock2D": CrossAttnUpBlock2D, "UpBlock2D": UpBlock2D}


class UNet2DConditionModel(nnx.Module):
    """The SD 1.x / 2.x UNet: eps (or v) prediction from noisy latents, timestep and text context.

    Params live in `param_dtype`, compute runs in `dtype`; norms, softmax and the sinusoidal
    timestep embedding run in float32.
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cfg = config
        self.config = cfg
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans = cfg.block_out_channels
        temb_ch = chans[0] * 4
        self.conv_in = conv(cfg.in_channels, chans[0], 3, **kw)
        self.time_embedding = TimestepEmbedding(chans[0], temb_ch, **kw)
        # diffusers' `add_time_proj` (Timesteps) has no weights: `timestep_embedding` in __call__.
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_ch, **kw) \
            if cfg.addition_embed_type == "text_time" else None

        down, out_ch = [], chans[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, chans[i]
            down.append(_DOWN[kind](cfg, i, in_ch, out_ch, temb_ch, add_downsample=i < len(chans) - 1, kw=kw))
        self.down_blocks = nnx.List(down)
        self.mid_block = UNetMidBlock2DCrossAttn(cfg, chans[-1], temb_ch, kw=kw)

        rev = list(reversed(chans))
        up, out_ch = [], rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_out_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, len(chans) - 1)]
            up.append(_UP[kind](cfg, i, in_ch, out_ch, prev_out_ch, temb_ch,
                                add_upsample=i < len(chans) - 1, kw=kw))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(chans[0], cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv_out = conv(chans[0], cfg.out_channels, 3, **kw)

    def __call__(self, latents_nhwc: jax.Array, timesteps: jax.Array | float | int, context: jax.Array, *,
                 down_residuals: Sequence[jax.Array] | None = None,
                 mid_residual: jax.Array | None = None, text_embeds: jax.Array | None = None,
                 time_ids: jax.Array | None = None) -> jax.Array:
        """One network evaluation.

        latents_nhwc: (B, H, W, in_channels) noisy latents (any H, W; as in diffusers, sizes not
          divisible by 2**(num blocks - 1) are upsampled to the matching skip's size).
        timesteps: scalar or (B,) (or (1,)) diffusion step indices, int or float, in the
          scheduler's units (0..num_train_timesteps-1).
        context: (B, L, cross_attention_dim) text-encoder hidden states.
        down_residuals / mid_residual: ControlNet outputs, given together: one NHWC array per
          skip activation (conv_in output first, `num_down_residuals(config)` in all) added to
          the skips, and one added to the mid-block output -- diffusers'
          `down_block_additional_residuals` / `mid_block_additional_residual`.
        text_embeds, time_ids: SDXL only (and required there): the pooled text embedding
          (B, pooled width) and the time ids (B, n), with pooled width + n * addition_time_embed_dim
          = projection_class_embeddings_input_dim (n = 6 for SDXL base, 5 for the refiner) -- diffusers'
          `added_cond_kwargs` -- in pixels / aesthetic score, float.
        Returns (B, H, W, out_channels) in `dtype`.
        """
        cfg = self.config
        if (down_residuals is None) != (mid_residual is None):
            # diffusers reads down-only residuals as (deprecated) T2I-adapter input and ignores a
            # lone mid residual; neither is ControlNet, so refuse rather than guess.
            raise ValueError("down_residuals and mid_residual must be given together (ControlNet) or not at all")
        b = latents_nhwc.shape[0]
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   freq_shift=cfg.freq_shift)
        temb = self.time_embedding(t_emb.astype(self.dtype))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this is an SDXL UNet (addition_embed_type='text_time'): pass text_embeds "
                                 "(B, pooled width) and time_ids (B, n)")
            ids = jnp.reshape(time_ids, (-1,))
            time_embeds = timestep_embedding(ids, cfg.addition_time_embed_dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                             freq_shift=cfg.freq_shift).reshape(b, -1)
            add = jnp.concatenate([jnp.broadcast_to(text_embeds, (b, text_embeds.shape[-1])).astype(jnp.float32),
                                   time_embeds], axis=-1)
            temb = temb + self.add_embedding(add.astype(self.dtype))
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds / time_ids are SDXL conditioning; this UNet has no add_embedding")

        x = latents_nhwc
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)

        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals has {len(down_residuals)} arrays; this UNet has {len(skips)} "
                                 "skip activations")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
        x = self.mid_block(x, temb, context)
        if mid_residual is not None:
            x = x + mid_residual.astype(x.dtype)

        factor = 2 ** (len(self.up_blocks) - 1)
        forward_upsample_size = any(d % factor for d in latents_nhwc.shape[1:3])
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            x = block(x, block_skips, temb, context, size)

        x = jax.nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)


def num_down_residuals(config: UNetConfig) -> int:
    """How many skip activations (hence ControlNet down residuals) the UNet has."""
    n = len(config.block_out_channels)
    return 1 + sum(config.layers_per_block) + (n - 1)
