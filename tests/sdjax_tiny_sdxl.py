"""Tiny random SDXL folders for the single-file, convert and network tests (test helper).

The two text encoders have different widths (CLIP-L 32, bigG 48 with a 40-wide projection): diffusers'
`from_single_file` tells the encoders apart by width, and a transposed `text_projection` must not
fit by accident.
"""

import json
import shutil
from pathlib import Path

import torch

from conftest import reference
from sdjax_tiny import perturb, tiny_configs, tiny_sdxl_configs

BIGG_WIDTH, BIGG_PROJECTION = 48, 40


def tiny_sdxl_file_configs(ref_name: str = "sdxl-base", in_channels: int = 4, vae_levels: int = 2) -> dict:
    cfgs = tiny_sdxl_configs(ref_name, in_channels)
    cfgs["text_encoder_2"].update(hidden_size=BIGG_WIDTH, intermediate_size=52, projection_dim=BIGG_PROJECTION)
    n_ids = 5 if ref_name == "sdxl-refiner" else 6
    cfgs["unet"].update(cross_attention_dim=BIGG_WIDTH + (32 if "text_encoder" in cfgs else 0),
                        projection_class_embeddings_input_dim=BIGG_PROJECTION + n_ids * 8)
    cfgs["vae"] = tiny_configs(reference("sd15"), vae_levels=vae_levels)["vae"]
    cfgs["vae"]["scaling_factor"] = 0.13025
    return cfgs


def build_sdxl_file_pipeline(ref_name: str = "sdxl-base", seed: int = 0, in_channels: int = 4, vae_levels: int = 2):
    """A diffusers StableDiffusionXL(Img2Img|Inpaint)Pipeline with the configs above and random weights."""
    import diffusers
    import transformers

    ref = reference(ref_name)
    cfgs = tiny_sdxl_file_configs(ref_name, in_channels, vae_levels)
    torch.manual_seed(seed)
    parts = {}
    for i, name in enumerate(("text_encoder", "text_encoder_2")):
        tok = "tokenizer" + name.removeprefix("text_encoder")
        if name not in cfgs:
            parts[name] = parts[tok] = None
            continue
        cfg = {k: v for k, v in cfgs[name].items() if not k.startswith("_")}
        cls = transformers.CLIPTextModel if name == "text_encoder" else transformers.CLIPTextModelWithProjection
        parts[name] = perturb(cls(transformers.CLIPTextConfig(**cfg)), seed + 10 + i)
        parts[tok] = transformers.CLIPTokenizer.from_pretrained(ref / tok)
    parts["unet"] = perturb(diffusers.UNet2DConditionModel.from_config(cfgs["unet"]), seed + 1)
    parts["vae"] = perturb(diffusers.AutoencoderKL.from_config(cfgs["vae"]), seed + 2)
    sched_cfg = json.loads((ref / "scheduler" / "scheduler_config.json").read_text())
    parts["scheduler"] = diffusers.EulerDiscreteScheduler.from_config(sched_cfg)
    if ref_name == "sdxl-refiner":
        return diffusers.StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True,
                                                          force_zeros_for_empty_prompt=False, add_watermarker=False)
    cls = diffusers.StableDiffusionXLInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionXLPipeline
    return cls(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)


def write_sdxl_folder(folder: Path, ref_name: str = "sdxl-base", seed: int = 0, in_channels: int = 4,
                      vae_levels: int = 2) -> Path:
    """Save a tiny random SDXL pipeline as a diffusers folder (tokenizers copied from the reference)."""
    pipe = build_sdxl_file_pipeline(ref_name, seed, in_channels, vae_levels)
    pipe.save_pretrained(folder)
    for tok in ("tokenizer", "tokenizer_2"):
        if (reference(ref_name) / tok).is_dir():
            shutil.rmtree(folder / tok, ignore_errors=True)
            shutil.copytree(reference(ref_name) / tok, folder / tok)
    return folder
