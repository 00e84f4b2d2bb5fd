"""ControlNet in `Pipeline.generate`: parity with diffusers' StableDiffusionControlNetPipeline
(single, guess mode, MultiControlNet), StableDiffusionControlNetInpaintPipeline (4-channel
UNet inpainting), and the per-step scale rule (start / end fractions).

Tiny random weights from the SD 1.5 reference config (tests/sdjax_tiny.py); the ControlNet is
diffusers' `ControlNetModel.from_unet` of that UNet, perturbed so the zero convolutions act.
Both sides start from the same latents with Euler on the same sigmas (trailing spacing).
"""

import numpy as np
import pytest
import torch

import sdjax
from sdjax.pipeline.control import ControlNetUnit, record_scales
from sdjax.pipeline.control import controlnet_keep
from sdjax.metadata import parse_infotext
from sdjax.sampling import DiscreteModel, diffusers_schedule
from sdjax_tiny import build_diffusers_pipeline, perturb

# One worker runs the whole module: its module fixtures are costly and then built once.
pytestmark = pytest.mark.xdist_group("test_controlnet_generate")

diffusers = pytest.importorskip("diffusers")

SIZE = 64
STEPS = 6
PROMPT = "a red circle on a blue background"
NEG = "blurry"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch_pipe = build_diffusers_pipeline("sd15", seed=3)
    root = tmp_path_factory.mktemp("cn")
    torch_pipe.save_pretrained(root / "sd")
    nets = []
    for i in range(2):
        cn = diffusers.ControlNetModel.from_unet(torch_pipe.unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
        cn = perturb(cn, 10 + i, scale=0.1)
        cn.save_pretrained(root / f"cn{i}")
        nets.append(cn)
    return torch_pipe, nets, sdjax.load_pipeline(root / "sd"), root


def _control_image(seed):
    rng = np.random.default_rng(seed)
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    return np.where(rng.random((SIZE, SIZE, 1)) < 0.1, 255 - img, img).astype(np.uint8)


def _euler(torch_pipe):
    config = {k: v for k, v in torch_pipe.scheduler.config.items() if not k.startswith("_")}
    config["timestep_spacing"] = "trailing"
    sched = diffusers.EulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(STEPS)
    _, sigmas = diffusers_schedule(DiscreteModel.from_config(config), STEPS, solver="euler")
    np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=5e-5)
    return sched, sigmas


