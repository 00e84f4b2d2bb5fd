"""ControlNet: config, parity with diffusers' ControlNetModel (random weights), UNet composition,
folder and original single-file loading, Canny and the per-step scale rule.

The tiny ControlNet is diffusers' `ControlNetModel.from_unet` of the SD 1.5 reference UNet
config shrunk in width, with every parameter perturbed (so no zero conv is zero), saved
with `save_pretrained` and loaded by `sdjax.pipeline.control.load_controlnet`.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import reference
from sdjax.pipeline.control import (canny, controlnet_keep, controlnet_step_scales, load_controlnet,
                              prepare_control_image, scale_at)
from sdjax.errors import CheckpointError, ConfigError
from sdjax.models.controlnet import ControlNetConfig, guess_mode_scales, sum_residuals
from sdjax.pipeline.components import _pure
from sdjax.weights import controlnet_files as cf
from sdjax.weights.mapping import export_state
from sdjax.weights.diffusers import abstract_model

diffusers = pytest.importorskip("diffusers")

EMBED = (8, 16, 16, 32)


def _unet_config(name: str = "sd15", **overrides) -> dict:
    d = json.loads((reference(name) / "unet" / "config.json").read_text())
    d.update(overrides)
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _tiny_unet_config() -> dict:
    return _unet_config(block_out_channels=[32, 64, 64, 64], norm_num_groups=8, cross_attention_dim=24,
                        layers_per_block=1)


def _perturb(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch UNet, torch ControlNet, folder holding unet/ and controlnet/) with random weights."""
    torch.manual_seed(0)
    unet = _perturb(diffusers.UNet2DConditionModel(**_tiny_unet_config()), 1)
    cn = _perturb(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBED), 2)
    root = tmp_path_factory.mktemp("tiny")
    unet.save_pretrained(root / "unet")
    cn.save_pretrained(root / "controlnet")
    return unet, cn, root


# LLVM's optimisation passes dominate CPU compile time; the numbers do not depend on them.
_FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def _fast(component, static=()):
    """The component's own pure apply function, jitted without LLVM optimisation (tests only)."""
    component.apply = jax.jit(_pure(component.graphdef, "__call__"), static_argnames=static,
                              compiler_options=_FAST_COMPILE)
    return component


@pytest.fixture(scope="module")
def ours(tiny):
    return _fast(load_controlnet(tiny[2] / "controlnet"), ("guess_mode",))


def _inputs(seed=0, batch=2):
    rng = np.random.RandomState(seed)
    return (rng.randn(batch, 4, 16, 16).astype(np.float32), rng.randn(batch, 7, 24).astype(np.float32),
            rng.rand(batch, 3, 128, 128).astype(np.float32))


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _close(ours_nhwc, ref_nchw, tol=1e-4):
    """Max abs error <= tol x max(1, max |ref|): fp32 sums of large random residuals round at ~1e-6 relative."""
    ref = ref_nchw.detach().numpy()
    err = np.abs(np.asarray(ours_nhwc).transpose(0, 3, 1, 2) - ref).max()
    assert err <= tol * max(1.0, np.abs(ref).max()), (err, np.abs(ref).max())


def _torch_residuals(cn, x, ctx, img, t, scale, guess_mode):
    with torch.no_grad():
        return cn(torch.from_numpy(x), t, torch.from_numpy(ctx), torch.from_numpy(img),
                  conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)


# ---------------------------------------------------------------- config


def _full_controlnet(name: str):
    """diffusers' full-size ControlNet for a reference UNet config, on the meta device (no memory)."""
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**_unet_config(name))
        return diffusers.ControlNetModel.from_unet(unet, load_weights_from_unet=False)


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_reference_configs(name):
    cn = _full_controlnet(name)
    cfg = ControlNetConfig.from_dict(dict(cn.config))
    unet_cfg = _unet_config(name)
    assert cfg.unet.block_out_channels == tuple(unet_cfg["block_out_channels"])
    assert cfg.conditioning_embedding_out_channels == (16, 32, 96, 256) and cfg.image_downscale == 8
    assert cfg.num_down_residuals == len(cn.controlnet_down_blocks) == 12
    assert cfg.unet.use_linear_projection == (name == "sd21")
    assert not cfg.flip_channels and not cfg.global_pool_conditions


