"""A freshly initialised Stable Diffusion folder, for training from scratch.

Random weights are what training from scratch starts from, so here (and only here)
models are built with real initialisers; they are written as a diffusers folder
that `load_pipeline` and diffusers both read.
"""

from __future__ import annotations

from pathlib import Path
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.weights import export
from sdjax.weights.mapping import export_state


def init_pipeline_folder(out_dir: str | Path, spec: dict, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """Write a diffusers folder with randomly initialised text encoder, VAE and UNet.

    spec: {"text_encoder": transformers CLIPTextConfig dict (vocab size and special token ids
    are taken from the tokenizer), "vae": AutoencoderKL config dict, "unet":
    UNet2DConditionModel config dict, "scheduler": scheduler config dict}.
    """
    from flax import nnx
    from transformers import CLIPTokenizer


    out_dir = Path(out_dir)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    te = dict(spec["text_encoder"], vocab_size=len(tok), bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    models = {
        "text_encoder": (CLIPTextModel, CLIPTextConfig, te),
        "vae": (AutoencoderKL, VAEConfig, spec["vae"]),
        "unet": (UNet2DConditionModel, UNetConfig, spec["unet"]),
    }
    for i, (name, (cls, cfg_cls, d)) in enumerate(models.items()):
        model = cls(cfg_cls.from_dict(d), rngs=nnx.Rngs(seed + i))
        export.save_component(out_dir, name, export_state(model), d)
    export.copy_tokenizer(tokenizer_dir, out_dir)
    export.save_scheduler(out_dir, spec["scheduler"])
    export.save_model_index(out_dir, ["unet", "text_encoder", "vae", "tokenizer", "scheduler"],
                            scheduler_class=spec["scheduler"].get("_class_name", "EulerDiscreteScheduler"))
    return out_dir
