"""`load_pipeline`: a diffusers checkpoint folder -> tokenizer, text encoder, UNet, VAE.

Each model component is a small object holding

    graphdef   the NNX graph definition (static structure)
    state      the weights pytree (an `nnx.State` of jax Arrays; `jax.tree.leaves(c.state)`)
    config     the model's config dataclass
    apply      a jitted pure function `apply(state, *inputs)` (`nnx.merge` inside `jax.jit`)

and `component(*inputs)` is `component.apply(component.state, *inputs)`. Use
`apply` with your own state (a fine-tuned copy, sharded weights, LoRA-merged
weights) inside your own jitted code; nothing in it closes over the weights.

    pipe = sdjax.load_pipeline("path/to/stable-diffusion-v1-5", dtype="bfloat16")
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="np").input_ids
    context = pipe.text_encoder(ids)                       # (B, 77, D)
    eps = pipe.unet(latents_nhwc, timesteps, context)      # (B, h, w, 4)
    images = pipe.vae.decode(latents_nhwc / pipe.vae.scaling_factor)   # (B, 8h, 8w, 3) in [-1, 1]
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.errors import ConfigError
from sdjax.models.kernels import Kernels
from sdjax.models.layers import apply_kernels
from sdjax.weights import diffusers as diffusers_folder

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def _pure(graphdef: nnx.GraphDef, method: str) -> Callable[..., Any]:
    """`fn(state, *args, **kwargs)`: rebuild the module from `state` and call `method` on it."""

    def fn(state, *args, **kwargs):
        model = nnx.merge(graphdef, state)
        return getattr(model, method)(*args, **kwargs)

    fn.__name__ = f"apply_{method.strip('_') or 'call'}"
    return fn


@functools.lru_cache(maxsize=64)
def jitted(graphdef: nnx.GraphDef, method: str = "__call__",
           static_argnames: tuple[str, ...] = ()) -> Callable[..., Any]:
    """The jitted pure function for (graphdef, method), shared by equal graphdefs.

    GraphDefs of models with the same config and dtype compare equal, so loading
    the same architecture again (another checkpoint, a reload) reuses the compiled code.
    """
    return jax.jit(_pure(graphdef, method), static_argnames=static_argnames)


class Component:
    """A model as (graphdef, state, config) plus `apply(state, *inputs)`, jitted.

    `apply` is the model's `__call__` as a pure function of the weights; `state`
    is the weights pytree; `nnx.merge(c.graphdef, c.state)` gives the NNX module back.
    """

    def __init__(self, model: nnx.Module, config: Any, source: Path | None = None, kernels: Kernels | None = None):
        if kernels is not None:
            apply_kernels(model, kernels)
        self.graphdef, self.state = nnx.split(model)
        self.config = config
        self.source = source
        self.kernels = kernels
        self.apply = jitted(self.graphdef)

    def module(self) -> nnx.Module:
        """The NNX module with this component's weights (shares the arrays)."""
        return nnx.merge(self.graphdef, self.state)

    def __call__(self, *inputs, **kwargs):
        return self.apply(self.state, *inputs, **kwargs)

    def __repr__(self) -> str:
        n = sum(x.size for x in jax.tree.leaves(self.state))
        return f"{type(self).__name__}({n / 1e6:.1f}M parameters, config={self.config!r:.120})"


class TextEncoder(Component):
    """CLIP text encoder. `apply(state, input_ids, output_hidden_states=False) -> CLIPTextOutput`
    (`output_hidden_states` is static). input_ids: (B, L) int, L <= 77."""

    def __init__(self, model, config, source=None, kernels=None):
        super().__init__(model, config, source, kernels)
        self.apply = jitted(self.graphdef, "__call__", ("output_hidden_states",))

    def __call__(self, input_ids, *, output_hidden_states: bool = False):
        """(B, L) token ids -> last hidden state (B, L, D) after the final layer norm; with
        `output_hidden_states=True`, the whole `CLIPTextOutput` (last_hidden_state,
        pooled_output, hidden_states: embeddings + every layer, before the final norm)."""
        out = self.apply(self.state, jnp.asarray(input_ids, jnp.int32), output_hidden_states=output_hidden_states)
        return out if output_hidden_states else out.last_hidden_state