@pytest.mark.parametrize("key, value, words", [
    ("some_new_key", 1, "unknown key"),
    ("controlnet_conditioning_channel_order", "rbg", "channel_order"),
    ("layers_per_block", [2, 2, 2, 2], "layers_per_block"),
    ("cross_attention_dim", [768] * 4, "cross_attention_dim"),
    ("class_embed_type", "timestep", "controlnet config: class_embed_type"),
    ("mid_block_type", "UNetMidBlock2D", "mid_block_type"),
    ("addition_embed_type", "text_time", "addition_time_embed_dim"),  # SDXL needs its time-id settings
    ("global_pool_conditions", "yes", "global_pool_conditions"),
    ("conditioning_embedding_out_channels", [], "conditioning_embedding_out_channels"),
    ("up_block_types", ["UpBlock2D"] * 4, "unknown key"),  # a UNet key, not a ControlNet one
])
def test_config_errors_name_the_key(key, value, words):
    d = dict(_full_controlnet("sd15").config)
    d[key] = value
    with pytest.raises(ConfigError, match=words):
        ControlNetConfig.from_dict(d)


@pytest.mark.slow  # eager random init compiles one XLA program per parameter shape (~40 here)
def test_fresh_controlnet_has_zero_convs():
    """Trained from scratch, a ControlNet starts as a no-op (diffusers' zero_module)."""
    from flax import nnx

    from sdjax.models.controlnet import ControlNetModel

    d = dict(block_out_channels=[16, 16], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
             norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2, layers_per_block=1,
             conditioning_embedding_out_channels=[4, 8])
    model = ControlNetModel(ControlNetConfig.from_dict(d), rngs=nnx.Rngs(0))
    zero = list(model.controlnet_down_blocks) + [model.controlnet_mid_block, model.controlnet_cond_embedding.conv_out]
    assert len(zero) == 6 and all(not np.any(c.kernel[...]) and not np.any(c.bias[...]) for c in zero)
    assert np.any(model.controlnet_cond_embedding.conv_in.kernel[...])


def test_num_attention_heads_is_the_head_count():
    d = dict(_full_controlnet("sd15").config)
    d.update(num_attention_heads=4, attention_head_dim=99)
    assert ControlNetConfig.from_dict(d).unet.num_attention_heads == (4,) * 4


# ---------------------------------------------------------------- parity


def test_parity_with_diffusers_plain_and_guess_mode(tiny, ours):
    _, cn, _ = tiny
    x, ctx, img = _inputs()
    for guess_mode, scale in ((False, 0.7), (True, 1.3)):
        down_t, mid_t = _torch_residuals(cn, x, ctx, img, 500, scale, guess_mode)
        down, mid = ours(_nhwc(x), 500, jnp.asarray(ctx), _nhwc(img), scale, guess_mode=guess_mode)
        assert len(down) == len(down_t) == ours.num_down_residuals == 8
        for a, b in zip(down, down_t):
            assert a.shape == tuple(b.permute(0, 2, 3, 1).shape)
            _close(a, b)
        _close(mid, mid_t)
        assert float(mid_t.abs().max()) > 1.0  # zero convs were perturbed: residuals are not zero
    # The scale is traced: another value reuses the compiled function.
    compiled = ours.apply._cache_size()
    down2, _ = ours(_nhwc(x), 500, jnp.asarray(ctx), _nhwc(img), 0.35)
    assert ours.apply._cache_size() == compiled
    _close(down2[3], _torch_residuals(cn, x, ctx, img, 500, 0.35, False)[0][3])


def test_guess_mode_scales_match_torch_logspace():
    ours_scales = np.asarray(guess_mode_scales(12, 0.5))
    ref = (torch.logspace(-1, 0, 13) * 0.5).numpy()
    np.testing.assert_allclose(ours_scales, ref, rtol=1e-6)


