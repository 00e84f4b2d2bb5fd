"""Every number of a request checked once (`sdjax.pipeline.request.check_request`, used by Pipeline.generate
and the CLI), and NaN/inf decodes retried in float32 once, then refused (issue #21)."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sdjax
from sdjax.cli import EMBEDDED_MODEL
from sdjax.errors import NonFiniteError
from sdjax.pipeline.request import SEED_MAX, Limits, RequestError, check_request

KW = dict(steps=2, sampler="euler", schedule="karras")


@pytest.fixture(scope="module")
def pipe16():
    return sdjax.load_pipeline(EMBEDDED_MODEL, "float16")


@pytest.mark.parametrize("kw,needle", [
    (dict(cfg_scale=math.nan), "cfg_scale must be a finite"),
    (dict(cfg_scale=math.inf), "cfg_scale must be a finite"),
    (dict(strength=0.0), "strength"),
    (dict(strength=1.5), "strength"),
    (dict(strength=math.nan), "strength"),
    (dict(steps=1001), "--max-steps"),
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "whole number"),
    (dict(width=100000, height=100000), "--max-pixels"),
    (dict(width=60), "multiple of 8"),
    (dict(batch_size=65), "--max-batch-size"),
    (dict(seed=2**32), "seed"),
    (dict(seed=10**23), "seed"),
    (dict(seed=-2), "seed"),
    (dict(seed=SEED_MAX, batch_size=2), "largest seed"),
    (dict(subseed=2**32 + 1), "subseed"),
    (dict(knobs={"eta": math.nan}), "eta"),
])
def test_bad_values_raise_naming_the_value(kw, needle):
    with pytest.raises(RequestError, match=None) as e:
        check_request(**kw)
    assert needle in str(e.value)


def test_limits_can_be_raised_and_good_values_pass():
    check_request(steps=1001, width=8192, height=8192, batch_size=100,
                  limits=Limits(max_pixels=8192**2, max_steps=2000, max_batch_size=100))
    check_request(steps=20, cfg_scale=7.0, seed=SEED_MAX, batch_size=1, width=512, height=512, strength=1.0,
                  subseed=0, subseed_strength=0.5, clip_skip=2, knobs={"eta": 1.0, "order": 2})
    check_request(seed=np.int64(5), batch_size=np.int64(2))


def test_generate_refuses_wrapping_seeds_and_nan_cfg():
    """seed 2**32 + 1 used to give seed 1's pixels; a NaN CFG an all-black image."""
    pipe = sdjax.load_pipeline(EMBEDDED_MODEL)
    with pytest.raises(RequestError, match="seed"):
        pipe.generate("a red circle", seed=2**32 + 1, **KW)
    with pytest.raises(RequestError, match="cfg_scale"):
        pipe.generate("a red circle", seed=1, cfg_scale=float("nan"), **KW)
    with pytest.raises(RequestError, match="max-steps"):
        pipe.generate("a red circle", seed=1, steps=5, limits=Limits(max_steps=4), sampler="euler")


def _scaled_vae(state, factor):
    """The VAE state with the decoder's first conv kernel multiplied by `factor` (same dtype)."""
    def fn(path, a):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        hit = names[:2] == ["decoder", "conv_in"] and "kernel" in names
        return (a.astype(jnp.float32) * factor).astype(a.dtype) if hit else a
    return jax.tree_util.tree_map_with_path(fn, state)


def _decoder_kernel_max(state) -> float:
    for path, v in nnx.to_flat_state(state):
        if tuple(map(str, path)) == ("decoder", "conv_in", "kernel"):
            return float(np.abs(np.asarray(v.get_value(), np.float32)).max())
    raise AssertionError("no decoder.conv_in.kernel")


def test_float16_vae_overflow_is_decoded_again_in_float32(pipe16):
    """A float16 VAE whose activations overflow (weights still finite in float16): the images
    come back finite from the float32 retry, with a warning saying so."""
    orig = pipe16.vae.state
    pipe16.vae.state = _scaled_vae(orig, 3e4 / _decoder_kernel_max(orig))
    try:
        assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(pipe16.vae.state))
        with pytest.warns(RuntimeWarning, match="decoding again in float32"):
            result = pipe16.generate("a red circle on a blue background", seed=3, **KW)
        pixels = np.asarray(result.images[0])
        assert pixels.std() > 0  # an image, not a constant fill from NaNs
    finally:
        pipe16.vae.state = orig


def test_nan_vae_weight_retries_then_fails_clearly(pipe16):
    orig = pipe16.vae.state
    pipe16.vae.state = _scaled_vae(orig, float("nan"))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(NonFiniteError, match="even in float32"):
                pipe16.generate("a red circle", seed=3, **KW)
        assert any("decoding again in float32" in str(w.message) for w in caught)  # the retry happened
    finally:
        pipe16.vae.state = orig
