"""Everything between a loaded model and images.

    load.py        `load_pipeline`, `Pipeline` (a checkpoint folder or file -> the loaded parts)
    components.py  `TextEncoder`, `UNet`, `VAE`: a model as (graphdef, state, config, apply)
    request.py     `Request`: txt2img / img2img / inpaint as frozen data, validated once; `Limits`
    generator.py   `Generator`: a Request -> images (prompts, seeds, init images, PNG parameters)
    inputs.py      `Inputs`: the traced inputs of the compiled function, one typed pytree
    core.py        the compiled function: noise, guided denoiser, ControlNet hook, scan, decode
    hires.py       A1111's hires fix: first pass, latent or pixel upscale, img2img second pass
    inpaint.py     img2img / inpaint / outpaint preparation on the host (masks, crops, paste back)
    control.py     ControlNet: loading, control images, per-step scales, `ControlNetUnit`
    canny.py       Canny edges in numpy (the "canny" preprocessor)
    networks.py    LoRA and textual-inversion embeddings applied for one call
    batch.py       prompts-file runs: planning, file names, manifests, resuming
    xyz.py         X/Y/Z plots: A1111 axes -> cells -> batched calls -> labelled grids
    preview.py     live previews: A1111 "Approx cheap" / TAESD from each step's x0
    combine.py     several Requests as one batch and the result split back (the server)
"""

from sdjax.pipeline.components import VAE, Component, TextEncoder, UNet
from sdjax.pipeline.load import Pipeline, load_pipeline
from sdjax.pipeline.request import HiresFix

__all__ = ["Component", "HiresFix", "Pipeline", "TextEncoder", "UNet", "VAE", "load_pipeline"]