def test_parity_bgr_and_global_pooling(tiny):
    """`controlnet_conditioning_channel_order: bgr` flips the image; `global_pool_conditions`
    averages residuals and overrides guess mode's scales (the "shuffle" ControlNet)."""
    _, cn, root = tiny
    raw = dict(cn.config, controlnet_conditioning_channel_order="bgr", global_pool_conditions=True)
    ref = diffusers.ControlNetModel(**{k: v for k, v in raw.items() if not k.startswith("_")}).eval()
    ref.load_state_dict(cn.state_dict())
    model = _fast(load_controlnet(root / "controlnet", config={k: v for k, v in raw.items() if not k.startswith("_")}),
                  ("guess_mode",))
    assert model.config.flip_channels and model.config.global_pool_conditions
    x, ctx, img = _inputs(1)
    down_t, mid_t = _torch_residuals(ref, x, ctx, img, 10, 0.8, True)
    down, mid = model(_nhwc(x), 10, jnp.asarray(ctx), _nhwc(img), 0.8, guess_mode=True)
    assert down[0].shape == (2, 1, 1, 32) and mid.shape == (2, 1, 1, 64)
    for a, b in zip(down + [mid], list(down_t) + [mid_t]):
        _close(a, b)


def test_unet_with_controlnet_residuals_and_multi_controlnet(tiny, ours):
    from sdjax.pipeline import UNet
    from sdjax.weights.diffusers import load_model

    unet_t, cn, root = tiny
    unet = _fast(UNet(*load_model("unet", root / "unet")))
    x, ctx, img = _inputs(2)
    img2 = np.random.RandomState(3).rand(*img.shape).astype(np.float32)
    # diffusers' MultiControlNetModel sums the residuals of each (ControlNet, image, scale).
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    ref_multi = MultiControlNetModel([cn, cn])
    with torch.no_grad():
        down_t, mid_t = ref_multi(torch.from_numpy(x), 250, torch.from_numpy(ctx),
                                  [torch.from_numpy(img), torch.from_numpy(img2)], [0.6, 1.1],
                                  return_dict=False)
        eps_t = unet_t(torch.from_numpy(x), 250, torch.from_numpy(ctx), down_block_additional_residuals=down_t,
                       mid_block_additional_residual=mid_t).sample
        plain_t = unet_t(torch.from_numpy(x), 250, torch.from_numpy(ctx)).sample
    outs = [ours(_nhwc(x), 250, jnp.asarray(ctx), _nhwc(im), s) for im, s in ((img, 0.6), (img2, 1.1))]
    down, mid = sum_residuals(outs)
    for a, b in zip(down + [mid], list(down_t) + [mid_t]):
        _close(a, b)
    eps = unet(_nhwc(x), 250, jnp.asarray(ctx), down_residuals=down, mid_residual=mid)
    assert np.abs(eps_t - plain_t).max() > 1e-2  # the residuals matter
    _close(eps, eps_t)


def test_bfloat16_controlnet_tracks_float32(tiny, ours):
    model = _fast(load_controlnet(tiny[2] / "controlnet", dtype="bfloat16"), ("guess_mode",))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(model.state))
    x, ctx, img = _inputs(4)
    down16, mid16 = model(_nhwc(x), 500, jnp.asarray(ctx, jnp.bfloat16), _nhwc(img), 0.9)
    down32, mid32 = ours(_nhwc(x), 500, jnp.asarray(ctx), _nhwc(img), 0.9)
    for a, b in zip(down16 + [mid16], down32 + [mid32]):
        assert a.dtype == jnp.bfloat16
        b = np.asarray(b)
        assert np.abs(np.asarray(a, np.float32) - b).max() <= 0.05 * np.abs(b).max()


# ---------------------------------------------------------------- loading


def test_folder_loads_exact_weights_bin_too(tiny, ours, tmp_path):
    _, cn, _ = tiny
    ref = {k: v.numpy() for k, v in cn.state_dict().items()}
    got = export_state(ours.module())
    assert set(got) == set(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)
    cn.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    got_bin = export_state(load_controlnet(tmp_path / "bin").module())
    assert all(np.array_equal(got_bin[k], ref[k]) for k in ref)


