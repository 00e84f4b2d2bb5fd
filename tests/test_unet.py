"""UNet2DConditionModel: config reading, and numerical parity with diffusers (random weights).

Every parity test builds diffusers' torch UNet from a config dict, perturbs all its
parameters (so no norm is the identity, no bias zero, no conv zero-initialised),
loads its state_dict into ours through `sdjax.weights.mapping.load_state`, and
compares outputs on the same inputs (ours NHWC, torch NCHW).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import reference
from sdjax.errors import ConfigError
from sdjax.models.unet import UNet2DConditionModel, UNetConfig, num_down_residuals, timestep_embedding
from sdjax.weights import names
from sdjax.weights.diffusers import abstract_model
from sdjax.weights.mapping import load_state

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402


def _config(name: str) -> dict:
    return json.loads((reference(name) / "unet" / "config.json").read_text())


def _tiny(name: str, **overrides) -> dict:
    """A reference config shrunk in width only: block types, head rule, projection kind,
    upcast_attention and in_channels stay as in the real file."""
    d = _config(name)
    d.update(block_out_channels=[32, 64, 64, 64], norm_num_groups=8, cross_attention_dim=24,
             layers_per_block=1)
    d.update(overrides)
    return d


def _torch_unet(d: dict, seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**{k: v for k, v in d.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return unet


def _ours(d: dict, torch_unet, *, dtype=jnp.float32, param_dtype=jnp.float32) -> UNet2DConditionModel:
    cfg = UNetConfig.from_dict(d)
    abstract = abstract_model(UNet2DConditionModel, cfg, dtype, param_dtype)
    flat = names.unet({k: v.numpy() for k, v in torch_unet.state_dict().items()})
    return load_state(abstract, flat, source="diffusers UNet state_dict")


# LLVM's optimisation passes dominate CPU compile time for UNet graphs; tests skip them (the
# numbers do not depend on them, only the speed does).
_FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def _jit_apply(model):
    """The way the pipeline calls the UNet: a pure function of (state, inputs)."""
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
    def apply(state, x, t, ctx, down, mid):
        return nnx.merge(graphdef, state)(x, t, ctx, down_residuals=down, mid_residual=mid)

    return lambda x, t, ctx, down=None, mid=None: apply(state, x, t, ctx, down, mid)


def _inputs(batch, cin, h, w, length, cross, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(batch, cin, h, w).astype(np.float32), rng.randn(batch, length, cross).astype(np.float32))


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _nchw(x):
    return np.asarray(x, dtype=np.float32).transpose(0, 3, 1, 2)


# ---------------------------------------------------------------- config


def test_reference_configs_head_rule():
    # diffusers' legacy naming: attention_head_dim is the head COUNT when num_attention_heads is null.
    sd15 = UNetConfig.from_dict(_config("sd15"))
    assert sd15.num_attention_heads == (8, 8, 8, 8) and not sd15.use_linear_projection
    assert sd15.cross_attention_dim == (768,) * 4 and sd15.in_channels == 4
    sd21 = UNetConfig.from_dict(_config("sd21"))
    assert sd21.num_attention_heads == (5, 10, 20, 20) and sd21.use_linear_projection and sd21.upcast_attention
    inpaint = UNetConfig.from_dict(_config("sd2-inpainting"))
    assert inpaint.in_channels == 9 and not inpaint.upcast_attention


@pytest.mark.parametrize("key, value, words", [
    ("class_embed_type", "timestep", "class_embed_type"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
    ("num_attention_heads", 8, "num_attention_heads"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 4, "down_block_types"),
    ("only_cross_attention", True, "only_cross_attention"),
    ("attention_head_dim", [8, 8], "attention_head_dim"),
    ("transformer_layers_per_block", [[1, 2]] * 4, "transformer_layers_per_block"),
    ("norm_num_groups", 7, "norm_num_groups"),
    ("time_embedding_type", "fourier", "time_embedding_type"),
    ("some_new_key", 1, "some_new_key"),
    ("addition_embed_type", "image", "addition_embed_type"),
])
def test_config_errors_name_the_key(key, value, words):
    d = _config("sd15")
    d[key] = value
    with pytest.raises(ConfigError, match=words):
        UNetConfig.from_dict(d)


def test_defaults_are_accepted():
    d = _config("sd21")
    d.update(dropout=0.0, class_embed_type=None, addition_embed_type=None, mid_block_only_cross_attention=None,
             transformer_layers_per_block=[1, 1, 1, 1], conv_in_kernel=3, attention_type="default",
             upcast_attention=None, only_cross_attention=[False] * 4)
    cfg = UNetConfig.from_dict(d)
    assert cfg.transformer_layers_per_block == (1, 1, 1, 1) and cfg.upcast_attention is False


@pytest.mark.parametrize("dim, flip, shift", [(32, True, 0), (33, False, 1), (320, True, 0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    t = np.array([0, 1, 250.5, 999], np.float32)
    ref = get_timestep_embedding(torch.tensor(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    ours = np.asarray(timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift))
    assert ours.dtype == np.float32
    # Arguments reach ~1000 rad, where one float32 ulp is 6e-5: sin/cos of libm and XLA may
    # differ by that much. A wrong flip, shift or frequency would be off by O(1).
    np.testing.assert_allclose(ours, ref, atol=1e-4)


# ---------------------------------------------------------------- parity, float32

# (reference, overrides, latent H x W, timestep as given to both): sizes not divisible by 8
# exercise diffusers' forward_upsample_size path.
# Some cases also switch on options SD does not use (downsample_padding 0, center_input_sample,
# mid_block_scale_factor, 2 transformer layers) at no extra cost.
TINY = {
    "sd15": (dict(layers_per_block=2, attention_head_dim=4, mid_block_scale_factor=1.5), (16, 16), 999),
    "sd21": (dict(attention_head_dim=[2, 4, 4, 4], downsample_padding=0), (20, 12),
             np.array([10.0, 500.5], np.float32)),
    "sd2-inpainting": (dict(attention_head_dim=[2, 4, 4, 4], transformer_layers_per_block=[1, 2, 1, 2],
                            center_input_sample=True), (12, 12), np.array(321, np.int32)),
}


@functools.cache
def _tiny_pair(name):
    d = _tiny(name, **TINY[name][0])
    tm = _torch_unet(d)
    return d, tm, _ours(d, tm)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_parity_fp32(name):
    _, (h, w), t = TINY[name]
    d, tm, model = _tiny_pair(name)
    x, ctx = _inputs(2, d["in_channels"], h, w, 7, 24)
    with torch.no_grad():
        t_torch = torch.tensor(t) if isinstance(t, np.ndarray) else t
        ref = tm(torch.tensor(x), t_torch, torch.tensor(ctx)).sample.numpy()
    out = _nchw(_jit_apply(model)(_nhwc(x), jnp.asarray(t), jnp.asarray(ctx)))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4, np.abs(out - ref).max()


def test_additional_residuals_match_diffusers():
    d, tm, model = _tiny_pair("sd15")
    cfg = model.config
    x, ctx = _inputs(2, 4, 16, 16, 7, 24)
    rng = np.random.RandomState(3)
    # One residual per skip activation, shaped like it: conv_in, then each block's resnets and downsampler.
    shapes = [(32, 16)]
    size = 16
    for i, ch in enumerate(cfg.block_out_channels):
        shapes += [(ch, size)] * cfg.layers_per_block[i]
        if i < len(cfg.block_out_channels) - 1:
            size //= 2
            shapes.append((ch, size))
    assert len(shapes) == num_down_residuals(cfg)
    down = [rng.randn(2, c, s, s).astype(np.float32) for c, s in shapes]
    mid = rng.randn(2, cfg.block_out_channels[-1], size, size).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.tensor(x), 500, torch.tensor(ctx), down_block_additional_residuals=[torch.tensor(r) for r in down],
                 mid_block_additional_residual=torch.tensor(mid)).sample.numpy()
        plain = tm(torch.tensor(x), 500, torch.tensor(ctx)).sample.numpy()
    out = _nchw(_jit_apply(model)(_nhwc(x), 500, jnp.asarray(ctx), [_nhwc(r) for r in down], _nhwc(mid)))
    assert np.abs(ref - plain).max() > 1e-2  # the residuals matter
    assert np.abs(out - ref).max() <= 1e-4, np.abs(out - ref).max()
    with pytest.raises(ValueError, match="together"):
        model(_nhwc(x), 500, jnp.asarray(ctx), mid_residual=_nhwc(mid))


# ---------------------------------------------------------------- bf16, jit


def test_bf16_close_to_fp32_torch():
    """bf16 params and compute vs float32 torch: relative L2 error ||ours - ref|| / ||ref|| <= 2e-2."""
    d = _tiny("sd21", attention_head_dim=[2, 4, 4, 4])
    tm = _torch_unet(d)
    model = _ours(d, tm, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    x, ctx = _inputs(2, 4, 16, 16, 7, 24)
    with torch.no_grad():
        ref = tm(torch.tensor(x), 250, torch.tensor(ctx)).sample.numpy()
        # torch's own bf16 error on the same net: the rounding floor we cannot beat (~1.4e-2 here).
        tm_bf16 = tm.to(torch.bfloat16)
        ref_bf16 = tm_bf16(torch.tensor(x).bfloat16(), 250, torch.tensor(ctx).bfloat16()).sample.float().numpy()
    out = _jit_apply(model)(_nhwc(x), 250, jnp.asarray(ctx))
    assert out.dtype == jnp.bfloat16
    rel = np.linalg.norm(_nchw(out) - ref) / np.linalg.norm(ref)
    rel_torch = np.linalg.norm(ref_bf16 - ref) / np.linalg.norm(ref)
    assert rel <= 2e-2, (rel, rel_torch)
    assert rel <= 1.5 * rel_torch, (rel, rel_torch)


def test_jit_of_split_state_equals_eager():
    d = _tiny("sd15", block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=4)
    model = _ours(d, _torch_unet(d))
    x, ctx = _inputs(2, 4, 8, 8, 5, 24)
    t = jnp.array([3, 700])
    eager = model(_nhwc(x), t, jnp.asarray(ctx))
    jitted = _jit_apply(model)(_nhwc(x), t, jnp.asarray(ctx))
    assert float(jnp.abs(eager).max()) > 0
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- full size


@pytest.mark.xdist_group("full_size")  # one full-size model at a time: 24 GiB holds one, not two
@pytest.mark.slow
def test_full_size_sd15_parity():
    d = _config("sd15")
    tm = _torch_unet(d)
    model = _ours(d, tm)
    x, ctx = _inputs(2, 4, 32, 32, 77, 768)
    with torch.no_grad():
        ref = tm(torch.tensor(x), torch.tensor([999, 20]), torch.tensor(ctx)).sample.numpy()
    del tm
    out = _nchw(_jit_apply(model)(_nhwc(x), jnp.array([999, 20]), jnp.asarray(ctx)))
    err = np.abs(out - ref).max()
    assert err <= 1e-3 * ref.std(), (err, ref.std())
