"""A whole tiny txt2img with the GPU's and the TPU's implementations selected, on CPU.

GPU and TPU run lax's own convolutions and XLA's (or cuDNN's / Pallas') attention, never the
CPU forms; a model that only ever ran its CPU branches could crash or be wrong there unseen.
Here the same saved tiny pipeline runs with each set of implementations that can execute on
CPU -- "gpu": XLA attention and lax convs (what a GPU runs where cuDNN does not take the
call, and its convs), "tpu": the Pallas TPU flash kernel in TPU interpret mode and lax convs,
"softmax": the plain reference form -- in float32 and bfloat16, and must give the images of
the default CPU path and of diffusers.
"""

import diffusers
import jax
import numpy as np
import pytest
import torch
from jax.experimental.pallas import tpu as pltpu

import sdjax
from sdjax.models import layers
from sdjax.models.kernels import Kernels
from sdjax.sampling import DiscreteModel, diffusers_schedule
from sdjax_tiny import build_diffusers_pipeline

SIZE = 128  # 16x16 latents: 256 tokens, two of the Pallas kernel's 128-blocks
STEPS = 4
PROMPT = "a red circle on a blue background"
PATHS = {
    "gpu": Kernels(attention="xla", conv="xla", backend="cpu"),
    "tpu": Kernels(attention="pallas", conv="xla", backend="tpu"),
    "softmax": Kernels(attention="softmax", conv="xla", backend="cpu"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch_pipe = build_diffusers_pipeline("sd15", seed=7)
    folder = tmp_path_factory.mktemp("sd15_accel")
    torch_pipe.save_pretrained(folder)
    config = {k: v for k, v in torch_pipe.scheduler.config.items() if not k.startswith("_")}
    config["timestep_spacing"] = "trailing"
    sched = diffusers.EulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(STEPS)
    _, sigmas = diffusers_schedule(DiscreteModel.from_config(config), STEPS, solver="euler")
    noise = np.random.default_rng(0).standard_normal((1, SIZE // 8, SIZE // 8, 4)).astype(np.float32)
    torch_pipe.scheduler = sched
    with torch.no_grad():
        ref = torch_pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                         latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()), output_type="np").images
    return folder, sigmas, noise, ref


def _generate(pipe, sigmas, noise, kernels=None):
    kw = dict(steps=STEPS, sampler="euler", cfg_scale=7.5, width=SIZE, height=SIZE, noise=noise, sigmas=sigmas)
    if kernels is not None and kernels.attention == "pallas":
        with pltpu.force_tpu_interpret_mode():
            res = pipe.generate(PROMPT, **kw)
    else:
        res = pipe.generate(PROMPT, **kw)
    return np.stack([np.asarray(im, np.float32) for im in res.images]) / 255.0


def _unet_primitives(pipe) -> str:
    unet = pipe.unet
    x = jax.numpy.zeros((2, SIZE // 8, SIZE // 8, 4), pipe.dtype)
    ctx = jax.numpy.zeros((2, 77, 32), pipe.dtype)  # the tiny config's cross_attention_dim
    return str(jax.make_jaxpr(lambda s, x, c: unet.apply(s, x, jax.numpy.float32(500.0), c))(unet.state, x, ctx))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_txt2img_on_accelerator_implementations(tiny, path, dtype):
    folder, sigmas, noise, ref = tiny
    default = sdjax.load_pipeline(folder, dtype)
    assert default.kernels == Kernels(backend="cpu")
    kernels = PATHS[path]
    pipe = sdjax.load_pipeline(folder, dtype).use_kernels(kernels=kernels)
    assert pipe.kernels == kernels and pipe.unet.kernels == kernels

    # The chosen implementations are what runs: lax convs only, and the Pallas kernel on "tpu".
    jaxpr = _unet_primitives(pipe)
    assert "name=_conv2d" not in jaxpr and "conv_general_dilated" in jaxpr
    assert ("pallas_call" in jaxpr) == (path == "tpu")
    assert "name=_conv2d" in _unet_primitives(default)  # the CPU default's matmul convs

    ours = _generate(pipe, sigmas, noise, kernels)
    base = _generate(default, sigmas, noise)
    assert ours.std() > 0.02
    if dtype == "float32":
        assert np.abs(ours - base).max() <= 1 / 255 + 1e-6
        assert np.abs(ours - ref).max() <= 2 / 255 + 1e-6
    else:
        # Tiny random nets are ill-conditioned in bfloat16 (rounding the weights alone moves
        # their images by several /255), so a bf16 path is held to the error of the default
        # CPU path's bf16 images against diffusers' float32 ones: no worse than it, twice over.
        err, base_err = np.abs(ours - ref), np.abs(base - ref)
        print(path, "bf16 vs diffusers f32: max", err.max() * 255, "mean", err.mean() * 255,
              "| default path: max", base_err.max() * 255, "mean", base_err.mean() * 255)
        assert err.mean() <= 2 * base_err.mean() + 0.5 / 255
        assert err.max() <= 2 * base_err.max() + 2 / 255


def test_load_pipeline_override_and_environment(tiny, monkeypatch):
    folder = tiny[0]
    assert sdjax.load_pipeline(folder, attention="xla", conv="xla").kernels == Kernels("xla", "xla", "cpu")
    monkeypatch.setenv("SDJAX_ATTENTION", "softmax")
    pipe = sdjax.load_pipeline(folder)
    assert pipe.kernels.attention == "softmax"
    atts = [m for _, m in __import__("flax").nnx.iter_graph(pipe.unet.module()) if hasattr(m, "kernels")]
    assert atts and all(m.kernels.attention == "softmax" for m in atts)
    with pytest.raises(sdjax.errors.KernelError, match="only on GPU"):
        sdjax.load_pipeline(folder, attention="cudnn")
    assert layers.CONV_FUNCTIONS["xla"] is layers.conv_xla


def test_training_uses_the_requested_attention(tiny):
    from flax import nnx

    from sdjax.errors import KernelError
    from sdjax.models.attention import Attention
    from sdjax.train.config import TrainConfig
    from sdjax.train.trainer import Trainer

    pipe = sdjax.load_pipeline(tiny[0], attention="softmax", conv="xla")
    graph = Trainer._graphdef(pipe.unet, jax.numpy.bfloat16)  # what the train step merges
    model = nnx.merge(graph, pipe.unet.state)
    atts = [m for _, m in nnx.iter_graph(model) if isinstance(m, Attention)]
    convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
    assert atts and all(m.kernels.attention == "softmax" for m in atts)
    assert convs and all(c.conv_general_dilated is layers.conv_xla for c in convs)
    cfg = dict(model=str(tiny[0]), data="unused", output_dir="unused")
    assert TrainConfig(**cfg, attention="xla").attention == "xla"
    with pytest.raises(KernelError, match="only on GPU"):
        TrainConfig(**cfg, attention="cudnn")
