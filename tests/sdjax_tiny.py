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


def tiny_sdxl_configs(ref_name: str = "sdxl-base", in_channels: int = 4) -> dict:
    """Tiny configs of an SDXL reference folder (base or refiner): both (or the refiner's one) text
    encoders 32 wide with a 32-wide projection, a 2-level UNet keeping SDXL's structure (no attention
    in the first block, per-block transformer depths, linear projections, text_time conditioning with
    the reference's number of time ids), the 4-level VAE of `tiny_configs`."""
    ref = reference(ref_name)
    out = {}
    for name in ("text_encoder", "text_encoder_2"):
        if (ref / name / "config.json").is_file():
            te = json.loads((ref / name / "config.json").read_text())
            te.pop("torch_dtype", None)
            te.update(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      projection_dim=32)
            out[name] = te
    unet = json.loads((ref / "unet" / "config.json").read_text())
    full = unet["projection_class_embeddings_input_dim"]
    n_ids = (full - 1280) // unet["addition_time_embed_dim"]  # both real SDXL UNets pool 1280 wide
    unet.update(block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1, norm_num_groups=8,
                attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2], sample_size=8,
                cross_attention_dim=32 * len([k for k in out if k.startswith("text_encoder")]),
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + n_ids * 8,
                in_channels=in_channels)
    out["unet"] = unet
    out["vae"] = tiny_configs(reference("sd15"))["vae"]
    out["vae"]["scaling_factor"] = 0.13025
    return out


def build_sdxl_pipeline(ref_name: str = "sdxl-base", seed: int = 0, in_channels: int = 4, vae=None,
                        scheduler_overrides: dict | None = None):
    """A diffusers SDXL pipeline with tiny random weights: StableDiffusionXLPipeline (base),
    StableDiffusionXLInpaintPipeline (in_channels 9) or StableDiffusionXLImg2ImgPipeline (refiner,
    text_encoder_2 only, aesthetic-score time ids). `vae`: share another pipeline's VAE."""
    import diffusers
    import transformers

    ref = reference(ref_name)
    cfgs = tiny_sdxl_configs(ref_name, in_channels)
    torch.manual_seed(seed)
    parts = {}
    for i, name in enumerate(("text_encoder", "text_encoder_2")):
        if name in cfgs:
            cfg = {k: v for k, v in cfgs[name].items() if not k.startswith("_")}
            cls = transformers.CLIPTextModel if name == "text_encoder" else transformers.CLIPTextModelWithProjection
            parts[name] = perturb(cls(transformers.CLIPTextConfig(**cfg)), seed + 10 + i)
            tok = "tokenizer" + name.removeprefix("text_encoder")
            parts[tok] = transformers.CLIPTokenizer.from_pretrained(ref / tok)
        else:
            parts[name] = parts["tokenizer"] = None
    parts["unet"] = perturb(diffusers.UNet2DConditionModel.from_config(cfgs["unet"]), seed + 1)
    parts["vae"] = vae if vae is not None else perturb(diffusers.AutoencoderKL.from_config(cfgs["vae"]), seed + 2)
    sched_cfg = json.loads((ref / "scheduler" / "scheduler_config.json").read_text())
    sched_cfg.update(scheduler_overrides or {})
    parts["scheduler"] = diffusers.EulerDiscreteScheduler.from_config(sched_cfg)
    index = json.loads((ref / "model_index.json").read_text())
    if ref_name == "sdxl-refiner":
        return diffusers.StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True,
                                                          force_zeros_for_empty_prompt=False, add_watermarker=False)
    cls = diffusers.StableDiffusionXLInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionXLPipeline
    return cls(**parts, force_zeros_for_empty_prompt=index["force_zeros_for_empty_prompt"], add_watermarker=False)
