"""The jitted heart of generation: noise from seeds, the guided denoiser, the ControlNet
residuals hook, the sampler's scan, the decode. It knows nothing of files, prompts or requests.

One compiled function per `Spec` (sampler, task, static knobs) and input shapes. Everything
that changes between requests -- prompt embeddings, seeds (as noise and keys), guidance
scale, the sigma schedule, the img2img start step (so the strength), eta and the other
numeric knobs, the masked-content mode -- is a traced argument.

Conventions: latents are NHWC (B, H/8, W/8, C) and *scaled* by the VAE's scaling_factor;
`noise` is unit-variance; sigmas are k-diffusion sigmas (x = x0 + sigma * eps). Every input
has the batch axis first, so a caller may give them a batch sharding (`sdjax.parallel`)
without any change here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import sampling
from sdjax.models.controlnet import sum_residuals
from sdjax.pipeline.inputs import Inputs

TASKS = ("txt2img", "img2img", "inpaint")


def image_keys(seeds: jax.Array) -> jax.Array:
    """One key per image from its own seed, so an image never depends on its batch. seeds: int (B,)."""
    return jax.vmap(jax.random.key)(jnp.asarray(seeds).astype(jnp.uint32))


def slerp(t: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    """Spherical interpolation per image (A1111's variation seeds). low, high: (B, ...); t: scalar.

    Nearly parallel pairs (|cos| > 0.9995) fall back to linear interpolation, as A1111."""
    flat_l = low.reshape(low.shape[0], -1)
    flat_h = high.reshape(high.shape[0], -1)
    nl = flat_l / jnp.linalg.norm(flat_l, axis=1, keepdims=True)
    nh = flat_h / jnp.linalg.norm(flat_h, axis=1, keepdims=True)
    dot = jnp.sum(nl * nh, axis=1)
    omega = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
    so = jnp.sin(omega)
    safe = jnp.where(so == 0, 1.0, so)
    linear = jnp.abs(dot) > 0.9995
    a = jnp.where(linear, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe)
    b = jnp.where(linear, t, jnp.sin(t * omega) / safe)
    shape = (-1,) + (1,) * (low.ndim - 1)
    return a.reshape(shape) * low + b.reshape(shape) * high


@functools.partial(jax.jit, static_argnames=("latent_shape",))
def _noise(seeds, subseeds, subseed_strength, latent_shape):
    keys = image_keys(seeds)
    draw = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), latent_shape, jnp.float32))
    noise = draw(keys)
    noise = slerp(jnp.asarray(subseed_strength, jnp.float32), noise, draw(image_keys(subseeds)))
    sampler_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    return noise, sampler_keys


def initial_noise(seeds, latent_shape: tuple[int, int, int], subseeds=None,
                  subseed_strength: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Unit Gaussian latents (B, h, w, c) float32 and the per-image sampler keys (B,), from seeds.

    Image i's noise is normal(fold_in(key(seed_i), 0)); its sampler keys are
    fold_in(key(seed_i), 1). With subseeds, the noise is
    slerp(subseed_strength, noise(seeds), noise(subseeds)) (A1111 variation seeds).
    seeds, subseeds: int (B,). Nothing depends on the batch size.
    """
    seeds = jnp.asarray(seeds, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    if subseeds is None:
        subseeds, subseed_strength = seeds, 0.0
    return _noise(seeds, jnp.asarray(subseeds, seeds.dtype), jnp.float32(subseed_strength),
                  tuple(int(d) for d in latent_shape))


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static part of a generation request: what one compiled function is specialised on.

    sampler: canonical sampler id; task: "txt2img", "img2img" or "inpaint";
    inpaint_channels: the UNet takes 9 channels (latents, mask, masked-image latents);
    static_knobs: sampler knobs that pick code paths, as sorted (name, value) pairs;
    progress: stage the per-step host callback (progress bars and previews, `progress_hook`,
    `preview_hook`);
    timestep_mode: how sigma becomes the UNet's timestep (`sampling.make_denoiser`);
    controlnets: ((ControlNet graphdef, guess_mode), ...) (`sdjax.pipeline.control`; their states,
    images and per-step scales are the traced `inputs.control`); record_control: report the
    ControlNet scales used at each evaluation (`record_scales`); refiner: the SDXL refiner UNet's
    graphdef, or None (its state and conditioning are the traced `inputs.refiner_*`).
    """

    sampler: str
    task: str = "txt2img"
    inpaint_channels: bool = False
    static_knobs: tuple[tuple[str, Any], ...] = ()
    progress: bool = False
    timestep_mode: str = "continuous"
    controlnets: tuple = ()
    record_control: bool = False
    refiner: Any = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")


def guided_denoiser(model: sampling.DiscreteModel, unet: Callable, cond, uncond, cfg_scale: jax.Array,
                    extra_channels: jax.Array | None = None, *, residuals: Callable | None = None,
                    timestep_mode: str = "continuous", conditioning: Callable | None = None,
                    weights: jax.Array | None = None, added: tuple | None = None) -> Callable:
    """x0-space denoiser with classifier-free guidance; cond and uncond run as one UNet batch.

    unet(x_scaled (n,h,w,c'), t (n,), context (n, L, D), **residuals) -> eps or v.
    cond, uncond: (B, L, D), the same at every step. Or `conditioning(sigma) -> (cond (B, S, L, D),
    uncond (B, L, D))`, the conditioning in force at noise level sigma (prompt scheduling; cond
    and uncond are then ignored), with S sub-prompts combined as A1111's composable diffusion:
    uncond + sum_s (cond_s - uncond) * (weights[:, s] * cfg_scale); weights (B, S), traced.
    The UNet batch is [cond rows (B*S, image-major), uncond rows (B)].
    cfg_scale: scalar or (B, 1, 1, 1), traced. extra_channels (B, h, w, k) are concatenated to
    the UNet input after c_in scaling (inpainting checkpoints). residuals: optional hook
    `residuals(x_scaled, t, context, n_cond) -> dict` of extra UNet keyword arguments
    (ControlNet's `down_residuals` / `mid_residual`), n_cond = B*S the cond rows.
    added: SDXL's (pooled, uncond_pooled (B, P), time_ids, uncond_time_ids (B, n)), passed to the
    UNet as `text_embeds` / `time_ids` in the same row order as the context (each image's pooled
    embedding repeated for its S sub-prompts).
    Returns D(x, sigma) -> guided x0, with `.with_uncond(x, sigma) -> (guided, unguided x0)` from
    the same UNet call (`sampling.with_uncond`; CFG++ samplers read it).
    """
    if conditioning is None:
        def conditioning(sigma):
            return cond[:, None], uncond

    def network(x_scaled, t, context, n_cond):
        kwargs = residuals(x_scaled, t, context, n_cond) if residuals is not None else {}
        if extra_channels is not None:
            extra = _rows(extra_channels, n_cond // extra_channels.shape[0]).astype(x_scaled.dtype)
            x_scaled = jnp.concatenate([x_scaled, extra], axis=-1)
        return unet(x_scaled, t, context, **kwargs, **added_rows(added, n_cond))

    base = sampling.make_denoiser(model, network, timestep_mode=timestep_mode)

    def denoise_pair(x, sigma):
        cond_, uncond_ = conditioning(sigma)
        b, s = cond_.shape[:2]
        context = jnp.concatenate([cond_.reshape((b * s,) + cond_.shape[2:]), uncond_], axis=0)
        x0 = base(_rows(x, s), sigma, context, b * s)
        x0_cond = x0[:b * s].reshape((b, s) + x.shape[1:])
        x0_uncond = x0[b * s:]
        if weights is None and s == 1:
            return sampling.cfg(x0_cond[:, 0], x0_uncond, cfg_scale), x0_uncond
        w = jnp.ones((b, s), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
        scale = jnp.reshape(jnp.asarray(cfg_scale, jnp.float32), (-1,) + (1,) * (x.ndim - 1))
        guided = x0_uncond
        for j in range(s):  # A1111's CFGDenoiser.combine_denoised, one sub-prompt after another
            factor = w[:, j].reshape((b,) + (1,) * (x.ndim - 1)) * scale
            guided = guided + (x0_cond[:, j] - x0_uncond) * factor.astype(x.dtype)
        return guided, x0_uncond

    # CFG++ samplers read the unguided x0 of the same batched call through `.with_uncond`.
    return sampling.with_uncond(denoise_pair)


def added_rows(added: tuple | None, n_cond: int) -> dict:
    """SDXL's UNet / ControlNet keyword inputs {text_embeds, time_ids} for a CFG batch of
    [n_cond cond rows (each image's S sub-prompts, image-major), B uncond rows], from
    added = (pooled, uncond_pooled (B, P), time_ids, uncond_time_ids (B, n)); {} without SDXL."""
    if added is None:
        return {}
    pooled, uncond_pooled, time_ids, uncond_time_ids = added
    s = n_cond // pooled.shape[0]
    return {"text_embeds": jnp.concatenate([jnp.repeat(pooled, s, axis=0), uncond_pooled], axis=0),
            "time_ids": jnp.concatenate([jnp.repeat(time_ids, s, axis=0), uncond_time_ids], axis=0)}


def _rows(x: jax.Array, s: int) -> jax.Array:
    """[each image repeated s times (image-major), then every image once]: (B*s + B, ...)."""
    return jnp.concatenate([jnp.repeat(x, s, axis=0) if s > 1 else x, x], axis=0)


def step_index(level: jax.Array, levels: jax.Array, steps: int) -> jax.Array:
    """The sampler step i (int32, 0 <= i < steps) of a network evaluation at noise level `level`.

    levels: the decreasing schedule, (steps + 1,) sigmas (or the matching UNet timesteps: any
    decreasing map of sigma works). Step i runs from levels[i] down to levels[i + 1]; an
    evaluation at a level in (levels[i + 1], levels[i]] -- its start, or a Heun/DPM2 midpoint --
    belongs to step i. level may be a scalar or any array of equal values."""
    level = jnp.max(jnp.asarray(level, jnp.float32))
    i = jnp.sum(jnp.asarray(levels, jnp.float32)[1:steps] >= level)
    return jnp.clip(i, 0, steps - 1).astype(jnp.int32)


def scheduled_conditioning(inputs: Inputs, sigmas: jax.Array, start: jax.Array) -> Callable:
    """`conditioning(sigma) -> (cond (B, S, L, D), uncond (B, L, D))` for `guided_denoiser` from
    the traced tables (`Inputs.cond_table`, `cond_index`, `uncond_index`): the rows of the run's
    0-based step k = (the evaluation's step in `sigmas`) - start, as A1111 counts its steps."""
    steps = inputs.cond_index.shape[1]

    def conditioning(sigma):
        k = jnp.clip(step_index(sigma, sigmas, sigmas.shape[0] - 1) - start, 0, steps - 1)
        table = inputs.cond_table
        return table[inputs.cond_index[:, k]], table[inputs.uncond_index[:, k]]

    return conditioning


def scale_at(level: jax.Array, levels: jax.Array, step_scales: jax.Array) -> jax.Array:
    """The per-step scale in force for a network evaluation at noise level `level` (traced).

    levels: the sampler's decreasing schedule, (steps + 1,) sigmas ending in 0 (or the
    matching UNet timesteps); the evaluation's step is `step_index`.
    step_scales: (steps,) or (steps, n_controlnets), from `controlnet_step_scales`. For
    img2img starting at step `start`, compute them for the `steps - start` steps run (as
    diffusers does) and left-pad with `start` zero rows.
    level may be a scalar or any array of equal values (e.g. the (2B,) timesteps); returns
    step_scales[i] (scalar or (n_controlnets,)), float32.
    """
    i = step_index(level, levels, step_scales.shape[0])
    return jnp.asarray(step_scales, jnp.float32)[i]


def residuals_hook(static: tuple, control: dict, levels: jax.Array, record: bool = False,
                   added: tuple | None = None) -> Callable:
    """`hook(x_scaled (n,h,w,4), t (n,), context (n,L,D), n_cond) -> {down_residuals, mid_residual}`
    for `guided_denoiser`. static: ((ControlNet graphdef, guess_mode), ...); control: the traced
    {"states", "images", "scales"} (`Inputs.control`); levels: the UNet timesteps of the sigma
    schedule, (steps+1,), to find the step of an evaluation (`scale_at`).

    As diffusers: our CFG batch is [cond rows (n_cond), uncond rows], so the image is repeated to
    every row; guess mode runs the ControlNet on the cond rows only and gives the uncond rows zero
    residuals; several ControlNets' residuals are summed. added: SDXL's (pooled, uncond_pooled, time_ids,
    uncond_time_ids), given to SDXL ControlNets in the rows' order (`added_rows`)."""

    def hook(x_scaled, t, context, n_cond):
        b = n_cond
        n = x_scaled.shape[0]
        sdxl = added_rows(added, n_cond)
        scales = scale_at(t, levels, control["scales"])
        if record:
            jax.debug.callback(_record_callback, t[0], scales)
        outputs = []
        for j, (graphdef, guess) in enumerate(static):
            net = nnx.merge(graphdef, control["states"][j])
            image = jnp.broadcast_to(control["images"][j], (n,) + control["images"][j].shape[1:])
            if guess:  # cond rows only (our CFG batch is [cond, uncond]); uncond gets zeros
                down, mid = net(x_scaled[:b], t[:b], context[:b], image[:b], scales[j], guess_mode=True,
                                **{k: v[:b] for k, v in sdxl.items()})
                pad = lambda r: jnp.concatenate([r, jnp.zeros((n - b,) + r.shape[1:], r.dtype)], axis=0)  # noqa: E731
                down, mid = [pad(r) for r in down], pad(mid)
            else:
                down, mid = net(x_scaled, t, context, image, scales[j], **sdxl)
            outputs.append((down, mid))
        down, mid = sum_residuals(outputs)
        return {"down_residuals": down, "mid_residual": mid}

    return hook


@functools.lru_cache(maxsize=32)
def build(unet_graph, vae_graph, model: sampling.DiscreteModel, spec: Spec, scaling_factor: float) -> Callable:
    """The jitted generation function for `spec` (cached: equal arguments share one function).

    run(unet_state, vae_state, inputs: `sdjax.pipeline.inputs.Inputs`) -> (latents (B,h,w,c) scaled,
    images (B,H,W,3) float32 in [-1,1]). Which optional inputs are present follows `spec.task`.
    """
    static = dict(spec.static_knobs)
    blend = spec.task == "inpaint" and not spec.inpaint_channels

    def run(unet_state, vae_state, inputs: Inputs):
        unet = nnx.merge(unet_graph, unet_state)
        vae = nnx.merge(vae_graph, vae_state)
        sigmas = jnp.asarray(inputs.sigmas, jnp.float32)
        start = inputs.start
        noise = inputs.noise.astype(jnp.float32)
        extra = mask = init = None
        if spec.task == "txt2img":
            x = noise * sigmas[start]
        else:
            init = inputs.init_latents.astype(jnp.float32)
            if spec.task == "inpaint":
                mask = inputs.mask.astype(jnp.float32)
                masked_init = init * inputs.fill_keep + noise * inputs.fill_noise
                init = init * (1.0 - mask) + mask * masked_init
            # A1111 img2img: the init latents plus unit noise times the starting sigma.
            x = init + noise * sigmas[start]
        if spec.task == "inpaint" and spec.inpaint_channels:
            extra = jnp.concatenate([mask, inputs.masked_latents], axis=-1)
        residuals = None
        if spec.controlnets:
            # The hook sees UNet timesteps: map the schedule the same way (sampling.make_denoiser).
            levels = model.sigma_to_t(sigmas, quantize=spec.timestep_mode == "nearest")
            levels = jnp.round(levels) if spec.timestep_mode == "round" else levels
        conditioning = None
        if inputs.cond_table is not None:  # prompt scheduling / AND: per-step rows of a traced table
            conditioning = scheduled_conditioning(inputs, sigmas, start)
        added = None if inputs.pooled is None else (inputs.pooled, inputs.uncond_pooled, inputs.time_ids,
                                                    inputs.uncond_time_ids)
        if spec.controlnets:
            residuals = residuals_hook(spec.controlnets, inputs.control, levels, spec.record_control, added)
        denoise = guided_denoiser(model, unet, inputs.cond, inputs.uncond, inputs.cfg_scale, extra,
                                  residuals=residuals, timestep_mode=spec.timestep_mode,
                                  conditioning=conditioning, weights=inputs.cond_weights, added=added)
        if spec.refiner is not None:
            denoise = _with_refiner(denoise, model, nnx.merge(spec.refiner, inputs.refiner_state), inputs,
                                    spec.timestep_mode)
        if blend:
            # A1111 (CFGDenoiser, mask applied after denoising): outside the mask the x0
            # prediction is the original latent, so those latents stay at the noised original.
            guided = denoise

            def blended(x, sigma):
                g, u = guided.with_uncond(x, sigma)
                return init * (1.0 - mask) + mask * g, init * (1.0 - mask) + mask * u

            denoise = sampling.with_uncond(blended)

        callback = _progress_callback if spec.progress else None
        latents = sampling.sample(spec.sampler, denoise, x, sigmas, inputs.keys, start=start,
                                  callback=callback, **inputs.knobs, **static)
        if blend:
            latents = init * (1.0 - mask) + mask * latents  # A1111's final blend
        # A schedule that ends above 0 (DDIM's alphas_cumprod[0]) leaves the sample at that
        # noise level; as diffusers, decode it in the model's variance-preserving scaling.
        latents = latents / jnp.sqrt(1.0 + sigmas[-1] ** 2)
        images = vae.decode((latents / scaling_factor).astype(vae_dtype(vae_state)))
        return latents, jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

    return jax.jit(run)


def _with_refiner(base: Callable, model: sampling.DiscreteModel, refiner_unet, inputs: Inputs,
                  timestep_mode: str) -> Callable:
    """The SDXL ensemble of experts: `base` above inputs.switch_sigma, the refiner's guided denoiser
    (its own context, pooled embedding and aesthetic-score time ids; no extra inpainting channels)
    at and below it. One `lax.cond` per evaluation, so only one UNet runs. An evaluation belongs
    to the step it starts from, so multi-evaluation samplers switch between whole steps too."""
    refine = guided_denoiser(model, refiner_unet, inputs.refiner_cond, inputs.refiner_uncond, inputs.cfg_scale,
                             timestep_mode=timestep_mode,
                             added=(inputs.refiner_pooled, inputs.refiner_uncond_pooled, inputs.refiner_time_ids,
                                    inputs.refiner_uncond_time_ids))

    def denoise_pair(x, sigma):
        use_base = jnp.max(jnp.asarray(sigma, jnp.float32)) > inputs.switch_sigma
        return jax.lax.cond(use_base, base.with_uncond, refine.with_uncond, x, sigma)

    return sampling.with_uncond(denoise_pair)  # (guided, unguided) for CFG++ samplers, as the base's


def vae_dtype(vae_state) -> jnp.dtype:
    """The parameter dtype of a model state (the VAE's compute dtype here)."""
    leaves = jax.tree.leaves(vae_state)
    return leaves[0].dtype if leaves else jnp.float32


class _HostHooks:
    """The host functions compiled code reports to: progress after each sampler step (functions
    built with `Spec(progress=True)`) and the ControlNet scales of each evaluation
    (`Spec(record_control=True)`). A compiled function is shared by every pipeline with the same
    graphs and spec, so its host callback can only reach a module-level object; a `Generator`
    installs its hooks here for the duration of one call (`progress_hook`, `record_scales`)."""

    def __init__(self):
        self.progress: list[Callable[[int], None]] = []
        self.preview: list[Callable[[int, np.ndarray], None]] = []
        self.record: list[Callable[[float, np.ndarray], None]] = []
        self.steps: list[Callable[[int, tuple], None]] = []

    @contextlib.contextmanager
    def installed(self, kind: str, fn: Callable | None) -> Iterator[None]:
        if fn is None:
            yield
            return
        hooks = getattr(self, kind)
        hooks.append(fn)
        try:
            yield
        finally:
            hooks.remove(fn)


_HOOKS = _HostHooks()


def _progress_callback(i, x, x0_pred, sigma):
    for fn in list(_HOOKS.progress):
        fn(int(i))
    for fn in list(_HOOKS.preview):
        fn(int(i), np.asarray(x0_pred))
    for fn in list(_HOOKS.steps):
        fn(int(i), tuple(np.shape(x)))


def _record_callback(t, scales):
    for fn in list(_HOOKS.record):
        fn(float(t), np.asarray(scales))


def progress_hook(fn: Callable[[int], None] | None):
    """Context manager: while active, `fn(step_index)` is called on the host after each sampler
    step of a function built with `Spec(progress=True)`."""
    return _HOOKS.installed("progress", fn)


def preview_hook(fn: Callable[[int, np.ndarray], None] | None):
    """Context manager: while active, `fn(step_index, x0_pred)` is called on the host after each
    sampler step of a function built with `Spec(progress=True)`, with the step's denoised
    prediction x0_pred (B, h, w, C) float32, scaled latents (`sdjax.pipeline.preview`). It rides
    on the progress callback, which passes x0_pred anyway: previews compile nothing new."""
    return _HOOKS.installed("preview", fn)


def record_steps(fn: Callable[[int, tuple], None]):
    """Context manager: while active, functions built with `Spec(progress=True)` call
    `fn(step_index, latents_shape)` on the host after each sampler step: the step's index in the
    schedule and the (B, h, w, C) shape of the latents it stepped (e.g. to see both hires passes)."""
    return _HOOKS.installed("steps", fn)


def record_scales(fn: Callable[[float, np.ndarray], None]):
    """Context manager: while active, functions built with `Spec(record_control=True)` call
    `fn(t, scales)` on the host for every ControlNet evaluation: the UNet timestep and the
    (n_units,) scales used."""
    return _HOOKS.installed("record", fn)


@functools.lru_cache(maxsize=16)
def text_encoder_fn(graphdef) -> Callable:
    """jit(fn(state, ids (n, 77) int32, clip_skip static) -> hidden (n, 77, D)).

    Clip skip N as A1111: final_layer_norm(hidden_states[-N]); N = 1 is the usual last layer."""

    def encode(state, ids, clip_skip):
        model = nnx.merge(graphdef, state)
        out = model(ids, output_hidden_states=True)
        return model.final_layer_norm(out.hidden_states[-clip_skip])

    return jax.jit(encode, static_argnames=("clip_skip",))


@functools.lru_cache(maxsize=16)
def vae_encode_fn(graphdef, scaling_factor: float) -> Callable:
    """jit(fn(state, images (B,H,W,3) in [-1,1]) -> latents (B,H/8,W/8,C) float32, scaled).

    Uses the posterior mean (ComfyUI and diffusers' `latent_dist.mode()`), so an init image
    maps to one latent and img2img stays reproducible from its seed alone."""

    def encode(state, images):
        model = nnx.merge(graphdef, state)
        mean, _ = model.encode(images.astype(vae_dtype(state)))
        return mean.astype(jnp.float32) * scaling_factor

    return jax.jit(encode)
