"""Pipeline.generate on a tiny random model: traced start, batch invariance, no recompiles,
long/emphasised prompts on the real SD1.5 tokenizer, infotext round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdjax
from sdjax.pipeline import core as generation
from sdjax.pipeline.generator import encode_prompts
from sdjax.metadata import parse_infotext
from sdjax.sampling.samplers import SAMPLERS, sample
from sdjax_tiny import write_tiny_folder

KW = dict(steps=3, width=64, height=64, sampler="euler", schedule="karras")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return sdjax.load_pipeline(write_tiny_folder(tmp_path_factory.mktemp("g") / "tiny"))


def _denoise(x, sigma):
    return (0.5 * sigma**2 + 0.09 * x) / (sigma**2 + 0.09) + 0.05 * jnp.tanh(x)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_start_equals_sampler_on_cut_sigmas(name):
    sigmas = jnp.asarray(np.append(np.geomspace(14.6, 0.03, 5), 0.0), jnp.float32)
    x = jax.random.normal(jax.random.key(0), (2, 2, 2, 3))
    keys = jax.random.split(jax.random.key(1), 2)
    k = 2
    full = jax.jit(lambda x, s, k: sample(name, _denoise, x, s, keys, start=k))(x * sigmas[k], sigmas, k)
    ref = jax.jit(lambda x, s: sample(name, _denoise, x, s, keys))(x * sigmas[k], sigmas[k:])
    np.testing.assert_allclose(np.asarray(full), np.asarray(ref), atol=1e-5)


def test_batch_of_4_equals_4_batches_of_1(pipe):
    batch = pipe.generate(["a", "b", "c", "d"], seed=10, batch_size=4, **KW)
    implicit = pipe.generate(["a", "b", "c", "d"], seed=10, **KW)  # a list of prompts is a batch (diffusers)
    np.testing.assert_array_equal(implicit.latents, batch.latents)
    for i in range(4):
        one = pipe.generate("abcd"[i], seed=10 + i, **KW)
        scale = np.abs(one.latents).max()  # fp32 batch-size rounding, relative to the latent scale
        np.testing.assert_allclose(batch.latents[i], one.latents[0], atol=2e-5 * scale)
        diff = np.abs(np.asarray(batch.images[i], np.int16) - np.asarray(one.images[0], np.int16))
        assert diff.max() <= 1
        assert f"Seed: {10 + i}" in batch.infotexts[i]


def test_no_recompilation_for_prompt_seed_guidance_strength(pipe):
    init = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    runs = [dict(prompt="a cat", seed=1, cfg_scale=7.0, strength=0.75),
            dict(prompt="a dog in the snow", seed=2, cfg_scale=3.0, strength=0.3),
            dict(prompt="(red:1.3) [blue]", seed=3, cfg_scale=9.5, strength=1.0)]
    spec = generation.Spec("euler", "img2img")
    fn = generation.build(pipe.unet.graphdef, pipe.vae.graphdef, pipe._sdjax_discrete_model, spec,
                          pipe.vae.scaling_factor)
    outs = [pipe.generate(init_image=init, **runs[0], **KW)]
    # build() is cached by (graphdef, spec): another test's tiny model of the same shape on this
    # worker may already have compiled it at other sizes, so count compilations from here on.
    compiled = fn._cache_size()
    outs += [pipe.generate(init_image=init, **r, **KW) for r in runs[1:]]
    assert compiled >= 1 and fn._cache_size() == compiled
    assert not np.allclose(outs[0].latents, outs[1].latents)


def test_long_prompt_and_emphasis_encoding(pipe):
    long = ", ".join(["a very small red circle"] * 20)  # > 75 tokens
    cond, uncond = encode_prompts(pipe, [long], ["(blurry:1.4)"])
    n = cond.shape[1] // 77
    assert cond.shape == uncond.shape == (1, n * 77, 32) and n >= 2
    plain, _ = encode_prompts(pipe, ["a red circle"], [""])
    weighted, _ = encode_prompts(pipe, ["a (red:1.5) circle"], [""])
    assert plain.shape == (1, 77, 32)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="np").input_ids
    np.testing.assert_allclose(np.asarray(plain[0]), np.asarray(pipe.text_encoder(ids)[0]), atol=1e-5)
    # The weighted token changes and the chunk mean is restored (A1111 "Original").
    assert not np.allclose(plain, weighted)
    np.testing.assert_allclose(float(jnp.mean(weighted)), float(jnp.mean(plain)), rtol=1e-3, atol=1e-6)


def test_infotext_round_trip(pipe):
    r = pipe.generate("a red, circle: big", negative_prompt="ugly", seed=5, clip_skip=2, cfg_scale=6.5, **KW)
    p = parse_infotext(r.infotexts[0])
    assert p["Prompt"] == "a red, circle: big" and p["Negative prompt"] == "ugly"
    assert (p["Steps"], p["Sampler"], p["Schedule type"], p["Seed"], p["Clip skip"]) == \
        ("3", "Euler", "Karras", "5", "2")
    assert (p["Size-1"], p["Size-2"], p["CFG scale"]) == ("64", "64", "6.5")


def test_generate_errors(pipe):
    from sdjax.errors import SdjaxError

    with pytest.raises(SdjaxError, match="multiples? of 8"):
        pipe.generate("x", width=60, **{k: v for k, v in KW.items() if k != "width"})
    with pytest.raises(SdjaxError, match="strength"):
        pipe.generate("x", init_image=np.zeros((64, 64, 3), np.uint8), strength=0.0, **KW)
    with pytest.raises(SdjaxError, match="same size"):
        pipe.generate("x", init_image=np.zeros((64, 64, 3), np.uint8), mask=np.ones((32, 32)), **KW)
    with pytest.raises(SdjaxError, match="prompt has 2 entries but batch_size is 3"):
        pipe.generate(["x", "y"], batch_size=3, **KW)
    with pytest.raises(SdjaxError, match="unknown sampler"):
        pipe.generate("x", **{**KW, "sampler": "nope"})
