"""Training throughput: sdjax's jitted train step vs a plain PyTorch AdamW loop on diffusers'
UNet2DConditionModel, same tiny UNet (same weights), same batch, resolution and dtype (fp32).

    python scripts/bench_train.py            # tiny SD-shaped UNet, batch 8, 16x16x4 latents
    python scripts/bench_train.py --quick    # smaller and fewer steps (CI smoke test)

Both sides do the same work per step, on latents with a fixed text context (the UNet is
what is compared; VAE and text encoder are frozen in fine-tuning and cost the same on
either side): draw timesteps and noise, DDPM `add_noise`, UNet forward, epsilon MSE,
backward, global-norm clipping at 1.0, AdamW. sdjax runs `sdjax.train.step.make_train_step`
(the trainer's own step, jitted, state donated); PyTorch runs `model(...)`,
`loss.backward()`, `clip_grad_norm_`, `AdamW.step()`. Compile / warm-up steps are excluded
from the timings. Prints one line per side, `<name>: <x> examples/s`, then
`ratio sdjax/torch: <r>x`.
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time

import numpy as np

from sdjax import runtime

UNET = {"sample_size": 16, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention_head_dim": 4,
        "cross_attention_dim": 64, "norm_num_groups": 16}
QUICK_UNET = dict(UNET, sample_size=8, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[16, 32],
                  attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 1e-2, 1.0


def _torch_unet(config: dict, seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config)


def _alphas_cumprod(n: int = 1000) -> np.ndarray:
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=np.float64) ** 2  # scaled_linear
    return np.cumprod(1.0 - betas).astype(np.float32)


def bench_sdjax(folder: str, latents_nhwc: np.ndarray, context: np.ndarray, steps: int, warmup: int) -> dict:
    """Examples/s of sdjax's jitted train step on the UNet in `folder` (diffusers layout)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sdjax.train import step as train_step_lib
    from sdjax.train.config import TrainConfig
    from sdjax.weights.diffusers import load_model

    unet, _ = load_model("unet", folder)
    graphdef, params = nnx.split(unet)
    cfg = TrainConfig(model=folder, data="synthetic", output_dir=tempfile.gettempdir(), max_steps=10**6,
                      learning_rate=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, lr_end_ratio=1.0)
    optimizer = train_step_lib.make_optimizer(cfg)
    step_fn = train_step_lib.make_train_step(
        cfg, optimizer,
        unet_apply=lambda s, x, t, ctx: nnx.merge(graphdef, s)(x, t, ctx),
        text_apply=lambda ctx, ids: ctx,  # the frozen "text encoder" is the fixed context itself
        # Latents in, no sampling: logvar -60 makes the VAE's posterior noise vanish.
        vae_encode=lambda _, x: (x, jnp.full_like(x, -60.0)),
        scaling_factor=1.0, alphas_cumprod=jnp.asarray(_alphas_cumprod()), prediction_type="epsilon")
    step_fn = jax.jit(step_fn, donate_argnums=(0,))
    state = train_step_lib.init_state({"unet": params}, optimizer, ema=False)
    b = latents_nhwc.shape[0]
    batch = {"images": jnp.asarray(latents_nhwc)[None], "input_ids": jnp.zeros((1, b, 77), jnp.int32)}
    frozen = {"vae": None, "text_encoder": jnp.asarray(context)}
    key = jax.random.key(0)
    t0 = time.perf_counter()
    for i in range(warmup):
        state, m = step_fn(state, frozen, batch, jax.random.fold_in(key, i))
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = step_fn(state, frozen, batch, jax.random.fold_in(key, warmup + i))
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t0
    return {"examples_per_s": b * steps / dt, "step_ms": 1e3 * dt / steps, "warmup_s": compile_s,
            "loss": float(m["loss"])}


def bench_torch(model, latents_nhwc: np.ndarray, context: np.ndarray, steps: int, warmup: int) -> dict:
    """Examples/s of a plain PyTorch AdamW loop on diffusers' UNet2DConditionModel."""
    import torch

    acp = torch.from_numpy(_alphas_cumprod())
    x0 = torch.from_numpy(latents_nhwc.transpose(0, 3, 1, 2).copy())
    ctx = torch.from_numpy(context)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=1e-8)
    gen = torch.Generator().manual_seed(0)
    model.train()
    b = x0.shape[0]

    def step():
        t = torch.randint(0, acp.shape[0], (b,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(b, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(model(noisy, t, ctx).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    dt = time.perf_counter() - t0
    return {"examples_per_s": b * steps / dt, "step_ms": 1e3 * dt / steps, "warmup_s": warm,
            "loss": float(loss.detach())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny UNet, batch 2, 3 timed steps (smoke test)")
    ap.add_argument("--batch", type=int, help="examples per step (default 8; 2 with --quick)")
    ap.add_argument("--steps", type=int, help="timed steps per side (default 10; 3 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    runtime.configure()  # process-wide XLA settings, before JAX starts
    import jax
    import torch

    config = QUICK_UNET if args.quick else UNET
    batch = args.batch or (2 if args.quick else 8)
    steps = args.steps or (3 if args.quick else 10)
    warmup = 2
    size = config["sample_size"]
    rng = np.random.default_rng(args.seed)
    latents = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    context = rng.standard_normal((batch, 77, config["cross_attention_dim"])).astype(np.float32)

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, jax {jax.__version__} on "
          f"{jax.devices()[0].platform} x{jax.device_count()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"# UNet {config['block_out_channels']} x{config['layers_per_block']}, batch {batch}, "
          f"{size}x{size}x4 latents ({size * 8}px), fp32, {steps} timed steps after {warmup} warm-up")
    model = _torch_unet(config, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)  # both sides train the same weights
        ours = bench_sdjax(folder, latents, context, steps, warmup)
    theirs = bench_torch(model, latents, context, steps, warmup)
    for name, r in (("sdjax jitted train step", ours), ("torch AdamW loop (diffusers UNet)", theirs)):
        print(f"{name}: {r['examples_per_s']:.2f} examples/s  ({r['step_ms']:.1f} ms/step, "
              f"warm-up {r['warmup_s']:.1f} s, last loss {r['loss']:.4f})")
    ratio = ours["examples_per_s"] / theirs["examples_per_s"]
    print(f"ratio sdjax/torch: {ratio:.2f}x")
    return 0 if all(math.isfinite(r["examples_per_s"]) for r in (ours, theirs)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