def test_original_single_file_loads_to_the_folder_weights(tiny, ours, tmp_path):
    _, cn, root = tiny
    flat = {k: v.numpy() for k, v in cn.state_dict().items()}
    raw = json.loads((root / "controlnet" / "config.json").read_text())
    path = cf.save_original(flat, raw, tmp_path / "control_tiny.safetensors")
    from safetensors.numpy import load_file

    names = set(load_file(str(path)))
    assert {"control_model.input_hint_block.14.weight", "control_model.zero_convs.7.0.weight",
            "control_model.middle_block_out.0.bias", "control_model.input_blocks.3.1.proj_in.weight"} <= names
    want = export_state(ours.module())
    for cfg_arg in (root / "controlnet", raw):
        got = export_state(load_controlnet(path, config=cfg_arg).module())
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)

    # Read from shapes alone, the config is right except what weights cannot tell (group count).
    inferred = cf.infer_config(cf.split_original(load_file(str(path))))
    for key, value in inferred.items():
        if key != "attention_head_dim":
            assert raw[key] == value or list(np.atleast_1d(raw[key])) == list(np.atleast_1d(value)), key

    # diffusers' own single-file loader reads our file to the same weights (offline, local config).
    ref = diffusers.ControlNetModel.from_single_file(str(path), config=str(root / "controlnet"),
                                                     local_files_only=True)
    assert all(np.array_equal(v.numpy(), flat[k]) for k, v in ref.state_dict().items())


