"""`generate(pipe, prompt, ...)`: txt2img, img2img and inpainting on a loaded `Pipeline`.

Host work (prompts, seeds, image preprocessing, PNG metadata) happens here; the math runs in
one jitted function per (shapes, sampler, task) from `sdjax.generation`. Seeds: image i of a
batch uses seed + i (and subseed + i), so a batch of 4 equals 4 batches of 1.
img2img as A1111: t_enc = int(min(strength, 0.999) * steps); sampling starts at sigma index
steps - t_enc - 1 from init_latents + noise * that sigma. strength is traced (no recompile).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax import generation, metadata, networks, prompts, sampling, tasks
from sdjax.images import to_pil
from sdjax.limits import Limits, check_request
from sdjax.errors import NonFiniteError, TaskError

# Sampler knobs that choose code paths: static in the compiled function.
_STATIC_KNOBS = ("order", "solver_type", "lower_order_final")


@dataclasses.dataclass
class GenerationResult:
    """images: PIL RGB images; latents: float32 numpy (B, H/8, W/8, C), the final scaled latents;
    infotexts: the A1111 parameters text of each image; seeds: the seed of each image."""

    images: list[Image.Image]
    latents: np.ndarray
    infotexts: list[str]
    seeds: list[int]


def _as_list(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise TaskError(f"{name} has {len(value)} entries but batch_size is {n}")
        return list(value)
    return [value] * n


def _model_hash(pipe) -> str | None:
    """A1111-style short hash (first 10 hex digits of SHA-256): of a single-file checkpoint, the
    whole file (A1111's "Model hash"); of a diffusers folder, the UNet weight file(s)."""
    cached = getattr(pipe, "_sdjax_model_hash", None)
    if cached is not None:
        return cached or None
    model_path = Path(pipe.model_dir)
    if model_path.is_file():  # a single-file checkpoint: A1111 hashes the whole file
        files = [model_path]
    else:
        files = sorted(p for p in (model_path / "unet").glob("*") if p.suffix in (".safetensors", ".bin"))
    if not files:
        pipe._sdjax_model_hash = ""
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    pipe._sdjax_model_hash = h.hexdigest()[:10]
    return pipe._sdjax_model_hash


def discrete_model(pipe) -> sampling.DiscreteModel:
    """The pipeline's noise table (cached on the pipeline)."""
    model = getattr(pipe, "_sdjax_discrete_model", None)
    if model is None:
        model = sampling.DiscreteModel.from_config(pipe.scheduler_config)
        pipe._sdjax_discrete_model = model
    return model


def encode_prompts(pipe, prompts_: Sequence[str], negatives: Sequence[str], clip_skip: int = 1, *,
                   tokenizer=None, te_state=None):
    """A1111 prompt encoding for a batch: cond, uncond float32 (B, n * 77, D).

    Each prompt is split into 75-token chunks with emphasis weights (`sdjax.prompts`),
    encoded chunk by chunk (clip skip N: final_layer_norm(hidden_states[-N])), re-weighted with
    A1111's mean restoration and joined along the sequence axis; all prompts and negative
    prompts of the batch are padded with empty-prompt chunks to the same chunk count.
    tokenizer, te_state: use these instead of the pipeline's (embeddings, LoRA-merged weights).
    """
    tok = pipe.tokenizer if tokenizer is None else tokenizer
    empty = prompts.tokenize_prompt(tok, "")
    # <lora:...> tags are applied to the weights by the caller, not encoded (A1111).
    tokens = {t: prompts.tokenize_prompt(tok, prompts.extract_lora_tags(t).prompt)
              for t in dict.fromkeys(list(prompts_) + list(negatives))}
    n = max(t.n_chunks for t in tokens.values())
    widest = prompts.PromptTokens(np.repeat(empty.ids, n, 0), np.repeat(empty.weights, n, 0))
    fn = generation.text_encoder_fn(pipe.text_encoder.graphdef)

    def encode_fn(ids, clip_skip):
        return fn(pipe.text_encoder.state if te_state is None else te_state, ids, clip_skip=clip_skip)

    encoded = {}
    for text, t in tokens.items():
        t, _ = prompts.pad_to_same_chunks(t, widest, empty)  # A1111 pad_cond_uncond, batch-wide
        encoded[text] = prompts.encode_prompt(encode_fn, t, clip_skip)
    cond = jnp.concatenate([encoded[t] for t in prompts_], axis=0)
    uncond = jnp.concatenate([encoded[t] for t in negatives], axis=0)
    return cond, uncond


def img2img_start(strength: float, steps: int) -> int:
    """A1111's first sigma index for `strength` (0, 1]: steps - int(min(strength, 0.999) * steps) - 1."""
    check_request(strength=strength)
    t_enc = int(min(float(strength), 0.999) * steps)
    return max(steps - t_enc - 1, 0)


# Inputs without a batch axis (replicated when the batch is sharded).
_UNBATCHED = ("sigmas", "start", "knobs", "fill_keep", "fill_noise", "control")


def _placed(pipe, inputs: dict, b: int, devices, fsdp, mesh, unet_state=None) -> tuple:
    """(unet_state, vae_state, inputs) for the jitted function: as they are on one device, or,
    with a mesh (`mesh`, or `sdjax.parallel.device_mesh(devices, fsdp)`), the batch padded to a
    multiple of the data x fsdp size and sharded over it, the weights replicated (fsdp=1) or
    FSDP-sharded. Sharded weights are cached on the pipeline per (weights, mesh, mode)."""
    from sdjax import parallel

    unet_state = pipe.unet.state if unet_state is None else unet_state  # LoRA-merged copy
    mesh = parallel.device_mesh(devices, fsdp) if mesh is None else mesh
    if mesh is None:
        return unet_state, pipe.vae.state, inputs
    mode = "fsdp" if mesh.shape["fsdp"] > 1 else "replicate"
    cached = getattr(pipe, "_sdjax_placed", None)
    if cached is None or cached[0] is not unet_state or cached[1] is not pipe.vae.state or cached[2] != (mesh, mode):
        states = parallel.shard_params((unet_state, pipe.vae.state), mesh, mode)
        cached = (unet_state, pipe.vae.state, (mesh, mode), states)
        pipe._sdjax_placed = cached
    return (*cached[3], parallel.shard_batch(inputs, mesh, b, unbatched=_UNBATCHED))


@functools.lru_cache(maxsize=8)
def _float32_decoder(vae_config, scaling_factor: float):
    """(graphdef, jit(decode(state, latents) -> images in [-1, 1])) of a float32 copy of the VAE."""
    from flax import nnx

    from sdjax.models.vae import AutoencoderKL
    from sdjax.weights.diffusers import abstract_model

    graphdef, _ = nnx.split(abstract_model(AutoencoderKL, vae_config, jnp.float32))

    def decode(state, latents):
        vae = nnx.merge(graphdef, state)
        return jnp.clip(vae.decode(latents / scaling_factor).astype(jnp.float32), -1.0, 1.0)

    return jax.jit(decode)


def finite_images(pipe, latents: np.ndarray, images: np.ndarray) -> np.ndarray:
    """`images` (B, H, W, 3) when finite; else decoded again from `latents` (scaled, as
    `generation.build` returns them) with a float32 copy of the VAE -- A1111's --no-half-vae
    fallback for half-precision VAEs that overflow -- with a warning. NonFiniteError when the
    latents themselves are not finite or the float32 decode is not finite either."""
    if np.isfinite(images).all():
        return images
    if not np.isfinite(latents).all():
        raise NonFiniteError("sampling produced NaN/inf latents (a NaN/inf weight, or a CFG scale or sampler "
                             "that diverges); try a lower --cfg-scale, another sampler or --dtype float32")
    state32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pipe.vae.state)
    if any(leaf.dtype != jnp.float32 for leaf in jax.tree.leaves(pipe.vae.state)):
        import warnings

        warnings.warn("the VAE decode produced NaN/inf values; decoding again in float32 (as A1111's "
                      "--no-half-vae)", RuntimeWarning, stacklevel=3)
        images = np.asarray(_float32_decoder(pipe.vae.config, pipe.vae.scaling_factor)(state32, latents))
        if np.isfinite(images).all():
            return images
    raise NonFiniteError("the VAE decode produced NaN/inf values even in float32: the VAE weights are broken "
                         "(check the model file) or the latents are out of its range")