def _noise():
    return np.random.default_rng(0).standard_normal((1, SIZE // 8, SIZE // 8, 4)).astype(np.float32)


def _run_both(setup, n, scales, starts, ends, guess_mode=False):
    from PIL import Image

    torch_pipe, nets, pipe, root = setup
    sched, sigmas = _euler(torch_pipe)
    images = [_control_image(i) for i in range(n)]
    cn = nets[0] if n == 1 else nets[:n]
    ref_pipe = diffusers.StableDiffusionControlNetPipeline(
        **{k: v for k, v in torch_pipe.components.items() if k != "scheduler"}, scheduler=sched, controlnet=cn)
    one = (lambda x: x[0]) if n == 1 else (lambda x: list(x))
    noise = _noise()
    with torch.no_grad():
        ref = ref_pipe(PROMPT, negative_prompt=NEG, image=one([Image.fromarray(im) for im in images]),
                       num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                       latents=torch.from_numpy(np.transpose(noise, (0, 3, 1, 2)).copy()),
                       controlnet_conditioning_scale=one(scales), control_guidance_start=one(starts),
                       control_guidance_end=one(ends), guess_mode=guess_mode, output_type="np").images
    units = [ControlNetUnit(model=root / f"cn{i}", image=images[i], scale=scales[i], start=starts[i], end=ends[i],
                            guess_mode=guess_mode) for i in range(n)]
    res = pipe.generate(PROMPT, NEG, steps=STEPS, sampler="euler", cfg_scale=7.5, width=SIZE, height=SIZE,
                        noise=noise, sigmas=sigmas, controlnets=units)
    no_cn = pipe.generate(PROMPT, NEG, steps=STEPS, sampler="euler", cfg_scale=7.5, width=SIZE, height=SIZE,
                          noise=noise, sigmas=sigmas)
    return res, ref, no_cn


def _assert_close(result, ref, no_cn):
    ours = np.stack([np.asarray(im, np.float32) for im in result.images]) / 255.0
    diff = np.abs(ours - ref)
    assert diff.max() <= 2 / 255 + 1e-6, f"max pixel difference {diff.max() * 255:.2f}/255"
    plain = np.stack([np.asarray(im, np.float32) for im in no_cn.images]) / 255.0
    assert np.abs(plain - ref).max() > 4 / 255  # the ControlNet really changed the image


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_txt2img_matches_diffusers(setup, guess_mode):
    res, ref, no_cn = _run_both(setup, 1, [0.9], [0.0], [0.8] if guess_mode else [1.0], guess_mode)
    _assert_close(res, ref, no_cn)
    info = parse_infotext(res.infotexts[0])
    unit = info["ControlNet 0"]
    assert unit.startswith("Module: none, Model: cn0 [") and "Weight: 0.9" in unit
    assert ("Guidance End: 0.8" in unit) == guess_mode and ("ControlNet is more important" in unit) == guess_mode


def test_multi_controlnet_matches_diffusers(setup):
    res, ref, no_cn = _run_both(setup, 2, [0.7, 1.2], [0.0, 0.3], [1.0, 0.7])
    _assert_close(res, ref, no_cn)
    info = parse_infotext(res.infotexts[0])
    assert "ControlNet 0" in info and "Guidance Start: 0.3" in info["ControlNet 1"]


def _recorded_scales(pipe, unit, steps, **kw):
    seen = []
    with record_scales(lambda t, s: seen.append((t, s.copy()))):
        pipe.generate(PROMPT, steps=steps, sampler="euler", schedule="normal", width=SIZE, height=SIZE,
                      controlnets=[unit], record_control=True, **kw)
    seen.sort(key=lambda ts: -ts[0])  # one evaluation per Euler step, from high noise down
    return np.array([s[0] for _, s in seen])


def test_start_end_switch_control_at_the_right_steps(setup, tmp_path):
    _, _, pipe, root = setup
    unit = ControlNetUnit(model=root / "cn0", image=_control_image(0), scale=0.8, start=0.2, end=0.7,
                          preprocessor="canny", save_path=tmp_path / "hint.png")
    scales = _recorded_scales(pipe, unit, 10)
    # diffusers: step i acts iff start <= i / n and (i + 1) / n <= end -> steps 2..6 of 10.
    np.testing.assert_allclose(scales, 0.8 * np.array([0, 0, 1, 1, 1, 1, 1, 0, 0, 0]), rtol=1e-6)
    assert (tmp_path / "hint.png").is_file()
    # img2img: strength 0.5 runs the last 6 of 10 steps; the fractions count those 6 only.
    scales = _recorded_scales(pipe, unit, 10, init_image=_control_image(3), strength=0.5)
    assert len(scales) == 6
    np.testing.assert_allclose(scales, 0.8 * controlnet_keep(6, 0.2, 0.7), rtol=1e-6)
    np.testing.assert_allclose(scales, 0.8 * np.array([0, 0, 1, 1, 0, 0]), rtol=1e-6)


def _mode_latents(torch_pipe, image_nchw):
    with torch.no_grad():
        return torch_pipe.vae.encode(image_nchw).latent_dist.mode() * torch_pipe.vae.config.scaling_factor


def test_controlnet_inpainting_matches_diffusers(setup, monkeypatch):
    """A 4-channel UNet inpainting with a ControlNet against diffusers'
    StableDiffusionControlNetInpaintPipeline: same noise, same Euler sigmas, the VAE posterior's
    mode on both sides, a binary mask on 8-pixel blocks (no blur, no paste-back)."""
    from PIL import Image

    torch_pipe, nets, pipe, root = setup
    steps = 8
    config = {k: v for k, v in torch_pipe.scheduler.config.items() if not k.startswith("_")}
    config["timestep_spacing"] = "trailing"
    sched = diffusers.EulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(steps)
    _, sigmas = diffusers_schedule(DiscreteModel.from_config(config), steps, solver="euler")
    np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=5e-5)
    rng = np.random.default_rng(4)
    img = np.clip(np.linspace(0, 255, SIZE)[None, :, None] + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255)
    img = img.astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    control = _control_image(1)
    noise = np.random.default_rng(3).standard_normal((1, SIZE // 8, SIZE // 8, 4)).astype(np.float32)
    module = __import__(diffusers.StableDiffusionControlNetInpaintPipeline.__module__, fromlist=["randn_tensor"])
    monkeypatch.setattr(module, "randn_tensor",
                        lambda *a, **k: torch.from_numpy(np.ascontiguousarray(np.transpose(noise, (0, 3, 1, 2)))))
    ref_pipe = diffusers.StableDiffusionControlNetInpaintPipeline(
        **{k: v for k, v in torch_pipe.components.items() if k != "scheduler"}, scheduler=sched, controlnet=nets[0])
    # diffusers samples the VAE posterior with its generator; sdjax uses the mean (mode).
    monkeypatch.setattr(ref_pipe, "_encode_vae_image", lambda image, generator: _mode_latents(torch_pipe, image))
    with torch.no_grad():
        # strength 0.75 over 8 steps: diffusers starts at index 8 - int(0.75 * 8) = 2, as
        # A1111's strength 0.625 (t_enc = 5, start 8 - 5 - 1 = 2).
        ref = ref_pipe(PROMPT, negative_prompt=NEG, image=Image.fromarray(img), mask_image=Image.fromarray(mask),
                       control_image=Image.fromarray(control), strength=0.75, num_inference_steps=steps,
                       guidance_scale=7.5, height=SIZE, width=SIZE, controlnet_conditioning_scale=0.9,
                       output_type="np").images
    kw = dict(steps=steps, sampler="euler", cfg_scale=7.5, init_image=img, mask=mask, strength=0.625, noise=noise,
              sigmas=sigmas, mask_blur=0, paste_back=False)
    unit = ControlNetUnit(model=root / "cn0", image=control, scale=0.9)
    res = pipe.generate(PROMPT, NEG, controlnets=[unit], **kw)
    plain = pipe.generate(PROMPT, NEG, **kw)
    _assert_close(res, ref, plain)
    # Outside the mask the latents are the original's on both (A1111's blend), inside repainted.
    keep = np.ones((SIZE // 8, SIZE // 8), bool)
    keep[2:6, 1:5] = False
    a, b = np.asarray(res.latents)[0], np.asarray(plain.latents)[0]
    np.testing.assert_allclose(a[keep], b[keep], atol=1e-5)
    assert np.abs(a - b)[~keep].max() > 0.05
