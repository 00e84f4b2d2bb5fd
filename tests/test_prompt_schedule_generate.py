"""Prompt editing in a real generation (tiny random model): `[red:blue:0.5]` equals a hand-built
two-stage run, AND combines sub-prompts as A1111, and new schedules recompile nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sdjax
from sdjax import sampling
from sdjax.pipeline import core
from sdjax.pipeline.generator import encode_prompts
from sdjax_tiny import write_tiny_folder

STEPS = 4
KW = dict(steps=STEPS, width=64, height=64, sampler="euler", schedule="karras", cfg_scale=7.0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return sdjax.load_pipeline(write_tiny_folder(tmp_path_factory.mktemp("ps") / "tiny"))


def _denoiser(pipe, prompt, negative="", cfg_scale=7.0):
    unet = nnx.merge(pipe.unet.graphdef, pipe.unet.state)
    cond, uncond = encode_prompts(pipe, [prompt], [negative])
    return core.guided_denoiser(pipe.generator.discrete_model, unet, cond, uncond, jnp.float32(cfg_scale))


@pytest.mark.slow
def test_edit_equals_two_stage_run(pipe):
    seed = 5
    out = pipe.generate("[red:blue:0.5] cube", negative_prompt="[dull:2]", seed=seed, **KW)
    # Hand-built: A1111 uses "from" while the 0-based step k <= int(0.5 * 4) = 2, so steps 0-2
    # run with "red cube", step 3 with "blue cube"; the negative is "" for k <= 2, then "dull".
    sigmas = sampling.get_sigmas("karras", STEPS, pipe.generator.discrete_model)
    noise, keys = core.initial_noise(np.asarray([seed]), (8, 8, 4))
    first, second = _denoiser(pipe, "red cube"), _denoiser(pipe, "blue cube", "dull")

    run = jax.jit(lambda x: sampling.sample("euler", second, sampling.sample(
        "euler", first, x, sigmas[:4], keys), sigmas[3:], keys))
    expected = np.asarray(run(noise * sigmas[0]))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out.latents, expected, atol=1e-6 * scale)
    # Switching one step early (k <= 1) is measurably different: the test can tell (no recompile).
    early = pipe.generate("[red:blue:0.25] cube", negative_prompt="[dull:1]", seed=seed, **KW)
    assert np.abs(early.latents - expected).max() > 1e-4 * scale


def test_and_combines_weighted_deltas(pipe):
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4)) * 3.0
    sigma = jnp.float32(3.0)
    cfg = 5.0
    unet = nnx.merge(pipe.unet.graphdef, pipe.unet.state)
    (a, b), (u,) = encode_prompts(pipe, ["a cat", "a dog"], [""])[0], encode_prompts(pipe, ["x"], [""])[1]
    model = pipe.generator.discrete_model
    table = jnp.stack([a, b])[None]  # (B=1, S=2, L, D)
    weights = jnp.asarray([[1.2, 0.8]], jnp.float32)
    composed = jax.jit(core.guided_denoiser(model, unet, None, None, jnp.float32(cfg),
                                            conditioning=lambda s: (table, u[None]), weights=weights))(x, sigma)
    # Each sub-prompt alone at cfg 1 is its own x0 prediction; the uncond one at cfg 0.
    single = jax.jit(lambda c, g: core.guided_denoiser(model, unet, c[None], u[None], g)(x, sigma))
    x0_u = single(a, jnp.float32(0.0))
    x0_a, x0_b = single(a, jnp.float32(1.0)), single(b, jnp.float32(1.0))
    expected = x0_u + (x0_a - x0_u) * (1.2 * cfg) + (x0_b - x0_u) * (0.8 * cfg)
    np.testing.assert_allclose(np.asarray(composed), np.asarray(expected), atol=1e-4 * float(jnp.abs(expected).max()))
    assert float(jnp.abs(composed - (x0_u + (x0_a - x0_u) * cfg)).max()) > 1e-2 * float(jnp.abs(expected).max())


def test_and_with_zero_weight_is_the_first_prompt(pipe):
    one = pipe.generate("red cube", seed=3, **KW)
    both = pipe.generate("red cube :1 AND blue sphere :0", seed=3, **KW)
    np.testing.assert_allclose(both.latents, one.latents, atol=2e-5 * np.abs(one.latents).max())
    assert "red cube :1 AND blue sphere :0" in both.infotexts[0]


def test_no_recompile_across_scheduled_prompts(pipe, no_persistent_cache):
    prompts = [("red cube", ""), ("[red:blue:0.5] cube", "[ugly:2]"), ("[red|blue|green] cube", "bad"),
               ("a[b:[c:d:2]:1]e", "[x::0.25]"), ("(red:1.3) [cube:sphere:3]", "")]
    fn = core.build(pipe.unet.graphdef, pipe.vae.graphdef, pipe.generator.discrete_model, core.Spec("euler"),
                    pipe.vae.scaling_factor)
    outs = [pipe.generate(*prompts[0], seed=1, **KW)]
    compiled = fn._cache_size()  # the function's compilations so far (other tests share it)
    compiles = []  # every XLA compilation in this process, the text encoder's and eager ops' too

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration" and listening:
            compiles.append(event)

    listening = True
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outs += [pipe.generate(p, negative_prompt=n, seed=1, **KW) for p, n in prompts[1:]]
    finally:
        listening = False
        unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
        if unregister is not None:
            unregister(listener)
    assert fn._cache_size() == compiled
    assert compiles == []
    assert len({o.latents.tobytes() for o in outs}) == len(prompts)
