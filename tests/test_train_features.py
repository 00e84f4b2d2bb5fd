"""The training options the README lists, each checked against what it must compute: offset
noise in the noise the step uses, bf16 mixed precision and gradient checkpointing against the
float32 / plain step. (EMA sharded over fsdp, against the EMA formula and a 1-device run:
tests/test_parallel.py::test_fsdp_training_with_ema_equals_single_device.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import parallel
from sdjax.train import step as train_step_lib
from sdjax.train.config import TrainConfig
from test_train import _cfg, mini_model  # noqa: F401 -- the module-scoped tiny model fixture


def _offset_step_noise(offset_noise: float, b=8, hw=32, c=4):
    """The noise one train step draws, captured from inside the jitted step: the VAE and text
    encoder are stand-ins, alphas_cumprod ~ 0 so the UNet input is the noise itself, and the UNet
    predicts 0, so with an epsilon target the loss is mean(noise ** 2) of that same noise."""
    seen = []

    def unet_apply(state, noisy, t, ctx):
        jax.debug.callback(lambda x: seen.append(np.asarray(x)), noisy)
        return jnp.zeros_like(noisy) + 0.0 * state["w"]

    cfg = TrainConfig(model="m", data="d", output_dir="o", offset_noise=offset_noise, max_steps=1)
    opt = train_step_lib.make_optimizer(cfg)
    step = train_step_lib.make_train_step(
        cfg, opt, unet_apply=unet_apply, text_apply=lambda s, ids: jnp.zeros((ids.shape[0], 77, 8)),
        vae_encode=lambda s, im: (jnp.zeros_like(im), jnp.full_like(im, -60.0)), scaling_factor=1.0,
        alphas_cumprod=jnp.full((1000,), 1e-12, jnp.float32), prediction_type="epsilon")
    params = {"unet": {"w": jnp.zeros((), jnp.float32)}}
    state = train_step_lib.init_state(params, opt, ema=False)
    batch = {"images": jnp.zeros((1, b, hw, hw, c), jnp.float32), "input_ids": jnp.zeros((1, b, 77), jnp.int32)}
    _, metrics = jax.jit(step)(state, {"vae": {}, "text_encoder": {}}, batch, jax.random.key(3))
    jax.effects_barrier()
    (noise,) = seen
    return noise, float(metrics["loss"])


def test_offset_noise_is_a_per_image_per_channel_shift_in_the_step():
    """Offset noise (Guttenberg 2023): noise + s * N(0, 1) of shape (B, 1, 1, C). Decompose the
    step's noise into its per-(image, channel) spatial mean and the rest: the rest is unit noise,
    the means have std ~ s (not ~ 1/32, as without the offset) and differ between the channels
    of one image (a per-image offset would not); the loss is computed from this same noise."""
    s = 1.0
    noise, loss = _offset_step_noise(s)
    assert noise.shape == (8, 32, 32, 4)
    np.testing.assert_allclose(loss, np.mean(noise.astype(np.float64) ** 2), rtol=1e-5)
    means = noise.mean(axis=(1, 2))                               # (B, C)
    rest = noise - means[:, None, None, :]
    assert 0.95 < rest.std() < 1.05                               # a per-pixel offset gives sqrt(2)
    assert 0.6 * s < means.std() < 1.5 * s                        # 32 draws of N(0, s^2 + 1/1024)
    assert np.mean(means.std(axis=1)) > 0.4 * s                   # channels get their own offset
    plain, plain_loss = _offset_step_noise(0.0)
    assert np.abs(plain.mean(axis=(1, 2))).max() < 0.2            # no offset: means ~ N(0, 1/1024)
    np.testing.assert_allclose(plain_loss, np.mean(plain.astype(np.float64) ** 2), rtol=1e-5)


def _first_steps(model, out, n=2, **kw):
    """Losses and gradient norms of the first n steps, and the Trainer."""
    from sdjax.train.trainer import Trainer

    t = Trainer(_cfg(model, out, max_steps=n, ema_decay=None, caption_dropout=0.0, **kw),
                mesh=parallel.make_mesh(data=1, devices=jax.devices()[:1]), log=lambda m: None)
    records = t.run(progress=False)
    return np.array([r["loss"] for r in records]), np.array([r["grad_norm"] for r in records]), t


def _step_jaxpr(t) -> str:
    return str(jax.make_jaxpr(t.step_fn)(t.state, t.frozen, t.batch(0), jax.random.key(0)))


@pytest.mark.slow
def test_bf16_and_gradient_checkpointing_steps_match_the_float32_step(mini_model, tmp_path):  # noqa: F811
    loss32, gn32, t32 = _first_steps(mini_model, tmp_path / "f32")
    # The bf16 step runs under JAX's standard promotion, as the CLI and `train` run it: under the
    # suite's strict promotion the backward pass of JAX's own XLA attention (the text encoder's
    # causal attention) mixes float32 and bfloat16 and raises (sdjax.models.layers._attend wraps
    # only the forward call in standard promotion).
    with jax.numpy_dtype_promotion("standard"):
        lossbf, gnbf, tbf = _first_steps(mini_model, tmp_path / "bf16", mixed_precision="bf16")
        jaxprbf = _step_jaxpr(tbf)
    lossck, gnck, tck = _first_steps(mini_model, tmp_path / "ckpt", gradient_checkpointing=True)

    # bf16: the UNet and text encoder compute in bfloat16 (their matmuls and convs take bf16
    # operands), the master weights stay float32, and the step agrees with the float32 step to
    # bf16 rounding (8 mantissa bits: ~0.4% per op; 3% on the loss and gradient norm).
    jaxpr32 = _step_jaxpr(t32)
    assert "bf16" not in jaxpr32 and jaxprbf.count("bf16[") > 100
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tbf.state["params"]))
    assert not np.array_equal(lossbf, loss32)  # it did compute differently
    np.testing.assert_allclose(lossbf, loss32, rtol=3e-2)
    np.testing.assert_allclose(gnbf, gn32, rtol=3e-2)

    # Gradient checkpointing: the UNet is rematerialised in the backward pass (a checkpoint /
    # remat in the step), and the numbers are the plain step's to float32 rounding.
    jaxprck = _step_jaxpr(tck)
    assert "checkpoint[" not in jaxpr32 and "remat" not in jaxpr32
    assert "checkpoint[" in jaxprck or "remat" in jaxprck
    np.testing.assert_allclose(lossck, loss32, rtol=1e-5)
    np.testing.assert_allclose(gnck, gn32, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(tck.state["params"]), jax.tree.leaves(t32.state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)  # AdamW: lr-sized steps
