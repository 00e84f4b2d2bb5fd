"""End-to-end parity of `Pipeline.generate` with diffusers' Stable Diffusion pipelines.

Tiny random models from the reference configs are saved by diffusers (`save_pretrained`),
loaded by `sdjax.load_pipeline`, and both sides run from the same initial latents with a
deterministic sampler. Each case first checks that both define the same sigma sequence, then
that the decoded images agree within 2/255.

Noise conventions: our `noise` is scaled by the first sigma (x = x0 + sigma * eps). diffusers'
Euler scales its `latents` by init_noise_sigma = sigma_max (trailing spacing), the same thing.
DDIM and DPM-Solver work in the variance-preserving scaling x_vp = x / sqrt(1 + sigma^2) and
start from unit noise there, so for them we pass noise * sqrt(1 + sigma_max^2) / sigma_max.
"""

import diffusers
import numpy as np
import pytest
import torch

import sdjax
from sdjax.pipeline.generator import img2img_start
from sdjax.sampling import DiscreteModel, diffusers_schedule
from sdjax_tiny import build_diffusers_pipeline

# One worker runs the whole module: its module fixtures are costly and then built once.
pytestmark = pytest.mark.xdist_group("test_pipeline_parity")

STEPS = 6
SIZE = 64
PROMPT = "a red circle on a blue background"
NEG = "blurry"


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    torch_pipe = build_diffusers_pipeline("sd15", seed=3)
    folder = tmp_path_factory.mktemp("sd15")
    torch_pipe.save_pretrained(folder)
    return torch_pipe, sdjax.load_pipeline(folder)


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    torch_pipe = build_diffusers_pipeline("sd2-inpainting", seed=5)
    folder = tmp_path_factory.mktemp("sd2inp")
    torch_pipe.save_pretrained(folder)
    return torch_pipe, sdjax.load_pipeline(folder)


def _noise(shape_nhwc, seed=0):
    return np.random.default_rng(seed).standard_normal(shape_nhwc).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _image(seed=1):
    rng = np.random.default_rng(seed)
    base = np.zeros((SIZE, SIZE, 3), np.float32)
    base[..., 0] = np.linspace(0, 255, SIZE)[None, :]
    base[..., 2] = np.linspace(255, 0, SIZE)[:, None]
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _assert_images_close(ours, theirs_np01):
    ours = np.stack([np.asarray(im, np.float32) for im in ours]) / 255.0
    diff = np.abs(ours - theirs_np01)
    assert diff.max() <= 2 / 255 + 1e-6, f"max pixel difference {diff.max() * 255:.2f}/255"
    assert ours.std() > 0.02  # a real image, not a constant


def _vp_noise(noise, sigma_max):
    return noise * np.sqrt(1 + sigma_max**2) / sigma_max


def _config(torch_pipe, **overrides):
    # Without the `_` keys: diffusers ignores values listed in `_use_default_values`.
    return {**{k: v for k, v in torch_pipe.scheduler.config.items() if not k.startswith("_")}, **overrides}


def _table_sigma(model, t):
    acp = model.alphas_cumprod[np.asarray(t, np.int64)]
    return np.sqrt((1 - acp) / acp)


@pytest.mark.parametrize("case", ["euler", "ddim", "dpmpp_2m"])
def test_txt2img_matches_diffusers(sd15, case):
    torch_pipe, pipe = sd15
    config = _config(torch_pipe)
    noise = _noise((1, SIZE // 8, SIZE // 8, 4))
    if case == "euler":
        config["timestep_spacing"] = "trailing"  # init_noise_sigma = sigma_max
        sched = diffusers.EulerDiscreteScheduler.from_config(config)
        sched.set_timesteps(STEPS)
        _, sigmas = diffusers_schedule(DiscreteModel.from_config(config), STEPS, solver="euler")
        np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=5e-5)
        assert float(sched.init_noise_sigma) == pytest.approx(float(sigmas[0]), rel=1e-6)
        ours_noise = noise
    elif case == "ddim":
        sched = diffusers.DDIMScheduler.from_config(config)  # leading, steps_offset 1
        sched.set_timesteps(STEPS)
        model = DiscreteModel.from_config(config)
        # DDIM ends at alphas_cumprod[0] (set_alpha_to_one = false), not at sigma 0.
        sigmas = np.append(_table_sigma(model, sched.timesteps.numpy()), _table_sigma(model, 0)).astype(np.float32)
        ours_noise = _vp_noise(noise, sigmas[0])
    else:
        config["timestep_spacing"] = "linspace"
        sched = diffusers.DPMSolverMultistepScheduler.from_config(config)
        sched.set_timesteps(STEPS)
        _, sigmas = diffusers_schedule(DiscreteModel.from_config(config), STEPS, solver="dpmsolver")
        np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=5e-5)
        ours_noise = _vp_noise(noise, sigmas[0])
    torch_pipe.scheduler = sched
    with torch.no_grad():
        ref = torch_pipe(PROMPT, negative_prompt=NEG, num_inference_steps=STEPS, guidance_scale=7.5,
                         height=SIZE, width=SIZE, latents=_nchw(noise), output_type="np").images
    res = pipe.generate(PROMPT, NEG, steps=STEPS, sampler=case, cfg_scale=7.5, width=SIZE, height=SIZE,
                        noise=ours_noise, sigmas=sigmas)
    _assert_images_close(res.images, ref)


