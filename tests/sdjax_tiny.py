"""Tiny random diffusers pipelines from the reference configs, saved to a folder (test helper).

The VAE keeps 4 blocks (a factor 8 between pixels and latents, as every SD VAE); everything
else is shrunk so a 64x64 image runs in well under a second on CPU.
"""

import json
import shutil
from pathlib import Path

import torch

from conftest import reference


def tiny_configs(ref: Path, vae_levels: int = 4) -> dict:
    """Text encoder, UNet and VAE configs of `ref` with the block structure kept and widths shrunk.

    vae_levels: 4 (a factor 8 between pixels and latents, as every SD VAE; 64 px) or 2 (factor 2,
    16 px: the fastest VAE that still has a downsampler and an upsampler).
    """
    te = json.loads((ref / "text_encoder" / "config.json").read_text())
    te.update(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              projection_dim=32)
    unet = json.loads((ref / "unet" / "config.json").read_text())
    heads = unet["attention_head_dim"]
    unet.update(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
                cross_attention_dim=32, norm_num_groups=8, sample_size=8,
                attention_head_dim=[2, 4] if isinstance(heads, list) else 4)
    vae = json.loads((ref / "vae" / "config.json").read_text())
    widths = {4: [16, 16, 32, 32], 2: [16, 32]}[vae_levels]
    vae.update(block_out_channels=widths, down_block_types=["DownEncoderBlock2D"] * vae_levels,
               up_block_types=["UpDecoderBlock2D"] * vae_levels, layers_per_block=1, norm_num_groups=8,
               sample_size=8 * 2 ** (vae_levels - 1))
    return {"text_encoder": te, "unet": unet, "vae": vae}


def perturb(model, seed: int, scale: float = 0.05):
    """`model` in eval mode with every parameter moved by scale x N(0, 1): default inits leave
    norms at 1/0 and some biases at 0, and a parity test must see every tensor matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def build_diffusers_pipeline(ref_name: str = "sd15", seed: int = 0, scheduler_overrides: dict | None = None):
    """A diffusers StableDiffusion(Inpaint)Pipeline with tiny random weights (no safety checker)."""
    import diffusers
    import transformers

    ref = reference(ref_name)
    cfgs = tiny_configs(ref)
    torch.manual_seed(seed)
    te_cfg = {k: v for k, v in cfgs["text_encoder"].items() if not k.startswith("_")}
    te = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**te_cfg)), seed)
    unet = perturb(diffusers.UNet2DConditionModel.from_config(cfgs["unet"]), seed + 1)
    vae = perturb(diffusers.AutoencoderKL.from_config(cfgs["vae"]), seed + 2)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(ref / "tokenizer")
    sched_cfg = json.loads((ref / "scheduler" / "scheduler_config.json").read_text())
    sched_cfg.update(scheduler_overrides or {})
    scheduler = diffusers.PNDMScheduler.from_config(sched_cfg)
    cls = (diffusers.StableDiffusionInpaintPipeline if cfgs["unet"]["in_channels"] == 9
           else diffusers.StableDiffusionPipeline)
    return cls(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_tiny_folder(folder: Path, ref_name: str = "sd15", seed: int = 0) -> Path:
    """Save a tiny random pipeline as a diffusers folder; returns the folder."""
    pipe = build_diffusers_pipeline(ref_name, seed)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "tokenizer", ignore_errors=True)
    shutil.copytree(reference(ref_name) / "tokenizer", folder / "tokenizer")
    return folder
