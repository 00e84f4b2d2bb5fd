"""txt2img, img2img and inpainting on a loaded pipeline: a `Request` in, a `GenerationResult` out.

`Generator(pipe).generate(request)` (what `Pipeline.generate` calls) does the host work --
prompts and networks, seeds, init images and masks, ControlNet units, placing inputs on
devices, PNG parameters -- and runs one compiled function per (shapes, sampler, task) from
`sdjax.pipeline.core`. The Generator owns what it keeps between calls: the noise table, the
model hash, weights placed on a device mesh, loaded ControlNets, LoRA and embedding files.

Seeds: image i of a batch uses seed + i (and subseed + i), so a batch of 4 equals 4 batches of 1.
img2img as A1111: t_enc = int(min(strength, 0.999) * steps); sampling starts at sigma index
steps - t_enc - 1 from init_latents + noise * that sigma. strength is traced (no recompile).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from sdjax import metadata, parallel, prompts, sampling
from sdjax.errors import NonFiniteError, TaskError
from sdjax.images import to_pil
from sdjax.models.vae import AutoencoderKL
from sdjax.pipeline import control, core, inpaint, networks
from sdjax.pipeline.inputs import Inputs, shard
from sdjax.pipeline.request import STATIC_KNOBS, Request, check_request
from sdjax.weights.diffusers import abstract_model


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


def unet_file_hash(model_dir) -> str | None:
    """A1111-style short hash (first 10 hex digits of SHA-256): of a single-file checkpoint, the
    whole file (A1111's "Model hash"); of a diffusers folder, the UNet weight file(s)."""
    model_path = Path(model_dir)
    if model_path.is_file():
        files = [model_path]
    else:
        files = sorted(p for p in (model_path / "unet").glob("*") if p.suffix in (".safetensors", ".bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:10]


def model_hash(pipe) -> str | None:
    """The pipeline's model hash (`unet_file_hash`, computed once by its Generator)."""
    return pipe.generator.model_hash


def discrete_model(pipe) -> sampling.DiscreteModel:
    """The pipeline's noise table (made once by its Generator)."""
    return pipe.generator.discrete_model


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
    fn = core.text_encoder_fn(pipe.text_encoder.graphdef)

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


@functools.lru_cache(maxsize=8)
def _float32_decoder(vae_config, scaling_factor: float):
    """(graphdef, jit(decode(state, latents) -> images in [-1, 1])) of a float32 copy of the VAE."""
    graphdef, _ = nnx.split(abstract_model(AutoencoderKL, vae_config, jnp.float32))

    def decode(state, latents):
        vae = nnx.merge(graphdef, state)
        return jnp.clip(vae.decode(latents / scaling_factor).astype(jnp.float32), -1.0, 1.0)

    return jax.jit(decode)


def finite_images(pipe, latents: np.ndarray, images: np.ndarray) -> np.ndarray:
    """`images` (B, H, W, 3) when finite; else decoded again from `latents` (scaled, as
    `core.build` returns them) with a float32 copy of the VAE -- A1111's --no-half-vae
    fallback for half-precision VAEs that overflow -- with a warning. NonFiniteError when the
    latents themselves are not finite or the float32 decode is not finite either."""
    if np.isfinite(images).all():
        return images
    if not np.isfinite(latents).all():
        raise NonFiniteError("sampling produced NaN/inf latents (a NaN/inf weight, or a CFG scale or sampler "
                             "that diverges); try a lower --cfg-scale, another sampler or --dtype float32")
    state32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pipe.vae.state)
    if any(leaf.dtype != jnp.float32 for leaf in jax.tree.leaves(pipe.vae.state)):
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


class Generator:
    """Runs `Request`s on one pipeline and owns what it keeps between them.

    discrete_model: the noise table from the scheduler config; model_hash: the UNet files' short
    hash (None without files); placed: (unet state, vae state, (mesh, mode), placed states), the
    weights last put on a device mesh; controlnets: loaded ControlNets per (path, dtype, kernels);
    loras, embeddings: files read, per (path, mtime).
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self._discrete_model: sampling.DiscreteModel | None = None
        self._model_hash: str | None = None
        self._model_hash_done = False
        self.placed: tuple | None = None
        self.controlnets: dict = {}
        self.loras: dict = {}
        self.embeddings: dict = {}

    @property
    def discrete_model(self) -> sampling.DiscreteModel:
        if self._discrete_model is None:
            self._discrete_model = sampling.DiscreteModel.from_config(self.pipe.scheduler_config)
        return self._discrete_model

    @property
    def model_hash(self) -> str | None:
        if not self._model_hash_done:
            self._model_hash, self._model_hash_done = unet_file_hash(self.pipe.model_dir), True
        return self._model_hash

    def place(self, inputs: Inputs, b: int, mesh, unet_state) -> tuple:
        """(unet_state, vae_state, inputs) for the compiled function: as they are without a mesh;
        with one, the batch padded to a multiple of the data x fsdp size and sharded over it, the
        weights replicated (fsdp=1) or FSDP-sharded (kept in `placed` per weights, mesh and mode)."""
        vae_state = self.pipe.vae.state
        if mesh is None:
            return unet_state, vae_state, inputs
        mode = "fsdp" if mesh.shape["fsdp"] > 1 else "replicate"
        cached = self.placed
        if cached is None or cached[0] is not unet_state or cached[1] is not vae_state or cached[2] != (mesh, mode):
            cached = (unet_state, vae_state, (mesh, mode), parallel.shard_params((unet_state, vae_state), mesh, mode))
            self.placed = cached
        return (*cached[3], shard(inputs, mesh, b))

    def generate(self, request: Request, *, progress: Callable[[int], None] | None = None,
                 record_control: bool = False, devices: int | str | None = None, fsdp: int | str = 1,
                 mesh: Any = None) -> GenerationResult:
        """Generate `request.batch_size` images; returns GenerationResult(images, latents
        (B, H/8, W/8, C) scaled, infotexts, seeds).

        progress: `fn(step_index)` on the host after each sampler step. record_control: report
        the ControlNet scales of each evaluation to `sdjax.pipeline.control.record_scales`.
        Devices: by default one device runs the whole batch. devices="all" (every local device)
        or N (the first N) splits the batch over them: B is padded to a multiple of the device
        count and trimmed, and every image equals the same seed made alone (to fp rounding).
        fsdp=K (dividing the device count; "all" = every one) shards the weights over K of them
        instead of replicating them. mesh: an explicit `sdjax.parallel.make_mesh` mesh instead.

        Decoded images are checked for NaN / inf: a non-float32 VAE decodes again in float32 once
        (A1111's --no-half-vae fallback, with a warning), else `NonFiniteError`.
        Raises TaskError / UnknownNameError (both `SdjaxError`) for bad input.
        """
        pipe, r = self.pipe, request
        if mesh is None and devices is not None:
            try:
                mesh = parallel.device_mesh(devices, fsdp)
            except ValueError as e:
                raise TaskError(str(e)) from None
        sampler_id, schedule_id = sampling.resolve(r.sampler, r.schedule)
        model = self.discrete_model
        sigmas = r.sigmas if r.sigmas is not None else sampling.get_sigmas(schedule_id, r.steps, model)
        sigmas = np.asarray(sigmas, np.float32)
        steps = len(sigmas) - 1

        init_pil = None if r.init_image is None else inpaint.to_pil_rgb(r.init_image)
        width, height = r.width, r.height
        if init_pil is not None:
            width = init_pil.width if width is None else width
            height = init_pil.height if height is None else height
        native = native_size(pipe)
        r = r.sized(width or native, height or native)  # checked again, now complete
        width, height, task, b = r.width, r.height, r.task, int(r.batch_size)
        start = img2img_start(r.strength, steps) if task != "txt2img" else 0

        prompt_list = _as_list(r.prompt, b, "prompt")
        negative_list = _as_list(r.negative_prompt, b, "negative_prompt")
        seeds = [int(r.seed) + i for i in range(b)]
        subseeds = None if r.subseed is None else [int(r.subseed) + i for i in range(b)]
        channels = int(pipe.vae.config.latent_channels)
        latent_shape = (height // 8, width // 8, channels)
        seed_noise, keys = core.initial_noise(np.asarray(seeds), latent_shape, subseeds, r.subseed_strength)
        if r.noise is not None:
            noise = jnp.asarray(r.noise, jnp.float32)
            if noise.shape != (b,) + latent_shape:
                raise TaskError(f"noise must have shape {(b,) + latent_shape} (B, H/8, W/8, C); got {noise.shape}")
        else:
            noise = seed_noise

        # LoRAs (prompt tags, `loras`) and embeddings: merged copies of the weights for this call.
        nets = networks.apply_networks(pipe, prompt_list, negative_list, lora_dir=r.lora_dir, loras=r.loras,
                                       lora_strict=r.lora_strict, embeddings=r.embeddings,
                                       embeddings_dir=r.embeddings_dir, embedding_cache=self.embeddings,
                                       lora_cache=self.loras)
        cond, uncond = encode_prompts(pipe, nets.prompts, nets.negatives, r.clip_skip, tokenizer=nets.tokenizer,
                                      te_state=nets.te_state)
        fields: dict[str, Any] = dict(
            cond=cond, uncond=uncond, cfg_scale=jnp.float32(r.cfg_scale), noise=noise, sigmas=jnp.asarray(sigmas),
            start=jnp.int32(start), keys=keys,
            knobs={k: _traced_knob(k, v) for k, v in r.knobs.items() if k not in STATIC_KNOBS})
        unet_in = int(pipe.unet.config.in_channels)
        nine = unet_in == 2 * channels + 1
        job = None
        params_extra: dict[str, Any] = {}
        vae_enc = core.vae_encode_fn(pipe.vae.graphdef, pipe.vae.scaling_factor)
        if task == "img2img":
            pixels = inpaint.pil_to_array(init_pil if init_pil.size == (width, height)
                                          else init_pil.resize((width, height), Image.Resampling.LANCZOS))
            init = vae_enc(pipe.vae.state, jnp.asarray(pixels)[None])
            fields["init_latents"] = jnp.broadcast_to(init, (b,) + init.shape[1:])
        elif task == "inpaint":
            job = inpaint.prepare_inpaint(init_pil, r.mask, width, height, blur=r.mask_blur,
                                          fill_mode=r.inpainting_fill, full_res=r.inpaint_full_res,
                                          padding=r.inpaint_full_res_padding, paste_back=r.paste_back)
            params_extra.update(job.extra_params)
            init = vae_enc(pipe.vae.state, jnp.asarray(job.image)[None])
            fields["init_latents"] = jnp.broadcast_to(init, (b,) + init.shape[1:])
            m = job.cond_mask if nine else job.latent_mask
            fields["mask"] = jnp.broadcast_to(jnp.asarray(m)[None], (b,) + m.shape)
            fields["fill_keep"], fields["fill_noise"] = jnp.float32(job.fill_keep), jnp.float32(job.fill_noise)
            if nine:
                masked = vae_enc(pipe.vae.state, jnp.asarray(job.masked_image)[None])
                fields["masked_latents"] = jnp.broadcast_to(masked, (b,) + masked.shape[1:])
        elif nine:
            raise TaskError("this is an inpainting checkpoint (9-channel UNet): pass init_image and mask")

        params_extra.update(nets.infotext)
        control_static: tuple = ()
        if r.controlnets:
            if job is not None and r.inpaint_full_res:
                raise TaskError("ControlNet with only-masked inpainting (inpaint_full_res) is not supported")
            prepared = control.prepare(r.controlnets, width, height, steps, start, dtype=pipe.dtype,
                                       kernels=getattr(pipe, "kernels", None), cache=self.controlnets)
            fields["control"], control_static = prepared.inputs, prepared.static
            params_extra.update(prepared.infotext)
        static = tuple(sorted((k, v) for k, v in r.knobs.items() if k in STATIC_KNOBS))
        spec = core.Spec(sampler_id, task, nine and task == "inpaint", static, progress is not None,
                         r.timestep_mode, controlnets=control_static, record_control=record_control)
        fn = core.build(pipe.unet.graphdef, pipe.vae.graphdef, model, spec, pipe.vae.scaling_factor)
        with core.progress_hook(progress):
            latents, images = fn(*self.place(Inputs(**fields), b, mesh, nets.unet_state))
            latents = np.asarray(latents)[:b]  # padded rows of a sharded batch dropped
            images = np.asarray(images)[:b]
            jax.effects_barrier()
        images = finite_images(pipe, latents, images)
        pil = to_pil(images)
        if job is not None:
            pil = [inpaint.paste_back(im, job) for im in pil]

        sampler_label, schedule_label = sampling.display_names(sampler_id, schedule_id)
        infotexts = []
        for i in range(b):
            params = {
                "Steps": steps, "Sampler": sampler_label, "Schedule type": schedule_label, "CFG scale": r.cfg_scale,
                "Seed": seeds[i], "Size": (width, height), "Model hash": self.model_hash,
                # A1111 writes the checkpoint's name without its extension.
                "Model": Path(pipe.model_dir).stem if Path(pipe.model_dir).is_file() else Path(pipe.model_dir).name,
                "Variation seed": None if subseeds is None else subseeds[i],
                "Variation seed strength": None if subseeds is None else r.subseed_strength,
                "Denoising strength": r.strength if task != "txt2img" else None, "Clip skip": r.clip_skip,
                **{k.capitalize(): v for k, v in r.knobs.items() if k in ("eta",)},
                **params_extra, **(r.extra_params or {}),
            }
            infotexts.append(metadata.format_infotext(prompt_list[i], negative_list[i], params))
        return GenerationResult(pil, latents, infotexts, seeds)


__all__ = ["GenerationResult", "Generator", "discrete_model", "encode_prompts", "finite_images", "img2img_start",
           "model_hash", "native_size"]


def _traced_knob(name: str, value) -> jax.Array:
    """A numeric sampler knob as a traced scalar; noise_type becomes its index (0 gaussian, 1 brownian)."""
    if name == "noise_type":
        return jnp.int32(sampling.NOISE_TYPES.index(value))
    return jnp.float32(value)