def test_original_file_variants_whole_model_and_bare_names(tiny, tmp_path):
    from safetensors.numpy import save_file

    _, cn, root = tiny
    flat = {k: v.numpy() for k, v in cn.state_dict().items()}
    raw = json.loads((root / "controlnet" / "config.json").read_text())
    original = cf.controlnet_to_original(flat, raw)
    # A whole-model file: the SD model's tensors are ignored.
    whole = {f"control_model.{k}": v for k, v in original.items()}
    whole["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    save_file(whole, str(tmp_path / "whole.safetensors"))
    save_file(original, str(tmp_path / "bare.safetensors"))
    ref = export_state(load_controlnet(root / "controlnet").module())
    for name in ("whole", "bare"):
        got = export_state(load_controlnet(tmp_path / f"{name}.safetensors", config=raw).module())
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
    # A diffusers pipeline folder: its controlnet/ subfolder is used.
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "controlnet").symlink_to(root / "controlnet")
    got = export_state(load_controlnet(tmp_path / "pipe").module())
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
    save_file({"foo.weight": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "other.safetensors")
    broken = dict(original)
    del broken["zero_convs.3.0.weight"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="controlnet_down_blocks.3.weight"):
        load_controlnet(tmp_path / "broken.safetensors", config=raw)


@pytest.mark.xdist_group("full_size")  # one full-size model at a time: 24 GiB holds one, not two
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_mapping_agrees_with_diffusers_converter_full_size(name):
    """Our original names, fed to diffusers' `convert_controlnet_checkpoint`, come back to
    diffusers' names; and `infer_config` reads the full-size config (heads by SD's rule)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    cn = _full_controlnet(name)
    raw = dict(cn.config)
    shapes = {k: np.empty(0) for k in cn.state_dict()}  # names only; no memory
    original = cf.controlnet_to_original(shapes, raw)
    assert len(original) == len(shapes)
    back = convert_controlnet_checkpoint({f"control_model.{k}": v for k, v in original.items()}, raw)
    assert set(back) == set(shapes)
    assert all(back[k] is shapes[k] for k in shapes)
    assert cf.controlnet_to_diffusers(original, raw).keys() == shapes.keys()

    meta = {k: v for k, v in cn.state_dict().items()}  # meta tensors carry shapes
    inferred = cf.infer_config(cf.controlnet_to_original(meta, raw))
    # upcast_attention (SD 2.1) is not in the weights; sdjax's softmax is float32 either way.
    assert ControlNetConfig.from_dict({**inferred, "upcast_attention": raw["upcast_attention"]}) \
        == ControlNetConfig.from_dict(raw)


# ---------------------------------------------------------------- Canny and control images


def _square(size, start, stop, value=200):
    """A dark (size, size) image with a bright square on rows and columns start..stop-1."""
    img = np.zeros((size, size), np.uint8)
    img[start:stop, start:stop] = value
    return img


def test_canny_square_edges_on_border_not_inside():
    img = _square(64, 20, 44)  # square rows/cols 20..43
    edges = canny(img, 100, 200)
    ys, xs = np.nonzero(edges)
    assert edges.any()
    # Every edge pixel lies within one pixel of the square's boundary...
    near = (np.minimum.reduce([np.abs(ys - 20), np.abs(ys - 43), np.abs(xs - 20), np.abs(xs - 43)]) <= 1)
    assert near.all()
    assert not edges[23:41, 23:41].any() and not edges[:17].any() and not edges[47:].any()
    # ... and each side of the square is traced (edges one pixel thick: no double lines).
    for col in (slice(24, 40),):
        assert edges[19:22, col].any(axis=0).all() and edges[42:45, col].any(axis=0).all()
        assert edges[col, 19:22].any(axis=1).all() and edges[col, 42:45].any(axis=1).all()
    assert edges[30, 15:50].sum() == 2 and edges[15:50, 30].sum() == 2


def test_canny_thresholds_are_monotone_and_colour_uses_strongest_channel():
    rng = np.random.RandomState(0)
    img = (rng.rand(48, 48) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(img).resize((96, 96), Image.Resampling.BILINEAR))
    prev = None
    for low, high in [(20, 40), (50, 100), (100, 200), (200, 400), (400, 800), (2000, 4000)]:
        edges = canny(img, low, high)
        if prev is not None:
            assert not (edges & ~prev).any()  # higher thresholds only remove edges
        prev = edges
    assert canny(img, 20, 40).sum() > canny(img, 100, 200).sum() > canny(img, 400, 800).sum()
    assert not canny(img, 2000, 4000).any()
    # A square drawn in the green channel only is found in the colour image.
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 1] = _square(64, 20, 44)
    np.testing.assert_array_equal(canny(rgb, 100, 200), canny(rgb[..., 1], 100, 200))
    # Blurring first weakens a noisy image's edges but keeps the square's.
    noisy = np.clip(_square(64, 20, 44) + rng.randn(64, 64) * 20, 0, 255)
    assert canny(noisy, 100, 200, sigma=1.5)[30, 15:50].sum() == 2
    assert canny(noisy, 100, 200, sigma=1.5).sum() < canny(noisy, 100, 200).sum()


def test_prepare_control_image_resizes_preprocesses_and_saves(tmp_path):
    rgb = np.zeros((64, 48, 3), np.uint8)
    rgb[16:48, 12:36] = 255
    Image.fromarray(rgb).save(tmp_path / "in.png")
    hint = prepare_control_image(tmp_path / "in.png", 96, 128, preprocessor="canny",
                                 save_path=tmp_path / "hint.png")
    assert hint.shape == (128, 96, 3) and hint.dtype == np.float32
    assert set(np.unique(hint)) == {0.0, 1.0} and (hint[..., 0] == hint[..., 2]).all()
    assert hint[..., 0].any() and not hint[40:90, 30:66].any()  # edges on the border, none inside
    saved = np.asarray(Image.open(tmp_path / "hint.png"))
    np.testing.assert_array_equal(saved, (hint * 255).astype(np.uint8))
    plain = prepare_control_image(rgb, 48, 64, preprocessor="none")
    np.testing.assert_array_equal(plain, rgb / np.float32(255))
    with pytest.raises(ValueError, match="not supported"):
        prepare_control_image(rgb, 48, 64, preprocessor="depth")


# ---------------------------------------------------------------- per-step scales


def test_controlnet_keep_is_diffusers_rule():
    np.testing.assert_array_equal(controlnet_keep(10, 0.2, 0.8), [0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(controlnet_keep(4, 0.0, 1.0), [1, 1, 1, 1])
    # diffusers keeps step i while (i + 1) / n <= end: with n=3, end=0.5 only step 0.
    np.testing.assert_array_equal(controlnet_keep(3, 0.0, 0.5), [1, 0, 0])
    s = controlnet_step_scales(5, [0.5, 1.0], [0.0, 0.4], 1.0)
    assert s.shape == (5, 2)
    np.testing.assert_allclose(s[:, 0], 0.5)
    np.testing.assert_array_equal(s[:, 1], [0, 0, 1, 1, 1])
    np.testing.assert_allclose(controlnet_step_scales(4, 0.8, 0.5, 1.0), [0, 0, 0.8, 0.8])
    with pytest.raises(ValueError):
        controlnet_keep(10, 0.5, 0.5)


def test_canny_equals_opencv():
    """cv2.Canny is the detector the Canny ControlNets were trained with; OpenCV is in the test
    extra (not a dependency of sdjax), so this runs rather than skips."""
    import cv2
    rng = np.random.RandomState(2)
    img = np.asarray(Image.fromarray((rng.rand(24, 32, 3) * 255).astype(np.uint8)).resize((256, 192)))
    img = np.clip(img + rng.randn(*img.shape) * 8, 0, 255).astype(np.uint8)
    for low, high in [(100, 200), (30, 60), (200, 400)]:
        for l2 in (False, True):
            ref = cv2.Canny(img, low, high, L2gradient=l2) > 0
            np.testing.assert_array_equal(canny(img, low, high, l2_gradient=l2), ref)


@pytest.mark.xdist_group("full_size")  # one full-size model at a time: 24 GiB holds one, not two
@pytest.mark.slow
def test_full_size_sd15_controlnet_parity():
    """The real SD 1.5 ControlNet size (361M parameters), random weights, zero convs perturbed."""
    from flax import nnx

    from sdjax.models.controlnet import ControlNetModel
    from sdjax.weights.mapping import load_state

    torch.manual_seed(0)
    unet_cfg = _unet_config("sd15")
    cn = diffusers.ControlNetModel(**{k: v for k, v in dict(_full_controlnet("sd15").config).items()
                                      if not k.startswith("_")}).eval()
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.02)
    cfg = ControlNetConfig.from_dict(dict(cn.config))
    abstract = abstract_model(ControlNetModel, cfg)
    model = load_state(abstract, {k: v.numpy() for k, v in cn.state_dict().items()})
    graphdef, state = nnx.split(model)
    apply = jax.jit(_pure(graphdef, "__call__"), compiler_options=_FAST_COMPILE)
    rng = np.random.RandomState(0)
    x = rng.randn(1, 4, 16, 16).astype(np.float32)
    ctx = rng.randn(1, 77, unet_cfg["cross_attention_dim"]).astype(np.float32)
    img = rng.rand(1, 3, 128, 128).astype(np.float32)
    down_t, mid_t = _torch_residuals(cn, x, ctx, img, 999, 1.0, False)
    down, mid = apply(state, _nhwc(x), 999, jnp.asarray(ctx), _nhwc(img), 1.0)
    for a, b in zip(down + [mid], list(down_t) + [mid_t]):
        _close(a, b)


def test_scale_at_maps_evaluations_to_their_step():
    sigmas = jnp.asarray([14.6, 7.0, 3.1, 1.2, 0.4, 0.0])  # 5 steps
    scales = jnp.asarray(controlnet_step_scales(5, 0.5, 0.2, 0.6))  # steps 1, 2 on
    np.testing.assert_allclose(scales, [0, 0.5, 0.5, 0, 0])
    at = jax.jit(scale_at)
    for i in range(5):
        assert float(at(sigmas[i], sigmas, scales)) == float(scales[i])  # the step's own start
        mid = (sigmas[i] + sigmas[i + 1]) / 2  # a Heun/DPM2 midpoint belongs to the same step
        assert float(at(jnp.full((4,), mid), sigmas, scales)) == float(scales[i])
    multi = jnp.asarray(controlnet_step_scales(5, [1.0, 2.0], [0.0, 0.6], 1.0))
    np.testing.assert_allclose(at(sigmas[3], sigmas, multi), [1.0, 2.0])
    np.testing.assert_allclose(at(sigmas[1], sigmas, multi), [1.0, 0.0])
