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
from sdjax.pipeline import control, core, hires, inpaint, networks, sdxl
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
    encoded = np.asarray(encode_texts(pipe, list(prompts_) + list(negatives), clip_skip, tokenizer=tokenizer,
                                      te_state=te_state))
    return jnp.asarray(encoded[:len(prompts_)]), jnp.asarray(encoded[len(prompts_):])


def encode_texts(pipe, texts: Sequence[str], clip_skip: int = 1, *, tokenizer=None, te_state=None) -> np.ndarray:
    """`encode_prompts` for a list of texts: numpy float32 (len(texts), n * 77, D), all padded to the
    same chunk count with empty-prompt chunks (A1111 pad_cond_uncond, batch-wide)."""
    tok = pipe.tokenizer if tokenizer is None else tokenizer
    empty = prompts.tokenize_prompt(tok, "")
    # <lora:...> tags are applied to the weights by the caller, not encoded (A1111).
    tokens = {t: prompts.tokenize_prompt(tok, prompts.extract_lora_tags(t).prompt) for t in dict.fromkeys(texts)}
    n = max(t.n_chunks for t in tokens.values())
    widest = prompts.PromptTokens(np.repeat(empty.ids, n, 0), np.repeat(empty.weights, n, 0))
    fn = core.text_encoder_fn(pipe.text_encoder.graphdef)

    def encode_fn(ids, clip_skip):
        return fn(pipe.text_encoder.state if te_state is None else te_state, ids, clip_skip=clip_skip)

    encoded = {}
    for text, t in tokens.items():
        t, _ = prompts.pad_to_same_chunks(t, widest, empty)  # A1111 pad_cond_uncond, batch-wide
        encoded[text] = prompts.encode_prompt(encode_fn, t, clip_skip)
    # Joined on the host: a new number of texts must not compile anything on the device.
    return np.concatenate([np.asarray(encoded[t]) for t in texts], axis=0)


