"""ComfyUI's sampler and scheduler list, as issue 18 writes it: every name resolves, and every
sampler runs a 4-step txt2img on the embedded tiny model without recompiling across seeds and CFG."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdjax
from sdjax import sampling
from sdjax.pipeline import core
from sdjax.pipeline.generator import encode_prompts

EMBEDDED = Path(sdjax.__file__).parent / "assets" / "tiny"

# ComfyUI's 2025 list, as written in the issue ("x(_y)" is x and x_y; "(+ _cfg_pp, ancestral)" of
# res_multistep is res_multistep_cfg_pp, res_multistep_ancestral and ComfyUI's
# res_multistep_ancestral_cfg_pp).
COMFY_LIST = ("euler, euler_cfg_pp, euler_ancestral(_cfg_pp), heun, heunpp2, dpm_2(_ancestral), lms, "
              "dpm_fast, dpm_adaptive, dpmpp_2s_ancestral(_cfg_pp), dpmpp_sde, dpmpp_2m(_cfg_pp), "
              "dpmpp_2m_sde(_heun), dpmpp_3m_sde, ddpm, lcm, ipndm, ipndm_v, deis, "
              "res_multistep (+ _cfg_pp, ancestral), gradient_estimation(_cfg_pp), er_sde, seeds_2, "
              "seeds_3, sa_solver, sa_solver_pece, ddim, uni_pc, uni_pc_bh2")
COMFY_SCHEDULERS = ("simple, sgm_uniform, karras, exponential, ddim_uniform, beta, normal, linear_quadratic, "
                    "kl_optimal, plus AYS and GITS")


def comfy_sampler_names() -> list[str]:
    names = []
    for item in re.split(r",\s*(?![^()]*\))", COMFY_LIST):
        if item.startswith("res_multistep"):
            names += ["res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
                      "res_multistep_ancestral_cfg_pp"]
            continue
        m = re.fullmatch(r"(\w+?)\((_\w+)\)", item)
        names += [m.group(1), m.group(1) + m.group(2)] if m else [item]
    return names


def test_the_list_parses_to_comfyui_names():
    names = comfy_sampler_names()
    assert len(names) == len(set(names)) == 38
    assert {"euler_ancestral_cfg_pp", "dpmpp_2m_sde_heun", "uni_pc_bh2", "dpm_2_ancestral"} <= set(names)


def test_every_comfyui_name_resolves():
    ids = {sampling.resolve(n, "karras")[0] for n in comfy_sampler_names()}
    assert ids <= set(sampling.SAMPLERS)
    model = sampling.DiscreteModel(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedulers = COMFY_SCHEDULERS.replace("plus ", "").replace(" and ", ", ").split(", ")
    for name in schedulers:
        sigmas = sampling.get_sigmas(name, 10, model)
        assert sigmas[-1] == 0 and np.all(np.diff(sigmas) < 0), name
        assert sampling.resolve("euler", name)[1] in sampling.SCHEDULES


@pytest.fixture(scope="module")
def tiny():
    pipe = sdjax.load_pipeline(EMBEDDED)
    cond, uncond = encode_prompts(pipe, ["a red circle on a blue background"], [""])
    model = sampling.DiscreteModel.from_config(pipe.scheduler_config)
    return pipe, cond, uncond, model


class _Compiles:
    """Counts XLA backend compilations while active."""

    def __init__(self):
        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if "backend_compile" in event:
            self.n += 1


@pytest.mark.slow
def test_every_comfyui_sampler_runs_4_steps_on_the_tiny_model_without_recompiling(tiny, no_persistent_cache):
    """Per sampler, one jitted txt2img sampling function (the embedded model's guided denoiser,
    the sampler's scan, 4 steps of the "normal" schedule, 16 px / 2x2 latents) with the seeds
    (noise and sampler keys) and the CFG scale traced: a second and third call with new ones
    compile nothing. To keep 38 compilations cheap, the UNet is compiled once and called from
    every sampler through `jax.pure_callback` (the same weights and math, one compilation)."""
    from flax import nnx

    pipe, cond, uncond, model = tiny
    counter = _Compiles()
    sigmas = jnp.asarray(sampling.get_sigmas("normal", 4, model))
    graph, state = pipe.unet.graphdef, pipe.unet.state
    unet_jit = jax.jit(lambda s, x, t, c: nnx.merge(graph, s)(x, t, c))

    def unet(x, t, c):
        return jax.pure_callback(lambda *a: np.asarray(unet_jit(state, *a)),
                                 jax.ShapeDtypeStruct(x.shape, x.dtype), x, t, c)

    def make(sampler_id):
        @jax.jit
        def run(cond, uncond, cfg_scale, seeds):
            keys = core.image_keys(seeds)
            noise = jax.vmap(lambda k: jax.random.normal(k, (2, 2, 4)))(keys)
            denoise = core.guided_denoiser(model, unet, cond, uncond, cfg_scale)
            return sampling.sample(sampler_id, denoise, noise * sigmas[0], sigmas, keys)
        return run

    outs = {}
    for name in comfy_sampler_names():
        sampler_id, _ = sampling.resolve(name)
        run = make(sampler_id)
        a = run(cond, uncond, jnp.float32(7.0), jnp.asarray([1], jnp.int32))
        before = counter.n
        b = run(cond, uncond, jnp.float32(3.0), jnp.asarray([2], jnp.int32))
        c = run(cond, uncond, jnp.float32(7.0), jnp.asarray([3], jnp.int32))
        assert counter.n == before, f"{name} compiled again for a new seed or CFG scale"
        assert all(np.isfinite(np.asarray(v)).all() for v in (a, b, c)), name
        assert not np.allclose(a, b) and not np.allclose(a, c), name
        outs[name] = np.asarray(a)
    # CFG++ follows the unguided noise: it differs from its base sampler under guidance.
    assert not np.allclose(outs["euler_cfg_pp"], outs["euler"], atol=1e-4)
    assert not np.allclose(outs["dpmpp_2m_cfg_pp"], outs["dpmpp_2m"], atol=1e-4)


def test_new_knobs_in_a_request():
    """noise_type and the new samplers' knobs pass a Request; noise_type is traced as its index."""
    from sdjax.pipeline.generator import _traced_knob
    from sdjax.pipeline.request import Request, RequestError

    r = Request("a", sampler="seeds_3", knobs={"noise_type": "brownian", "eta": 0.5, "s_noise": 0.9})
    assert r.knobs["noise_type"] == "brownian"
    Request("a", sampler="gradient_estimation", knobs={"ge_gamma": 2.5})
    Request("a", sampler="dpm_adaptive", knobs={"rtol": 1e-3, "atol": 1e-3, "max_steps": 50})
    assert int(_traced_knob("noise_type", "brownian")) == 1 and int(_traced_knob("noise_type", "gaussian")) == 0
    with pytest.raises(RequestError, match="noise_type must be one of"):
        Request("a", sampler="dpmpp_sde", knobs={"noise_type": "pink"})