def _mode_latents(torch_pipe, image_nchw):
    with torch.no_grad():
        return torch_pipe.vae.encode(image_nchw).latent_dist.mode() * torch_pipe.vae.config.scaling_factor


def test_img2img_matches_diffusers(sd15, monkeypatch):
    torch_pipe, pipe = sd15
    config = _config(torch_pipe, timestep_spacing="trailing")
    sched = diffusers.EulerDiscreteScheduler.from_config(config)
    steps = 10
    # A1111 strength 0.5: t_enc = 5, first sigma index 10 - 5 - 1 = 4. diffusers starts at
    # steps - int(steps * strength): strength 0.6 starts at the same index 4.
    start = img2img_start(0.5, steps)
    img = _image()
    sched.set_timesteps(steps)
    _, sigmas = diffusers_schedule(DiscreteModel.from_config(config), steps, solver="euler")
    np.testing.assert_allclose(sigmas[start:], sched.sigmas.numpy()[4:], rtol=5e-5)
    noise = _noise((1, SIZE // 8, SIZE // 8, 4), seed=2)
    module = __import__(diffusers.StableDiffusionImg2ImgPipeline.__module__, fromlist=["randn_tensor"])
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: _nchw(noise))
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**{**torch_pipe.components, "scheduler": sched})
    pixels = torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        ref = img2img(PROMPT, image=_mode_latents(torch_pipe, pixels), strength=0.6, num_inference_steps=steps,
                      guidance_scale=7.5, negative_prompt=NEG, output_type="np").images
    res = pipe.generate(PROMPT, NEG, steps=steps, sampler="euler", cfg_scale=7.5, init_image=img,
                        strength=0.5, noise=noise, sigmas=sigmas)
    assert start == 4
    _assert_images_close(res.images, ref)


def test_inpaint_9_channel_matches_diffusers(inpainting, monkeypatch):
    torch_pipe, pipe = inpainting
    assert pipe.unet.config.in_channels == 9
    config = _config(torch_pipe, timestep_spacing="trailing")
    sched = diffusers.EulerDiscreteScheduler.from_config(config)
    steps = 8
    sched.set_timesteps(steps)
    _, sigmas = diffusers_schedule(DiscreteModel.from_config(config), steps, solver="euler")
    np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=5e-5)
    img = _image(seed=4)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    noise = _noise((1, SIZE // 8, SIZE // 8, 4), seed=3)
    module = __import__(diffusers.StableDiffusionInpaintPipeline.__module__, fromlist=["randn_tensor"])
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: _nchw(noise))
    # diffusers samples the VAE posterior with its generator; sdjax uses the mean (mode).
    monkeypatch.setattr(torch_pipe, "_encode_vae_image", lambda image, generator: _mode_latents(torch_pipe, image))
    torch_pipe.scheduler = sched
    from PIL import Image

    with torch.no_grad():
        # strength 0.75 over 8 steps: diffusers starts at index 8 - int(0.75 * 8) = 2.
        ref = torch_pipe(PROMPT, image=Image.fromarray(img), mask_image=Image.fromarray(mask), strength=0.75,
                         num_inference_steps=steps, guidance_scale=7.5, negative_prompt=NEG, height=SIZE,
                         width=SIZE, output_type="np").images
    assert img2img_start(0.625, steps) == 2
    # diffusers' start index 2 == A1111's steps - int(s * steps) - 1 = 2 for s = 0.625 (t_enc = 5).
    res = pipe.generate(PROMPT, NEG, steps=steps, sampler="euler", cfg_scale=7.5, init_image=img, mask=mask,
                        strength=0.625, noise=noise, sigmas=sigmas, mask_blur=0, paste_back=False)
    _assert_images_close(res.images, ref)