def conditioning_fields(pipe, prompts_: Sequence[str], negatives: Sequence[str], steps: int, clip_skip: int = 1, *,
                        hires_steps: int | None = None, tokenizer=None, te_state=None) -> dict[str, Any]:
    """The traced conditioning inputs (`Inputs.cond_table` / `cond_index` / `uncond_index` /
    `cond_weights`) of a batch: A1111 prompt editing, alternation and AND
    (`sdjax.prompts.scheduling.plan_conditioning`, schedules over `steps`, or the hires pass's
    `hires_steps` counted on from `steps`). The table's rows are padded with zeros to
    `prompts.bucket(n)` rows, so a new prompt or schedule recompiles nothing."""
    strip = lambda t: prompts.extract_lora_tags(t).prompt  # noqa: E731  (A1111 parses after removing them)
    plan = prompts.plan_conditioning([strip(t) for t in prompts_], [strip(t) for t in negatives], steps,
                                     hires_steps=hires_steps)
    table = np.asarray(encode_texts(pipe, plan.texts, clip_skip, tokenizer=tokenizer, te_state=te_state))
    pad = prompts.bucket(table.shape[0]) - table.shape[0]
    table = np.concatenate([table, np.zeros((pad,) + table.shape[1:], table.dtype)], axis=0)  # host: no compile
    return dict(cond=None, uncond=None, cond_table=jnp.asarray(table), cond_index=jnp.asarray(plan.cond_index),
                uncond_index=jnp.asarray(plan.uncond_index), cond_weights=jnp.asarray(plan.weights))


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
                 preview: Callable[[int, np.ndarray], None] | None = None, record_control: bool = False,
                 devices: int | str | None = None, fsdp: int | str = 1, mesh: Any = None) -> GenerationResult:
        """Generate `request.batch_size` images; returns GenerationResult(images, latents
        (B, H/8, W/8, C) scaled, infotexts, seeds).

        progress: `fn(step_index)` on the host after each sampler step. preview: `fn(step_index,
        x0_pred (B, h, w, C) float32 scaled latents)` after each step (`sdjax.pipeline.preview`);
        it uses the same compiled function as `progress`, so adding it compiles nothing. record_control: report
        the ControlNet scales of each evaluation to `sdjax.pipeline.control.record_scales`.
        Devices: by default one device runs the whole batch. devices="all" (every local device)
        or N (the first N) splits the batch over them: B is padded to a multiple of the device
        count and trimmed, and every image equals the same seed made alone (to fp rounding).
        fsdp=K (dividing the device count; "all" = every one) shards the weights over K of them
        instead of replicating them. mesh: an explicit `sdjax.parallel.make_mesh` mesh instead.

        Decoded images are checked for NaN / inf: a non-float32 VAE decodes again in float32 once
        (A1111's --no-half-vae fallback, with a warning), else `NonFiniteError`.
        With `request.hires` (a `HiresFix`): A1111's hires fix, two passes (`sdjax.pipeline.hires`).
        Raises TaskError / UnknownNameError (both `SdjaxError`) for bad input.
        """
        run = dict(progress=progress, preview=preview, record_control=record_control, devices=devices, fsdp=fsdp,
                   mesh=mesh)
        if request.hires is not None:
            return hires.generate(
                self.pipe, request, lambda r, extra: self._generate(r, extra_infotext=extra, **run),
                lambda r, init, first_steps: self._generate(r, init_latents=init, first_pass_steps=first_steps, **run))
        return self._generate(request, **run)

    def _generate(self, request: Request, *, progress, preview, record_control, devices, fsdp, mesh,
                  init_latents: np.ndarray | None = None, first_pass_steps: int | None = None,
                  extra_infotext: dict | None = None) -> GenerationResult:
        """One pass. init_latents (B, h, w, C) scaled: img2img from these latents (the hires
        fix's second pass, whose prompt schedules count on from `first_pass_steps`)."""
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
        if init_latents is not None:
            task = "img2img"
        start = img2img_start(r.strength, steps) if task != "txt2img" else 0

        prompt_list = _as_list(r.prompt, b, "prompt")
        negative_list = _as_list(r.negative_prompt, b, "negative_prompt")
        # seeds (and subseeds) may be given per image (`Request.seeds`); else image i has seed + i.
        seeds = [int(v) for v in r.seeds] if r.seeds is not None else [int(r.seed) + i for i in range(b)]
        subseeds = None if r.subseed is None else (
            [int(v) for v in r.subseeds] if r.subseeds is not None else [int(r.subseed) + i for i in range(b)])
        cfg_list = _as_list(r.cfg_scale, b, "cfg_scale")
        channels = int(pipe.vae.config.latent_channels)
        latent_shape = (height // 8, width // 8, channels)
        seed_noise, keys = core.initial_noise(np.asarray(seeds), latent_shape, subseeds, r.subseed_strength)
        if r.noise is not None:
            noise = jnp.asarray(r.noise, jnp.float32)
            if noise.shape != (b,) + latent_shape:
                raise TaskError(f"noise must have shape {(b,) + latent_shape} (B, H/8, W/8, C); got {noise.shape}")
        else:
            noise = seed_noise

        per_image_cfg = isinstance(r.cfg_scale, (list, tuple))
        cfg = jnp.asarray(np.asarray(cfg_list, np.float32).reshape(b, 1, 1, 1)) if per_image_cfg \
            else jnp.float32(r.cfg_scale)
        params_extra: dict[str, Any] = {}
        fields: dict[str, Any] = dict(
            cfg_scale=cfg, noise=noise, sigmas=jnp.asarray(sigmas), start=jnp.int32(start),
            keys=keys, knobs={k: _traced_knob(k, v) for k, v in r.knobs.items() if k not in STATIC_KNOBS})
        refiner_static = None
        if pipe.family == "sd":
            if r.refiner is not None:
                raise TaskError("a refiner hands over from an SDXL base model; this is an SD 1.x / 2.x model")
            # LoRAs (prompt tags, `loras`) and embeddings: merged copies of the weights for this call.
            nets = networks.apply_networks(pipe, prompt_list, negative_list, lora_dir=r.lora_dir, loras=r.loras,
                                           lora_strict=r.lora_strict, embeddings=r.embeddings,
                                           embeddings_dir=r.embeddings_dir, embedding_cache=self.embeddings,
                                           lora_cache=self.loras)
            fields.update(conditioning_fields(pipe, nets.prompts, nets.negatives, first_pass_steps or steps,
                                              r.clip_skip, hires_steps=steps if first_pass_steps else None,
                                              tokenizer=nets.tokenizer, te_state=nets.te_state))
            unet_state, net_infotext = nets.unet_state, nets.infotext
        else:
            nets = networks.apply_networks(pipe, prompt_list, negative_list, lora_dir=r.lora_dir, loras=r.loras,
                                           lora_strict=r.lora_strict, embeddings=r.embeddings,
                                           embeddings_dir=r.embeddings_dir, embedding_cache=self.embeddings,
                                           lora_cache=self.loras)
            unet_state, net_infotext = nets.unet_state, nets.infotext
            refiner_static = sdxl.request_fields(pipe, self.discrete_model, fields, r, prompt_list,
                                                 negative_list, width, height, b, sigmas, nets)
            if r.refiner is not None:
                path = Path(r.refiner.model_dir)
                name = path.stem if path.is_file() else path.name
                short = unet_file_hash(path)
                params_extra["Refiner"] = f"{name} [{short}]" if short else name
                params_extra["Refiner switch at"] = r.refiner_switch_at
        unet_in = int(pipe.unet.config.in_channels)
        nine = unet_in == 2 * channels + 1
        job = None
        vae_enc = core.vae_encode_fn(pipe.vae.graphdef, pipe.vae.scaling_factor)
        if task == "img2img" and init_latents is not None:
            fields["init_latents"] = jnp.asarray(init_latents, jnp.float32)
        elif task == "img2img":
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

        params_extra.update(net_infotext)
        params_extra.update(extra_infotext or {})
        control_static: tuple = ()
        if r.controlnets:
            if job is not None and r.inpaint_full_res:
                raise TaskError("ControlNet with only-masked inpainting (inpaint_full_res) is not supported")
            prepared = control.prepare(r.controlnets, width, height, steps, start, dtype=pipe.dtype,
                                       kernels=getattr(pipe, "kernels", None), cache=self.controlnets,
                                       unet_config=pipe.unet.config)
            fields["control"], control_static = prepared.inputs, prepared.static
            params_extra.update(prepared.infotext)
        static = tuple(sorted((k, v) for k, v in r.knobs.items() if k in STATIC_KNOBS))
        staged = progress is not None or preview is not None
        spec = core.Spec(sampler_id, task, nine and task == "inpaint", static, staged,
                         r.timestep_mode, controlnets=control_static, record_control=record_control,
                         refiner=refiner_static)
        fn = core.build(pipe.unet.graphdef, pipe.vae.graphdef, model, spec, pipe.vae.scaling_factor)
        on_x0 = None if preview is None else (lambda i, x0: preview(i, x0[:b]))  # padded rows dropped
        with core.progress_hook(progress), core.preview_hook(on_x0):
            latents, images = fn(*self.place(Inputs(**fields), b, mesh, unet_state))
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
                "Steps": steps, "Sampler": sampler_label, "Schedule type": schedule_label, "CFG scale": cfg_list[i],
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


def _traced_knob(name: str, value) -> jax.Array:
    """A numeric sampler knob as a traced scalar; noise_type becomes its index (0 gaussian, 1 brownian)."""
    if name == "noise_type":
        return jnp.int32(sampling.NOISE_TYPES.index(value))
    return jnp.float32(value)


__all__ = ["GenerationResult", "Generator", "conditioning_fields", "discrete_model", "encode_prompts", "encode_texts",
           "finite_images", "img2img_start", "model_hash", "native_size"]

