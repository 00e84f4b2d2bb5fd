"""Weight memory of SD 1.5 and SDXL (base, refiner) from the reference configs, and the FLOPs of
one 1024 px SDXL step, computed abstractly (no weights allocated, nothing run).

    python scripts/sdxl_memory.py [--out bench_results/sdxl_memory_DATE.md] [--no-flops]

Parameter counts come from sdjax's own models built with `nnx.eval_shape`; bytes per device are
parameters x bytes per element, whole per device when replicated, divided by N with FSDP over N
devices (`--fsdp N`: sdjax shards the UNet's and VAE's large parameters over the fsdp axis; the
few small ones it replicates are ignored here). Activations and compilation temporaries are not included. The FLOP
count is XLA's cost analysis of one classifier-free-guided UNet evaluation (batch 2) at 128x128
latents, lowered for the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402
from sdjax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from sdjax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from sdjax.weights.diffusers import abstract_model  # noqa: E402

PARTS = {
    "text_encoder": (CLIPTextConfig, CLIPTextModel),
    "text_encoder_2": (CLIPTextConfig, CLIPTextModelWithProjection),
    "unet": (UNetConfig, UNet2DConditionModel),
    "vae": (VAEConfig, AutoencoderKL),
}
MODELS = {"SD 1.5": "sd15", "SDXL base": "sdxl-base", "SDXL refiner": "sdxl-refiner"}


def count(ref: Path, part: str) -> int:
    cfg_cls, model_cls = PARTS[part]
    cfg = cfg_cls.from_dict(json.loads((ref / part / "config.json").read_text()))
    model = abstract_model(model_cls, cfg)
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model)))


def unet_step_flops(ref: Path, latent: int = 128) -> float:
    """XLA's FLOP count of one CFG UNet evaluation (batch 2) on latent x latent latents."""
    cfg = UNetConfig.from_dict(json.loads((ref / "unet" / "config.json").read_text()))
    graphdef, state = nnx.split(abstract_model(UNet2DConditionModel, cfg, jnp.bfloat16))
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim

    def step(state, x, t, ctx, te, ids):
        return nnx.merge(graphdef, state)(x, t, ctx, text_embeds=te, time_ids=ids)

    args = (jax.ShapeDtypeStruct((2, latent, latent, 4), jnp.bfloat16), jax.ShapeDtypeStruct((2,), jnp.float32),
            jax.ShapeDtypeStruct((2, 77, cfg.cross_attention_dim[0]), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, pooled), jnp.bfloat16), jax.ShapeDtypeStruct((2, 6), jnp.float32))
    cost = jax.jit(step).lower(state, *args).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench_results" / f"sdxl_memory_{datetime.date.today()}.md"))
    ap.add_argument("--no-flops", action="store_true", help="skip the (slow) FLOP count")
    args = ap.parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# sdjax weight memory from the reference configs, {now:%Y-%m-%d %H:%M} UTC",
             "# computed by scripts/sdxl_memory.py (abstract models: parameter counts x bytes; no activations)", ""]
    lines += ["| model | part | parameters (M) |", "|---|---|---|"]
    totals, parts = {}, {}
    for label, name in MODELS.items():
        ref = ROOT / "reference" / name
        total = 0
        for part in PARTS:
            if (ref / part / "config.json").is_file():
                n = count(ref, part)
                parts.setdefault(label, {})[part] = n
                total += n
                lines.append(f"| {label} | {part} | {n / 1e6:.1f} |")
        totals[label] = total
        lines.append(f"| {label} | all | {total / 1e6:.1f} |")
    lines += ["", "Weights per device, GiB (bfloat16 = 2 bytes, float32 = 4 bytes per parameter). `Generator` places",
              "the UNet and VAE on the device mesh (replicated, or sharded with --fsdp N); the text encoders",
              "run once per request on the default device and are counted apart:", "",
              "| model | all, float32 | all, bfloat16 | UNet+VAE bf16 replicated | UNet+VAE bf16 FSDP over 4 | "
              "UNet+VAE bf16 FSDP over 8 | text encoders bf16 (one device) |",
              "|---|---|---|---|---|---|---|"]
    gib = 2**30
    for label, total in totals.items():
        dev = parts[label]["unet"] + parts[label]["vae"]
        te = total - dev
        lines.append(f"| {label} | {total * 4 / gib:.2f} GiB | {total * 2 / gib:.2f} GiB | {dev * 2 / gib:.2f} GiB | "
                     f"{dev * 2 / 4 / gib:.2f} GiB | {dev * 2 / 8 / gib:.2f} GiB | {te * 2 / gib:.2f} GiB |")
    lines.append("")
    if not args.no_flops:
        flops = unet_step_flops(ROOT / "reference" / "sdxl-base")
        lines.append(f"SDXL base UNet, one 1024x1024 step with CFG (batch 2, 128x128 latents): "
                     f"{flops / 1e12:.1f} TFLOP (XLA cost analysis).")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
