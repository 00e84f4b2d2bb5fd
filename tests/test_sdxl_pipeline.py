"""End-to-end parity of SDXL generation with diffusers' SDXL pipelines (tiny random models from
reference/sdxl-base and reference/sdxl-refiner): txt2img, img2img, 9-channel inpainting and the
base + refiner hand-over, same unit noise, Euler, images within 2/255; a non-square size (the
time ids matter) and an empty negative prompt (zeros, force_zeros_for_empty_prompt).
Conventions as tests/test_pipeline_parity.py (trailing spacing: init_noise_sigma = sigma_max)."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import sdjax
from sdjax.errors import CheckpointError, RequestError, TaskError
from sdjax.pipeline import sdxl
from sdjax.sampling import DiscreteModel, diffusers_schedule
from sdjax_tiny import build_sdxl_pipeline

# One worker runs the whole module: its module fixtures are costly and then built once.
pytestmark = pytest.mark.xdist_group("test_sdxl_pipeline")

W, H = 64, 48  # non-square: original/target size ids are (48, 64)
PROMPT = "a red circle on a blue background"
NEG = "blurry"
TRAILING = {"timestep_spacing": "trailing"}


def _save(torch_pipe, folder):
    torch_pipe.save_pretrained(folder)
    return sdjax.load_pipeline(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch_pipe = build_sdxl_pipeline("sdxl-base", seed=3, scheduler_overrides=TRAILING)
    return torch_pipe, _save(torch_pipe, tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def refiner(tmp_path_factory, base):
    torch_pipe = build_sdxl_pipeline("sdxl-refiner", seed=7, vae=base[0].vae, scheduler_overrides=TRAILING)
    return torch_pipe, _save(torch_pipe, tmp_path_factory.mktemp("refiner"))


def _noise(shape_nhwc, seed=0):
    return np.random.default_rng(seed).standard_normal(shape_nhwc).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _image(seed=1):
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.float32)
    img[..., 0] = np.linspace(0, 255, W)[None, :]
    img[..., 2] = np.linspace(255, 0, H)[:, None]
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def _close(ours, theirs_np01):
    ours = np.stack([np.asarray(im, np.float32) for im in ours]) / 255.0
    diff = np.abs(ours - theirs_np01)
    assert diff.max() <= 2 / 255 + 1e-6, f"max pixel difference {diff.max() * 255:.2f}/255"
    assert ours.std() > 0.02


def _sigmas(torch_pipe, steps):
    config = {k: v for k, v in torch_pipe.scheduler.config.items() if not k.startswith("_")}
    torch_pipe.scheduler.set_timesteps(steps)
    _, sigmas = diffusers_schedule(DiscreteModel.from_config(config), steps, solver="euler")
    np.testing.assert_allclose(sigmas, torch_pipe.scheduler.sigmas.numpy(), rtol=5e-5)
    return sigmas


@pytest.mark.parametrize("negative", [pytest.param(NEG, marks=pytest.mark.slow), ""])
def test_txt2img_matches_diffusers(base, negative):
    torch_pipe, pipe = base
    assert pipe.family == "sdxl" and pipe.force_zeros_for_empty_prompt
    steps = 5
    sigmas = _sigmas(torch_pipe, steps)
    noise = _noise((1, H // 8, W // 8, 4))
    with torch.no_grad():  # diffusers zeroes the negative only for negative_prompt=None
        ref = torch_pipe(PROMPT, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=6.0,
                         height=H, width=W, latents=_nchw(noise), output_type="np").images
    res = pipe.generate(PROMPT, negative, steps=steps, sampler="euler", cfg_scale=6.0, width=W, height=H,
                        noise=noise, sigmas=sigmas)
    _close(res.images, ref)


@pytest.mark.slow  # ~40-70 s on a shared 2-core CPU
def test_size_conditioning_matches_diffusers(base):
    """Non-default original size, crop and target size (and negative original size) reach the UNet."""
    torch_pipe, pipe = base
    steps = 4
    sigmas = _sigmas(torch_pipe, steps)
    noise = _noise((1, H // 8, W // 8, 4), seed=5)
    kw = dict(original_size=(512, 256), crops_coords_top_left=(16, 8), target_size=(96, 64))
    with torch.no_grad():
        ref = torch_pipe(PROMPT, negative_prompt=NEG, num_inference_steps=steps, guidance_scale=6.0, height=H,
                         width=W, latents=_nchw(noise), output_type="np", negative_original_size=(300, 200),
                         negative_target_size=(96, 64), **kw).images
    res = pipe.generate(PROMPT, NEG, steps=steps, sampler="euler", cfg_scale=6.0, width=W, height=H, noise=noise,
                        sigmas=sigmas, negative_original_size=(300, 200), **kw)
    _close(res.images, ref)
    default = pipe.generate(PROMPT, NEG, steps=steps, sampler="euler", cfg_scale=6.0, width=W, height=H,
                            noise=noise, sigmas=sigmas)
    assert np.abs(np.asarray(default.images[0], np.float32) - np.asarray(res.images[0], np.float32)).max() > 2


def _mode_latents(torch_pipe, image_nchw):
    with torch.no_grad():
        return torch_pipe.vae.encode(image_nchw).latent_dist.mode() * torch_pipe.vae.config.scaling_factor


@pytest.mark.slow  # ~40-70 s on a shared 2-core CPU
def test_img2img_matches_diffusers(base, monkeypatch):
    torch_pipe, pipe = base
    steps = 10
    sigmas = _sigmas(torch_pipe, steps)
    img = _image()
    noise = _noise((1, H // 8, W // 8, 4), seed=2)
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**torch_pipe.components, requires_aesthetics_score=False)
    module = __import__(type(img2img).__module__, fromlist=["randn_tensor"])
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: _nchw(noise))
    pixels = torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():  # diffusers strength 0.6 over 10 steps starts where A1111's 0.5 does (index 4)
        ref = img2img(PROMPT, image=_mode_latents(torch_pipe, pixels), strength=0.6, num_inference_steps=steps,
                      guidance_scale=6.0, negative_prompt=NEG, output_type="np").images
    res = pipe.generate(PROMPT, NEG, steps=steps, sampler="euler", cfg_scale=6.0, init_image=img, strength=0.5,
                        noise=noise, sigmas=sigmas)
    _close(res.images, ref)


@pytest.mark.slow  # ~40-70 s on a shared 2-core CPU
def test_inpaint_9_channel_matches_diffusers(tmp_path, monkeypatch):
    torch_pipe = build_sdxl_pipeline("sdxl-base", seed=5, in_channels=9, scheduler_overrides=TRAILING)
    pipe = _save(torch_pipe, tmp_path)
    assert pipe.unet.config.in_channels == 9
    steps = 8
    sigmas = _sigmas(torch_pipe, steps)
    img = _image(seed=4)
    mask = np.zeros((H, W), np.uint8)
    mask[16:40, 8:40] = 255
    noise = _noise((1, H // 8, W // 8, 4), seed=3)
    module = __import__(type(torch_pipe).__module__, fromlist=["randn_tensor"])
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: _nchw(noise))
    monkeypatch.setattr(torch_pipe, "_encode_vae_image", lambda image, generator: _mode_latents(torch_pipe, image))
    with torch.no_grad():
        ref = torch_pipe(PROMPT, image=Image.fromarray(img), mask_image=Image.fromarray(mask), strength=0.75,
                         num_inference_steps=steps, guidance_scale=6.0, negative_prompt=NEG, height=H, width=W,
                         output_type="np").images
    res = pipe.generate(PROMPT, NEG, steps=steps, sampler="euler", cfg_scale=6.0, init_image=img, mask=mask,
                        strength=0.625, noise=noise, sigmas=sigmas, mask_blur=0, paste_back=False)
    _close(res.images, ref)


def _diffusers_ensemble(base_pipe, refiner_pipe, noise, steps, switch):
    with torch.no_grad():
        latents = base_pipe(PROMPT, negative_prompt=NEG, num_inference_steps=steps, guidance_scale=6.0, height=H,
                            width=W, latents=_nchw(noise), denoising_end=switch, output_type="latent").images
        return refiner_pipe(PROMPT, negative_prompt=NEG, image=latents, num_inference_steps=steps,
                            denoising_start=switch, guidance_scale=6.0, output_type="np").images


@pytest.mark.slow  # ~40-70 s on a shared 2-core CPU
def test_refiner_hand_over_matches_diffusers(base, refiner):
    (torch_base, pipe), (torch_refiner, refiner_pipe) = base, refiner
    assert refiner_pipe.family == "sdxl-refiner" and refiner_pipe.text_encoder is None
    steps = 6
    sigmas = _sigmas(torch_base, steps)
    noise = _noise((1, H // 8, W // 8, 4), seed=9)
    kw = dict(steps=steps, sampler="euler", cfg_scale=6.0, width=W, height=H, noise=noise, sigmas=sigmas,
              refiner=refiner_pipe)
    outs = {}
    for switch in (0.5, 1.0):
        res = pipe.generate(PROMPT, NEG, refiner_switch_at=switch, **kw)
        if switch < 1:
            _close(res.images, _diffusers_ensemble(torch_base, torch_refiner, noise, steps, switch))
            assert "Refiner switch at: 0.5" in res.infotexts[0] and f"Refiner: {refiner_pipe.model_dir.name}" \
                in res.infotexts[0]
        outs[switch] = np.asarray(res.images[0], np.float32)
    # without the hand-over (switch 1.0: the base runs every step) the image is the base's alone
    alone = pipe.generate(PROMPT, NEG, **{k: v for k, v in kw.items() if k != "refiner"})
    assert np.array_equal(outs[1.0], np.asarray(alone.images[0], np.float32))
    assert np.abs(outs[0.5] - outs[1.0]).max() > 4


def test_switch_index_is_diffusers_cutoff():
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             timestep_spacing="trailing")
    model = DiscreteModel.from_config(dict(sched.config))
    sched.set_timesteps(10)
    _, sigmas = diffusers_schedule(model, 10, solver="euler")
    for f in (0.2, 0.5, 0.8, 0.95):
        cutoff = int(round(1000 - f * 1000))
        assert sdxl.switch_index(model, sigmas, f) == int((sched.timesteps >= cutoff).sum())


def test_time_ids_defaults():
    assert sdxl.time_ids("sdxl", 1024, 768).tolist() == [768, 1024, 0, 0, 768, 1024]
    assert sdxl.time_ids("sdxl-refiner", 1024, 768).tolist() == [768, 1024, 0, 0, 6.0]


@pytest.mark.parametrize("kw, words", [
    (dict(original_size=(0, 64)), "original_size"),
    (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left"),
    (dict(target_size=64), "target_size"),
    (dict(refiner_switch_at=0.0), "refiner_switch_at"),
    (dict(refiner_switch_at=1.5), "refiner_switch_at"),
])
def test_bad_sdxl_values_are_refused(base, kw, words):
    with pytest.raises(RequestError, match=words):
        base[1].generate(PROMPT, steps=2, **kw)


def test_sdxl_refuses_what_it_does_not_support(base, tmp_path):
    pipe = base[1]
    with pytest.raises(TaskError, match="clip skip"):
        pipe.generate(PROMPT, steps=2, width=W, height=H, clip_skip=2)
    with pytest.raises(CheckpointError, match="lora_dir"):  # SDXL LoRAs: tests/test_sdxl_networks.py
        pipe.generate(PROMPT + " <lora:x:1>", steps=2, width=W, height=H)


@pytest.mark.slow  # float16 compiles slowly on CPU (~40 s)
def test_float16_sdxl_vae_overflow_is_decoded_again_in_float32(base):
    """The SDXL VAE overflows in float16 (activations past 65504): the NaN images are detected and
    decoded again in float32, as A1111 does. The decoder's first conv is scaled until it overflows
    in float16 (its weights still finite there); without the retry this raises NonFiniteError."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    pipe16 = sdjax.load_pipeline(base[1].model_dir, dtype="float16")
    kernel = next(v for p, v in nnx.to_flat_state(pipe16.vae.state)
                  if tuple(map(str, p)) == ("decoder", "conv_in", "kernel"))
    factor = 3e4 / float(np.abs(np.asarray(kernel.get_value(), np.float32)).max())

    def scale(path, a):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        hit = names[:2] == ["decoder", "conv_in"] and "kernel" in names
        return (a.astype(jnp.float32) * factor).astype(a.dtype) if hit else a

    pipe16.vae.state = jax.tree_util.tree_map_with_path(scale, pipe16.vae.state)
    kw = dict(steps=2, sampler="euler", width=W, height=H, seed=4)
    with pytest.warns(RuntimeWarning, match="decoding again in float32"):
        res = pipe16.generate(PROMPT, **kw)
    pixels = np.asarray(res.images[0], np.float32)
    assert np.isfinite(res.latents).all() and pixels.std() > 0