class UNet(Component):
    """UNet2DConditionModel. `apply(state, latents_nhwc, timesteps, context, down_residuals=None,
    mid_residual=None)` -> model output (B, h, w, out_channels): eps or v, per the scheduler config."""

    def __call__(self, latents_nhwc, timesteps, context, *, down_residuals=None, mid_residual=None):
        """latents (B, h, w, C), timesteps scalar or (B,) in [0, 1000), context (B, L, D) -> NHWC."""
        if down_residuals is None and mid_residual is None:
            # Same call signature as `apply(state, x, t, c)`, so both share one compilation.
            return self.apply(self.state, latents_nhwc, timesteps, context)
        return self.apply(self.state, latents_nhwc, timesteps, context,
                          down_residuals=down_residuals, mid_residual=mid_residual)


class VAE(Component):
    """AutoencoderKL. `apply(state, images)` reconstructs; `apply_encode(state, images_nhwc)`
    -> (mean, logvar) and `apply_decode(state, latents_nhwc)` -> images are the pure halves.
    Latents are unscaled: multiply by `scaling_factor` after encoding, divide before decoding."""

    def __init__(self, model, config, source=None, kernels=None):
        super().__init__(model, config, source, kernels)
        self.apply_encode = jitted(self.graphdef, "encode")
        self.apply_decode = jitted(self.graphdef, "decode")

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    def encode(self, images_nhwc):
        """Images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/8, W/8, 4), unscaled."""
        return self.apply_encode(self.state, images_nhwc)

    def decode(self, latents_nhwc):
        """Unscaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3), nominally in [-1, 1]."""
        return self.apply_decode(self.state, latents_nhwc)


class Pipeline:
    """The loaded parts of a Stable Diffusion checkpoint.

    Attributes: `tokenizer` (transformers CLIPTokenizer), `text_encoder`, `unet`,
    `vae` (Components, see the module docstring), `scheduler_config` (dict from
    scheduler/scheduler_config.json), `model_index` (dict), `model_dir` (Path),
    `dtype` (jnp.dtype of the weights and of the computation), `kernels`
    (`sdjax.models.kernels.Kernels`: the attention and conv implementations its models use).
    """

    def __init__(self, *, model_dir: Path, dtype, tokenizer, text_encoder: TextEncoder, unet: UNet,
                 vae: VAE, scheduler_config: dict, model_index: dict, kernels: Kernels | None = None):
        self.kernels = kernels
        self.model_dir = model_dir
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.model_index = model_index

    def use_kernels(self, attention: str | None = None, conv: str | None = None, *,
                    kernels: Kernels | None = None) -> "Pipeline":
        """Switch the attention / conv implementations of all three models (names from
        `sdjax.models.kernels.ATTENTION` / `CONV`; None keeps the current choice), or set a whole
        `Kernels` value. The weights are shared, not copied; the next call compiles for the new
        choice. Returns self."""
        current = self.kernels or Kernels.resolve()
        self.kernels = kernels or Kernels(attention=attention or current.attention, conv=conv or current.conv,
                                          backend=current.backend)
        for name in ("text_encoder", "unet", "vae"):
            c = getattr(self, name)
            setattr(self, name, type(c)(c.module(), c.config, c.source, self.kernels))
        return self

    def states(self) -> dict[str, Any]:
        """{'text_encoder': state, 'unet': state, 'vae': state}: all weights as one pytree."""
        return {"text_encoder": self.text_encoder.state, "unet": self.unet.state, "vae": self.vae.state}

    def __repr__(self) -> str:
        return f"Pipeline({str(self.model_dir)!r}, dtype={self.dtype})"

    def generate(self, prompt, negative_prompt="", steps=20, sampler="dpmpp_2m", schedule="karras",
                 cfg_scale=7.0, seed=0, width=None, height=None, batch_size=None, init_image=None,
                 strength=0.75, mask=None, noise=None, **options):
        """txt2img, img2img (`init_image`) or inpainting (`init_image` + `mask`, white = repaint).

        Returns `sdjax.generate.GenerationResult`: `.images` (PIL), `.latents` (B, H/8, W/8, C)
        float32 scaled, `.infotexts` (A1111 parameters), `.seeds`. `prompt` may be a list (one
        image per prompt unless `batch_size` says otherwise). width/height default to the
        init image's size, else the model's own (unet sample_size x 8: 512 for SD 1.5). `noise`: explicit unit-variance latents (B, H/8, W/8, C),
        scaled by the first sigma. Other options (subseed, subseed_strength, clip_skip, mask_blur,
        inpainting_fill, inpaint_full_res, inpaint_full_res_padding, paste_back, sigmas,
        timestep_mode, progress, eta, ...): see `sdjax.generate.generate`.
        LoRA: `<lora:NAME:M>` prompt tags resolved in `lora_dir`, `loras=[path or "PATH:M" or (path, M)]`,
        `lora_strict=False` to warn on unmatched keys; embeddings: `embeddings=[paths]`,
        `embeddings_dir=...` (`sdjax.networks`). ControlNet: `controlnets=[sdjax.control.ControlNetUnit(
        model, image, scale, start, end, preprocessor, ...)]` (`sdjax.control`).
        """
        from sdjax.generate import generate

        return generate(self, prompt, negative_prompt, steps, sampler, schedule, cfg_scale, seed, width,
                        height, batch_size, init_image, strength, mask, noise, **options)

    def outpaint(self, image, prompt, *, left=0, right=0, up=0, down=0, overlap=8, **options):
        """Extend `image` by the given pixels per side and inpaint the new area
        (`sdjax.tasks.outpaint_canvas`, masked content "fill", strength 1 by default)."""
        from sdjax.tasks import outpaint_canvas

        canvas, mask = outpaint_canvas(image, left=left, right=right, up=up, down=down, overlap=overlap)
        options.setdefault("inpainting_fill", "fill")
        options.setdefault("strength", 1.0)
        return self.generate(prompt, init_image=canvas, mask=mask, **options)


