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
    progress: stage the per-step host callback (only when a progress bar is shown);
    timestep_mode: how sigma becomes the UNet's timestep (`sampling.make_denoiser`);
    controlnets: ((ControlNet graphdef, guess_mode), ...) (`sdjax.pipeline.control`; their states,
    images and per-step scales are the traced `inputs.control`); record_control: report the
    ControlNet scales used at each evaluation (`record_scales`).
    """

    sampler: str
    task: str = "txt2img"
    inpaint_channels: bool = False
    static_knobs: tuple[tuple[str, Any], ...] = ()
    progress: bool = False
    timestep_mode: str = "continuous"
    controlnets: tuple = ()
    record_control: bool = False

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")


def guided_denoiser(model: sampling.DiscreteModel, unet: Callable, cond: jax.Array, uncond: jax.Array,
                    cfg_scale: jax.Array, extra_channels: jax.Array | None = None, *,
                    residuals: Callable | None = None, timestep_mode: str = "continuous") -> Callable:
    """x0-space denoiser with classifier-free guidance; cond and uncond run as one batch of 2B.

    unet(x_scaled (2B,h,w,c'), t (2B,), context (2B, L, D), **residuals) -> eps or v.
    cond, uncond: (B, L, D). cfg_scale: scalar or (B, 1, 1, 1), traced. extra_channels
    (B, h, w, k) are concatenated to the UNet input after c_in scaling (inpainting checkpoints).
    residuals: optional hook `residuals(x_scaled, t, context) -> dict` of extra UNet keyword
    arguments (ControlNet's `down_residuals` / `mid_residual`), passed through unchanged.
    """
    context = jnp.concatenate([cond, uncond], axis=0)

    def network(x_scaled, t):
        kwargs = residuals(x_scaled, t, context) if residuals is not None else {}
        if extra_channels is not None:
            extra = jnp.concatenate([extra_channels, extra_channels], axis=0).astype(x_scaled.dtype)
            x_scaled = jnp.concatenate([x_scaled, extra], axis=-1)
        return unet(x_scaled, t, context, **kwargs)

    base = sampling.make_denoiser(model, network, timestep_mode=timestep_mode)

    def denoise_pair(x, sigma):
        x0 = base(jnp.concatenate([x, x], axis=0), sigma)
        x0_cond, x0_uncond = jnp.split(x0, 2, axis=0)
        return sampling.cfg(x0_cond, x0_uncond, cfg_scale), x0_uncond

    # CFG++ samplers read the unguided x0 of the same batched call through `.with_uncond`.
    return sampling.with_uncond(denoise_pair)


def scale_at(level: jax.Array, levels: jax.Array, step_scales: jax.Array) -> jax.Array:
    """The per-step scale in force for a network evaluation at noise level `level` (traced).

    levels: the sampler's decreasing schedule, (steps + 1,) sigmas ending in 0 (or the
    matching UNet timesteps, if the caller sees timesteps: any decreasing map of sigma works).
    Step i runs from levels[i] down to levels[i + 1]; an evaluation at a level in
    (levels[i + 1], levels[i]] -- its start, or a Heun/DPM2 midpoint -- belongs to step i.
    step_scales: (steps,) or (steps, n_controlnets), from `controlnet_step_scales`. For
    img2img starting at step `start`, compute them for the `steps - start` steps run (as
    diffusers does) and left-pad with `start` zero rows.
    level may be a scalar or any array of equal values (e.g. the (2B,) timesteps); returns
    step_scales[i] (scalar or (n_controlnets,)), float32.
    """
    level = jnp.max(jnp.asarray(level, jnp.float32))
    steps = step_scales.shape[0]
    i = jnp.sum(jnp.asarray(levels, jnp.float32)[1:steps] >= level)
    return jnp.asarray(step_scales, jnp.float32)[jnp.clip(i, 0, steps - 1)]


def residuals_hook(static: tuple, control: dict, levels: jax.Array, record: bool = False) -> Callable:
    """`hook(x_scaled (2B,h,w,4), t (2B,), context (2B,L,D)) -> {down_residuals, mid_residual}`
    for `guided_denoiser`. static: ((ControlNet graphdef, guess_mode), ...); control: the traced
    {"states", "images", "scales"} (`Inputs.control`); levels: the UNet timesteps of the sigma
    schedule, (steps+1,), to find the step of an evaluation (`scale_at`).

    As diffusers: our CFG batch is [cond, uncond], so the image is repeated to 2B; guess mode runs
    the ControlNet on the cond half only and gives the uncond half zero residuals; several
    ControlNets' residuals are summed."""

    def hook(x_scaled, t, context):
        b = x_scaled.shape[0] // 2
        scales = scale_at(t, levels, control["scales"])
        if record:
            jax.debug.callback(_record_callback, t[0], scales)
        outputs = []
        for j, (graphdef, guess) in enumerate(static):
            net = nnx.merge(graphdef, control["states"][j])
            image = jnp.broadcast_to(control["images"][j], (b,) + control["images"][j].shape[1:])
            if guess:  # cond half only (our CFG batch is [cond, uncond]); uncond gets zeros
                down, mid = net(x_scaled[:b], t[:b], context[:b], image, scales[j], guess_mode=True)
                down = [jnp.concatenate([r, jnp.zeros_like(r)], axis=0) for r in down]
                mid = jnp.concatenate([mid, jnp.zeros_like(mid)], axis=0)
            else:
                down, mid = net(x_scaled, t, context, jnp.concatenate([image, image], axis=0), scales[j])
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
            residuals = residuals_hook(spec.controlnets, inputs.control, levels, spec.record_control)
        denoise = guided_denoiser(model, unet, inputs.cond, inputs.uncond, inputs.cfg_scale, extra,
                                  residuals=residuals, timestep_mode=spec.timestep_mode)
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
        self.record: list[Callable[[float, np.ndarray], None]] = []

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


def _progress_callback(i, *_):
    for fn in list(_HOOKS.progress):
        fn(int(i))


def _record_callback(t, scales):
    for fn in list(_HOOKS.record):
        fn(float(t), np.asarray(scales))


def progress_hook(fn: Callable[[int], None] | None):
    """Context manager: while active, `fn(step_index)` is called on the host after each sampler
    step of a function built with `Spec(progress=True)`."""
    return _HOOKS.installed("progress", fn)


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