def native_size(pipe) -> int:
    """The model's own resolution in pixels, as diffusers: unet sample_size x VAE downscale (512 for SD 1.5)."""
    size = pipe.unet.config.sample_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size or 64) * pipe.vae.config.downscale


def generate(
    pipe,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] = "",
    steps: int = 20,
    sampler: str = "dpmpp_2m",
    schedule: str | None = "karras",
    cfg_scale: float = 7.0,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    batch_size: int | None = None,
    init_image: Any = None,
    strength: float = 0.75,
    mask: Any = None,
    noise: Any = None,
    *,
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    clip_skip: int = 1,
    mask_blur: float = 4,
    inpainting_fill: str = "original",
    inpaint_full_res: bool = False,
    inpaint_full_res_padding: int = 32,
    paste_back: bool = True,
    sigmas: Any = None,
    timestep_mode: str = "continuous",
    progress: Callable[[int], None] | None = None,
    extra_params: dict | None = None,
    lora_dir: str | None = None,
    loras: Sequence[Any] | None = None,
    lora_strict: bool = True,
    embeddings: Sequence[Any] | None = None,
    embeddings_dir: str | None = None,
    controlnets: Sequence[Any] | None = None,
    record_control: bool = False,
    devices: int | str | None = None,
    fsdp: int | str = 1,
    mesh: Any = None,
    limits: Limits | None = None,
    **knobs,
) -> GenerationResult:
    """Generate `batch_size` images; see `Pipeline.generate` for the parameters.

    batch_size: default one image per prompt when `prompt` is a list (as diffusers), else 1.

    Devices: by default one device runs the whole batch. devices="all" (every local device)
    or N (the first N) splits the batch over them: B is padded to a multiple of the device
    count and trimmed, and every image equals the same seed made alone (to fp rounding).
    fsdp=K (dividing the device count; "all" = every one) shards the weights over K of them
    instead of replicating them. mesh: an explicit `sdjax.parallel.make_mesh` mesh instead.

    Every number is checked once by `sdjax.limits.check_request` (limits: `sdjax.limits.Limits`,
    the defaults when None): seeds in [0, 2**32 - 1], finite CFG, steps and size within limits.
    Decoded images are checked for NaN / inf: a non-float32 VAE decodes again in float32 once
    (A1111's --no-half-vae fallback, with a warning), else `NonFiniteError`.

    Returns GenerationResult(images, latents (B, H/8, W/8, C) scaled, infotexts, seeds).
    Raises TaskError / UnknownNameError (both `SdjaxError`) for bad input.
    """
    if mesh is None and devices is not None:
        from sdjax import parallel

        try:
            mesh = parallel.device_mesh(devices, fsdp)
        except ValueError as e:
            raise TaskError(str(e)) from None
    check_request(steps=steps if sigmas is None else None, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size,
                  width=width, height=height, strength=strength if init_image is not None else None,
                  subseed=subseed, subseed_strength=subseed_strength, clip_skip=clip_skip, knobs=knobs,
                  limits=limits)
    sampler_id, schedule_id = sampling.resolve(sampler, schedule)
    model = discrete_model(pipe)
    bad = sorted(set(knobs) - {"eta", "s_noise", "s_churn", "s_tmin", "s_tmax", "r", *_STATIC_KNOBS})
    if bad:
        raise TaskError(f"unknown generation option(s) {bad}")
    if sigmas is None:
        sigmas = sampling.get_sigmas(schedule_id, steps, model)
    sigmas = np.asarray(sigmas, np.float32)
    steps = len(sigmas) - 1

    init_pil = None if init_image is None else tasks.to_pil_rgb(init_image)
    if init_pil is not None:
        width = init_pil.width if width is None else width
        height = init_pil.height if height is None else height
    native = native_size(pipe)
    width, height = width or native, height or native
    check_request(width=width, height=height, limits=limits)
    if init_pil is None and mask is not None:
        raise TaskError("a mask needs an init image")
    task = "txt2img" if init_pil is None else ("img2img" if mask is None else "inpaint")
    start = img2img_start(strength, steps) if task != "txt2img" else 0

    if batch_size is None:  # diffusers: a list of prompts is a batch of that many images
        batch_size = len(prompt) if isinstance(prompt, (list, tuple)) else 1
    check_request(batch_size=batch_size, seed=seed, subseed=subseed, limits=limits)
    b = int(batch_size)
    prompt_list = _as_list(prompt, b, "prompt")
    negative_list = _as_list(negative_prompt, b, "negative_prompt")
    seeds = [int(seed) + i for i in range(b)]
    subseeds = None if subseed is None else [int(subseed) + i for i in range(b)]
    channels = int(pipe.vae.config.latent_channels)
    latent_shape = (height // 8, width // 8, channels)
    seed_noise, keys = generation.initial_noise(np.asarray(seeds), latent_shape, subseeds, subseed_strength)
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != (b,) + latent_shape:
            raise TaskError(f"noise must have shape {(b,) + latent_shape} (B, H/8, W/8, C); got {noise.shape}")
    else:
        noise = seed_noise

    # LoRAs (prompt tags, `loras`) and embeddings: merged copies of the weights for this call.
    nets = networks.apply_networks(pipe, prompt_list, negative_list, lora_dir=lora_dir, loras=loras,
                                   lora_strict=lora_strict, embeddings=embeddings,
                                   embeddings_dir=embeddings_dir)
    cond, uncond = encode_prompts(pipe, nets.prompts, nets.negatives, clip_skip, tokenizer=nets.tokenizer,
                                  te_state=nets.te_state)
    inputs: dict[str, Any] = {
        "cond": cond, "uncond": uncond, "cfg_scale": jnp.float32(cfg_scale), "noise": noise,
        "sigmas": jnp.asarray(sigmas), "start": jnp.int32(start), "keys": keys,
        "knobs": {k: jnp.float32(v) for k, v in knobs.items() if k not in _STATIC_KNOBS},
    }
    unet_in = int(pipe.unet.config.in_channels)
    nine = unet_in == 2 * channels + 1
    job = None
    params_extra: dict[str, Any] = {}
    vae_enc = generation.vae_encode_fn(pipe.vae.graphdef, pipe.vae.scaling_factor)
    if task == "img2img":
        pixels = tasks.pil_to_array(init_pil if init_pil.size == (width, height)
                                    else init_pil.resize((width, height), Image.Resampling.LANCZOS))
        init = vae_enc(pipe.vae.state, jnp.asarray(pixels)[None])
        inputs["init_latents"] = jnp.broadcast_to(init, (b,) + init.shape[1:])
    elif task == "inpaint":
        job = tasks.prepare_inpaint(init_pil, mask, width, height, blur=mask_blur, fill_mode=inpainting_fill,
                                    full_res=inpaint_full_res, padding=inpaint_full_res_padding,
                                    paste_back=paste_back)
        params_extra.update(job.extra_params)
        init = vae_enc(pipe.vae.state, jnp.asarray(job.image)[None])
        inputs["init_latents"] = jnp.broadcast_to(init, (b,) + init.shape[1:])
        m = job.cond_mask if nine else job.latent_mask
        inputs["mask"] = jnp.broadcast_to(jnp.asarray(m)[None], (b,) + m.shape)
        inputs["fill_keep"], inputs["fill_noise"] = jnp.float32(job.fill_keep), jnp.float32(job.fill_noise)
        if nine:
            masked = vae_enc(pipe.vae.state, jnp.asarray(job.masked_image)[None])
            inputs["masked_latents"] = jnp.broadcast_to(masked, (b,) + masked.shape[1:])
    elif nine:
        raise TaskError("this is an inpainting checkpoint (9-channel UNet): pass init_image and mask")

    params_extra.update(nets.infotext)
    control_static: tuple = ()
    if controlnets:
        from sdjax import control

        if job is not None and inpaint_full_res:
            raise TaskError("ControlNet with only-masked inpainting (inpaint_full_res) is not supported")
        prepared = control.prepare(pipe, controlnets, width, height, steps, start, b)
        inputs["control"], control_static = prepared.inputs, prepared.static
        params_extra.update(prepared.infotext)
    static = tuple(sorted((k, v) for k, v in knobs.items() if k in _STATIC_KNOBS))
    spec = generation.Spec(sampler_id, task, nine and task == "inpaint", static, progress is not None,
                           timestep_mode, controlnets=control_static, record_control=record_control)
    fn = generation.build(pipe.unet.graphdef, pipe.vae.graphdef, model, spec, pipe.vae.scaling_factor)
    with generation.progress_hook(progress):
        latents, images = fn(*_placed(pipe, inputs, b, devices, fsdp, mesh, nets.unet_state))
        latents = np.asarray(latents)[:b]  # padded rows of a sharded batch dropped
        images = np.asarray(images)[:b]
        jax.effects_barrier()
    images = finite_images(pipe, latents, images)
    pil = to_pil(images)
    if job is not None:
        pil = [tasks.paste_back(im, job) for im in pil]

    sampler_label, schedule_label = sampling.display_names(sampler_id, schedule_id)
    infotexts = []
    for i in range(b):
        params = {
            "Steps": steps, "Sampler": sampler_label, "Schedule type": schedule_label, "CFG scale": cfg_scale,
            "Seed": seeds[i], "Size": (width, height), "Model hash": _model_hash(pipe),
            # A1111 writes the checkpoint's name without its extension.
            "Model": Path(pipe.model_dir).stem if Path(pipe.model_dir).is_file() else Path(pipe.model_dir).name,
            "Variation seed": None if subseeds is None else subseeds[i],
            "Variation seed strength": None if subseeds is None else subseed_strength,
            "Denoising strength": strength if task != "txt2img" else None, "Clip skip": clip_skip,
            **{k.capitalize(): v for k, v in knobs.items() if k in ("eta",)},
            **params_extra, **(extra_params or {}),
        }
        infotexts.append(metadata.format_infotext(prompt_list[i], negative_list[i], params))
    return GenerationResult(pil, latents, infotexts, seeds)