@pytest.mark.slow  # one more compile (~30 s on a shared CPU)
def test_outpaint_latent_mask_keeps_the_original(base):
    """Outpainting (latent-mask inpainting on an extended canvas) with the SDXL base: the original
    pixels come back unchanged (pasted back), the new strip is generated."""
    pipe = base[1]
    img = Image.fromarray(_image(seed=6)[:, :48])  # 48x48 -> 64x48 with 16 px on the right
    res = pipe.outpaint(img, PROMPT, right=16, steps=3, sampler="euler", seed=2)
    out = np.asarray(res.images[0])
    assert out.shape == (H, W, 3)
    # outside the mask, its 8 px overlap and the mask blur (4: A1111 blurs about 3 sigma wide)
    np.testing.assert_array_equal(out[:, :24], np.asarray(img)[:, :24])
    assert out[:, 48:].std() > 1


@pytest.mark.parametrize("name, family", [("sd15", "sd"), ("sd21", "sd"), ("sdxl-base", "sdxl"),
                                          ("sdxl-refiner", "sdxl-refiner")])
def test_family_from_the_reference_folders(name, family):
    from conftest import reference
    from sdjax.weights.diffusers import model_family, read_model_index

    assert model_family(read_model_index(reference(name))) == family


def test_a_folder_mixing_families_is_refused(base, tmp_path):
    import json
    import shutil

    from conftest import reference
    from sdjax.errors import CheckpointError

    folder = tmp_path / "mixed"
    shutil.copytree(base[1].model_dir, folder)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        unet[key] = None
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    with pytest.raises(CheckpointError, match="mixes model families"):
        sdjax.load_pipeline(folder)
    index = json.loads((reference("sdxl-base") / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]  # tokenizer_2 without its encoder
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tokenizer_2 without text_encoder_2"):
        sdjax.load_pipeline(folder)


def test_sdxl_refiner_training_is_refused_clearly(refiner, tmp_path):
    # SDXL convert and base training: tests/test_sdxl_single_file.py, tests/test_sdxl_train.py
    from sdjax.errors import ConfigError
    from sdjax.train.config import TrainConfig
    from sdjax.train.trainer import Trainer

    with pytest.raises(ConfigError, match="SDXL base model"):
        Trainer(TrainConfig(model=str(refiner[1].model_dir), data=str(tmp_path), output_dir=str(tmp_path / "run")))
