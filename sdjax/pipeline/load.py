"""`load_pipeline`: a diffusers checkpoint folder or a single file -> a `Pipeline`.

    pipe = sdjax.load_pipeline("path/to/stable-diffusion-v1-5", dtype="bfloat16")
    result = pipe.generate("a cat", steps=20, seed=1)          # `sdjax.pipeline.generator`

The components (`TextEncoder`, `UNet`, `VAE`) are in `sdjax.pipeline.components`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import jax

from sdjax.errors import CheckpointError
from sdjax.models.kernels import Kernels
from sdjax.pipeline.components import VAE, TextEncoder, UNet, check_dtype
from sdjax.pipeline.generator import GenerationResult, Generator
from sdjax.pipeline.inpaint import outpaint_canvas
from sdjax.pipeline.request import Request
from sdjax.weights import diffusers as diffusers_folder
from sdjax.weights.single_file import load_single_file_models

class Pipeline:
    """The loaded parts of a Stable Diffusion checkpoint (SD 1.x / 2.x, SDXL base or refiner).

    Attributes: `tokenizer` (transformers CLIPTokenizer), `text_encoder`, `unet`,
    `vae` (Components, see the module docstring); SDXL also `tokenizer_2` and `text_encoder_2`
    (CLIPTextModelWithProjection, OpenCLIP bigG) -- the refiner has only these (its
    `tokenizer` and `text_encoder` are None); `family` ("sd", "sdxl" or "sdxl-refiner");
    `force_zeros_for_empty_prompt` (SDXL: an empty negative prompt is zeros, from
    model_index.json); `scheduler_config` (dict from
    scheduler/scheduler_config.json), `model_index` (dict), `model_dir` (Path),
    `dtype` (jnp.dtype of the weights and of the computation), `kernels`
    (`sdjax.models.kernels.Kernels`: the attention and conv implementations its models use).
    """

    def __init__(self, *, model_dir: Path, dtype, tokenizer, text_encoder: TextEncoder | None, unet: UNet,
                 vae: VAE, scheduler_config: dict, model_index: dict, kernels: Kernels | None = None,
                 tokenizer_2=None, text_encoder_2: TextEncoder | None = None, family: str = "sd"):
        self.kernels = kernels
        self.family = family
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.force_zeros_for_empty_prompt = family != "sd" and bool(model_index.get("force_zeros_for_empty_prompt",
                                                                                     family == "sdxl"))
        self.model_dir = model_dir
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.model_index = model_index
        self.generator = Generator(self)  # what generation keeps between calls (its caches)

    # Read by tests written before the Generator owned these (they were attributes set on the pipeline).
    @property
    def _sdjax_placed(self):
        return self.generator.placed

    @property
    def _sdjax_discrete_model(self):
        return self.generator.discrete_model

    def use_kernels(self, attention: str | None = None, conv: str | None = None, *,
                    kernels: Kernels | None = None) -> "Pipeline":
        """Switch the attention / conv implementations of all three models (names from
        `sdjax.models.kernels.ATTENTION` / `CONV`; None keeps the current choice), or set a whole
        `Kernels` value. The weights are shared, not copied; the next call compiles for the new
        choice. Returns self."""
        current = self.kernels or Kernels.resolve()
        self.kernels = kernels or Kernels(attention=attention or current.attention, conv=conv or current.conv,
                                          backend=current.backend)
        for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
            c = getattr(self, name)
            if c is not None:
                setattr(self, name, type(c)(c.module(), c.config, c.source, self.kernels))
        return self

    def states(self) -> dict[str, Any]:
        """{'text_encoder': state, 'unet': state, 'vae': state} (SDXL: also 'text_encoder_2'; the refiner
        has no 'text_encoder'): all weights as one pytree."""
        parts = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2, "unet": self.unet,
                 "vae": self.vae}
        return {k: c.state for k, c in parts.items() if c is not None}

    def __repr__(self) -> str:
        family = "" if self.family == "sd" else f", family={self.family!r}"
        return f"Pipeline({str(self.model_dir)!r}, dtype={self.dtype}{family})"

    # Options of a call that say how to run it, not what to make (`Generator.generate`).
    _RUN_OPTIONS = ("progress", "preview", "record_control", "devices", "fsdp", "mesh")

    def generate(self, prompt, negative_prompt="", steps=20, sampler="dpmpp_2m", schedule="karras",
                 cfg_scale=7.0, seed=0, width=None, height=None, batch_size=None, init_image=None,
                 strength=0.75, mask=None, noise=None, **options) -> GenerationResult:
        """txt2img, img2img (`init_image`) or inpainting (`init_image` + `mask`, white = repaint).

        Returns `sdjax.pipeline.generator.GenerationResult`: `.images` (PIL), `.latents` (B, H/8, W/8, C)
        float32 scaled, `.infotexts` (A1111 parameters), `.seeds`. `prompt` may be a list (one
        image per prompt unless `batch_size` says otherwise). width/height default to the
        init image's size, else the model's own (unet sample_size x 8: 512 for SD 1.5). `noise`: explicit unit-variance latents (B, H/8, W/8, C),
        scaled by the first sigma. Other options: the fields of `sdjax.pipeline.request.Request`
        (subseed, subseed_strength, clip_skip, mask_blur, inpainting_fill, inpaint_full_res,
        inpaint_full_res_padding, paste_back, sigmas, timestep_mode, extra_params, limits, ...),
        sampler knobs (eta, s_noise, s_churn, s_tmin, s_tmax, r, order, ...), and how to run it:
        progress, preview, record_control, devices, fsdp, mesh (`sdjax.pipeline.generator.Generator.generate`).
        Every value is checked once, by `Request` (limits: `sdjax.pipeline.request.Limits`).
        LoRA: `<lora:NAME:M>` prompt tags resolved in `lora_dir`, `loras=[path or "PATH:M" or (path, M)]`,
        `lora_strict=False` to warn on unmatched keys; embeddings: `embeddings=[paths]`,
        `embeddings_dir=...` (`sdjax.pipeline.networks`). ControlNet: `controlnets=[sdjax.pipeline.control.ControlNetUnit(
        model, image, scale, start, end, preprocessor, ...)]` (`sdjax.pipeline.control`).
        SDXL: original_size, crops_coords_top_left, target_size (and negative_ forms),
        aesthetic_score / negative_aesthetic_score (refiner), refiner=<loaded refiner Pipeline> with
        refiner_switch_at (`sdjax.pipeline.sdxl`).
        """
        run = {k: options.pop(k) for k in self._RUN_OPTIONS if k in options}
        fields = {f.name for f in dataclasses.fields(Request)} - {"knobs"}
        request_options = {k: options.pop(k) for k in list(options) if k in fields}
        request = Request(prompt, negative_prompt, steps, sampler, schedule, cfg_scale, seed, width, height,
                          batch_size, init_image, strength, mask, noise, knobs=options, **request_options)
        return self.generator.generate(request, **run)

    def outpaint(self, image, prompt, *, left=0, right=0, up=0, down=0, overlap=8, **options):
        """Extend `image` by the given pixels per side and inpaint the new area
        (`sdjax.pipeline.inpaint.outpaint_canvas`, masked content "fill", strength 1 by default)."""
        canvas, mask = outpaint_canvas(image, left=left, right=right, up=up, down=down, overlap=overlap)
        options.setdefault("inpainting_fill", "fill")
        options.setdefault("strength", 1.0)
        return self.generate(prompt, init_image=canvas, mask=mask, **options)


def load_pipeline(
    path: str | os.PathLike,
    dtype: Any = "float32",
    *,
    variant: str | None = None,
    sharding: Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None = None,
    prediction_type: str | None = None,
    config_dir: str | os.PathLike | None = None,
    attention: str | None = None,
    conv: str | None = None,
) -> Pipeline:
    """Load a diffusers-format Stable Diffusion 1.x/2.x or SDXL (base or refiner) folder, or a single file.

    A `.safetensors` / `.ckpt` single file (original LDM layout, as A1111 and ComfyUI
    use) is read by `sdjax.weights.single_file`; for it only, `prediction_type`
    ("epsilon" / "v_prediction") overrides detection and `config_dir` (a diffusers
    folder) replaces the shipped SD1/SD2/SDXL configs (SDXL base, inpainting or refiner single files
    are told apart from their tensors). `model_dir` is then the file.

    path: folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/ (safety_checker/ and feature_extractor/ are ignored); SDXL adds text_encoder_2/ and
    tokenizer_2/ (the refiner has only those two); which it is (`Pipeline.family`) is read from
    model_index.json and checked against the UNet's config. Weights may be
    safetensors, sharded safetensors, fp16 variants or PyTorch `.bin` files (read
    by a restricted unpickler: no code from the file runs; torch is not needed).
    dtype: "float32" or "bfloat16" ("float16" also accepted): the parameter and
    compute dtype of all three models; file values are cast once while loading.
    variant: e.g. "fp16" to read `*.fp16.safetensors` (a folder holding only one
    variant uses it without being asked). sharding: optional
    `(state path, abstract leaf) -> jax.sharding.Sharding` for every parameter;
    by default weights go to the default device.
    attention, conv: the implementations the models use (`sdjax.models.kernels`: attention
    "auto", "cudnn", "pallas", "xla", "chunked" or "softmax"; conv "auto", "xla" or "matmul");
    None reads SDJAX_ATTENTION / SDJAX_CONV, else "auto" (cuDNN flash attention on NVIDIA
    GPUs, Pallas flash attention on TPU, sdjax's chunked form on CPU).

    Raises KernelError (an implementation that does not exist or cannot run here), CheckpointError (folder, file or tensor problems, naming them) and
    ConfigError (a config value sdjax does not support, naming file, key and value).
    """
    model_dir = Path(path).expanduser()
    dtype = check_dtype(dtype)
    kernels = Kernels.resolve(attention, conv)
    if model_dir.is_file():
        return _load_single_file(model_dir, dtype, sharding, prediction_type, config_dir, kernels)
    index = diffusers_folder.read_model_index(model_dir)
    family = diffusers_folder.model_family(index)
    unet_config = diffusers_folder.read_config("unet", model_dir / "unet")
    sdxl_unet = unet_config.addition_embed_type == "text_time"
    if sdxl_unet != (family != "sd"):
        raise CheckpointError(f"{model_dir}: the UNet's addition_embed_type is {unet_config.addition_embed_type!r} "
                              f"but model_index.json describes {'an SDXL' if family != 'sd' else 'an SD 1.x / 2.x'} "
                              "pipeline (text_encoder_2 present or not); the folder mixes model families")
    kw = dict(dtype=dtype, variant=variant, sharding=sharding)
    encoders = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"),
                "sdxl-refiner": ("text_encoder_2",)}[family]
    parts: dict[str, Any] = {"text_encoder": None}
    for kind, cls in [(k, TextEncoder) for k in encoders] + [("unet", UNet), ("vae", VAE)]:
        model, config = diffusers_folder.load_model(kind, model_dir / kind, **kw)
        parts[kind] = cls(model, config, model_dir / kind, kernels)
        del model
    tokenizers = {"tokenizer" + kind.removeprefix("text_encoder"):
                  diffusers_folder.load_tokenizer(model_dir / ("tokenizer" + kind.removeprefix("text_encoder")))
                  for kind in encoders}
    return Pipeline(
        model_dir=model_dir,
        dtype=dtype,
        kernels=kernels,
        tokenizer=tokenizers.get("tokenizer"),
        tokenizer_2=tokenizers.get("tokenizer_2"),
        family=family,
        scheduler_config=diffusers_folder.read_scheduler_config(model_dir / "scheduler"),
        model_index=index,
        **parts,
    )


# --- single-file checkpoints (.safetensors / .ckpt in the original LDM layout) -------------------


def _load_single_file(path: Path, dtype, sharding, prediction_type, config_dir, kernels) -> Pipeline:
    """A single-file SD1/SD2/SDXL checkpoint -> Pipeline; see `sdjax.weights.single_file`."""
    loaded = load_single_file_models(path, dtype=dtype, sharding=sharding, prediction_type=prediction_type,
                                     config_dir=config_dir)
    parts = {kind: cls(*loaded[kind], path, kernels) if loaded.get(kind) is not None else None
             for kind, cls in (("text_encoder", TextEncoder), ("text_encoder_2", TextEncoder), ("unet", UNet),
                               ("vae", VAE))}
    return Pipeline(model_dir=path, dtype=dtype, kernels=kernels, tokenizer=loaded["tokenizer"],
                    tokenizer_2=loaded.get("tokenizer_2"), family=loaded["family"],
                    scheduler_config=loaded["scheduler_config"], model_index=loaded["model_index"], **parts)