def _check_dtype(dtype) -> jnp.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d.name not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    return d


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
    """Load a diffusers-format Stable Diffusion 1.x/2.x checkpoint folder, or a single file.

    A `.safetensors` / `.ckpt` single file (original LDM layout, as A1111 and ComfyUI
    use) is read by `sdjax.weights.single_file`; for it only, `prediction_type`
    ("epsilon" / "v_prediction") overrides detection and `config_dir` (a diffusers
    folder) replaces the shipped SD1/SD2 configs. `model_dir` is then the file.

    path: folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/ (safety_checker/ and feature_extractor/ are ignored). Weights may be
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
    dtype = _check_dtype(dtype)
    kernels = Kernels.resolve(attention, conv)
    if model_dir.is_file():
        return _load_single_file(model_dir, dtype, sharding, prediction_type, config_dir, kernels)
    index = diffusers_folder.read_model_index(model_dir)
    kw = dict(dtype=dtype, variant=variant, sharding=sharding)
    parts = {}
    for kind, cls in (("text_encoder", TextEncoder), ("unet", UNet), ("vae", VAE)):
        model, config = diffusers_folder.load_model(kind, model_dir / kind, **kw)
        parts[kind] = cls(model, config, model_dir / kind, kernels)
        del model
    return Pipeline(
        model_dir=model_dir,
        dtype=dtype,
        kernels=kernels,
        tokenizer=diffusers_folder.load_tokenizer(model_dir / "tokenizer"),
        scheduler_config=diffusers_folder.read_scheduler_config(model_dir / "scheduler"),
        model_index=index,
        **parts,
    )


# --- single-file checkpoints (.safetensors / .ckpt in the original LDM layout) -------------------


def _load_single_file(path: Path, dtype, sharding, prediction_type, config_dir, kernels) -> Pipeline:
    """A single-file SD1/SD2 checkpoint -> Pipeline; see `sdjax.weights.single_file`."""
    from sdjax.weights.single_file import load_single_file_models

    loaded = load_single_file_models(path, dtype=dtype, sharding=sharding, prediction_type=prediction_type,
                                     config_dir=config_dir)
    parts = {kind: cls(*loaded.pop(kind), path, kernels)
             for kind, cls in (("text_encoder", TextEncoder), ("unet", UNet), ("vae", VAE))}
    return Pipeline(model_dir=path, dtype=dtype, kernels=kernels, tokenizer=loaded["tokenizer"],
                    scheduler_config=loaded["scheduler_config"], model_index=loaded["model_index"], **parts)
