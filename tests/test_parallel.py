"""One batch across many devices (8 simulated CPU devices): sharded = single-device images,
FSDP-sharded weights = replicated weights, FSDP training (with EMA) = single-device training."""

import jax
import numpy as np
import pytest

import sdjax
from sdjax import parallel
from sdjax.errors import SdjaxError
from sdjax_tiny import write_tiny_folder

# One worker runs the whole module: its module fixtures are costly and then built once.
pytestmark = pytest.mark.xdist_group("test_parallel")

KW = dict(steps=3, width=64, height=64, sampler="euler", schedule="karras")
PROMPTS = ["a red cube", "a blue ball", "green", "", "a cat", "a dog on a hill", "night", "sun"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return sdjax.load_pipeline(write_tiny_folder(tmp_path_factory.mktemp("par") / "tiny"))


@pytest.fixture(scope="module")
def alone(pipe):
    """Each image made on its own, on one device (the reference)."""
    return [pipe.generate(p, seed=100 + i, **KW) for i, p in enumerate(PROMPTS)]


def _assert_same(result, refs):
    assert len(result.images) == len(refs)
    for i, ref in enumerate(refs):
        diff = np.abs(np.asarray(result.images[i], np.int16) - np.asarray(ref.images[0], np.int16))
        assert diff.max() <= 1, f"image {i} differs by {diff.max()}/255"
        scale = np.abs(ref.latents).max()
        np.testing.assert_allclose(result.latents[i], ref.latents[0], atol=2e-5 * scale)
        assert result.seeds[i] == ref.seeds[0]


def _shards_of(pipe):
    """The number of distinct devices holding the placed UNet weights' first leaf."""
    leaf = jax.tree.leaves(pipe._sdjax_placed[3][0])[0]
    return len(leaf.sharding.device_set)


@pytest.mark.parametrize("n", [8, 6])
def test_sharded_batch_equals_single_device(pipe, alone, n):
    assert jax.device_count() == 8
    result = pipe.generate(PROMPTS[:n], seed=100, batch_size=n, devices="all", **KW)
    assert result.latents.shape[0] == n  # 6 was padded to 8 and trimmed
    assert _shards_of(pipe) == 8
    _assert_same(result, alone[:n])


def test_fsdp_weights_equal_replicated(pipe, alone):
    mesh = parallel.make_mesh(data=2, fsdp=4)
    result = pipe.generate(PROMPTS[:4], seed=100, batch_size=4, mesh=mesh, **KW)
    unet_w = pipe._sdjax_placed[3][0]
    specs = {tuple(x.sharding.spec) for x in jax.tree.leaves(unet_w)}
    assert any("fsdp" in s for s in specs), "no UNet weight was sharded over fsdp"
    big = [x for x in jax.tree.leaves(unet_w) if x.size >= 4096]
    # each device holds a quarter of every large weight
    assert all(x.addressable_shards[0].data.size * 4 == x.size for x in big)
    _assert_same(result, alone[:4])
    via_flag = pipe.generate(PROMPTS[:4], seed=100, batch_size=4, devices=8, fsdp=4, **KW)
    np.testing.assert_array_equal(via_flag.latents, result.latents)


def test_device_mesh_and_errors(pipe):
    assert parallel.device_mesh(None) is None and parallel.device_mesh(1) is None
    assert parallel.device_mesh("all").shape == {"data": 8, "fsdp": 1, "tensor": 1}
    assert parallel.device_mesh(4, fsdp=2).shape == {"data": 2, "fsdp": 2, "tensor": 1}
    for bad in (dict(devices=9), dict(devices="many"), dict(devices=6, fsdp=4), dict(devices=0)):
        with pytest.raises(ValueError):
            parallel.device_mesh(**bad)
    with pytest.raises(SdjaxError):
        pipe.generate("x", devices=16, **KW)


def test_fsdp_rules():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    assert parallel.logical_axes((3, 3, 320, 640), mesh, "fsdp") == ("replicated",) * 3 + ("fsdp_shard",)
    assert parallel.logical_axes((1024, 77), mesh, "fsdp") == ("fsdp_shard", "replicated")
    assert parallel.logical_axes((320,), mesh, "fsdp") == ("replicated",)  # too small to shard
    assert parallel.logical_axes((1023, 5), mesh, "fsdp") == ("replicated", "replicated")  # nothing divides
    assert parallel.logical_axes((3, 3, 320, 640), mesh, "replicate") == ("replicated",) * 4
    assert parallel.param_sharding((64, 64), mesh, "fsdp").spec == jax.sharding.PartitionSpec(None, "fsdp")
    with pytest.raises(ValueError):
        parallel.logical_axes((4,), mesh, "zero3")


@pytest.fixture(scope="module")
def mini_model(tmp_path_factory):
    from sdjax.data.tokenizer import train_tokenizer
    from sdjax.train.init import init_pipeline_folder
    from test_train import MINI_SPEC

    root = tmp_path_factory.mktemp("mini")
    return init_pipeline_folder(root / "model", MINI_SPEC, train_tokenizer(root / "tok"), seed=0)


@pytest.mark.slow
def test_fsdp_training_with_ema_equals_single_device(mini_model, tmp_path):
    """Same global batch of 4, EMA on: 1 device vs 2 data x 2 FSDP devices (weights, AdamW
    moments and EMA split over the fsdp axis, the batch over the data axis: both kinds of
    parallelism in one mesh; each mesh compiles its own train step, the cost of this test).
    After each step the EMA equals d_k * ema + (1 - d_k) * params of the same run's weights
    (diffusers' warmup d_k = min(decay, (1 + k) / (10 + k))); losses match the 1-device run to
    fp rounding, weights and EMA to a few learning rates (AdamW amplifies rounding differences
    of the gradients into lr-sized steps)."""
    from sdjax.train.trainer import Trainer
    from test_train import _cfg

    decay, steps = 0.9, 3
    runs, params, emas = {}, {}, {}
    for name, mesh in {"one": parallel.make_mesh(data=1, devices=jax.devices()[:1]),
                       "dp2xfsdp2": parallel.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])}.items():
        t = Trainer(_cfg(mini_model, tmp_path / name, batch_size=4, max_steps=steps, ema_decay=decay),
                    mesh=mesh, log=lambda m: None)
        ema = [np.asarray(x) for x in jax.tree.leaves(t.state["ema"])]
        params0 = [np.asarray(x) for x in jax.tree.leaves(t.state["params"])]
        np.testing.assert_array_equal(ema[0], params0[0])  # EMA starts at the weights
        runs[name] = []
        for k in range(steps):
            runs[name] += [r["loss"] for r in t.run(stop_at=k + 1, progress=False)]
            d = min(decay, (1 + k) / (10 + k))
            now = [np.asarray(x, np.float64) for x in jax.tree.leaves(t.state["params"])]
            ema = [d * e + (1 - d) * p for e, p in zip(ema, now)]
            got = [np.asarray(x) for x in jax.tree.leaves(t.state["ema"])]
            worst = max(np.abs(g - e).max() for g, e in zip(got, ema))
            assert worst < 1e-6, (name, k, worst)
        assert max(np.abs(g - p).max() for g, p in zip(got, params0)) > 1e-4  # the EMA moved with training
        assert len(runs[name]) == steps
        if name != "one":
            assert t.param_mode == "fsdp"
            for tree in (t.state["params"]["unet"], t.state["ema"]):  # most weights and EMA leaves split
                leaves = jax.tree.leaves(tree)
                sharded = [x for x in leaves if "fsdp" in tuple(x.sharding.spec)]
                assert sum(x.size for x in sharded) > 0.9 * sum(x.size for x in leaves)
                assert all(x.addressable_shards[0].data.size * 2 == x.size for x in sharded)
            mu = jax.tree.leaves(t.state["opt_state"])  # AdamW moments sharded as their weights
            assert any("fsdp" in tuple(x.sharding.spec)
                       for x in mu if getattr(x, "ndim", 0) >= 2)
        params[name] = [np.asarray(x) for x in jax.tree.leaves(t.state["params"]["unet"])]
        emas[name] = got
    np.testing.assert_allclose(runs["dp2xfsdp2"], runs["one"], rtol=1e-4)
    for what, trees in (("weights", params), ("EMA", emas)):
        worst = max(np.abs(a - b).max() for a, b in zip(trees["dp2xfsdp2"], trees["one"]))
        assert worst < 1e-2, (what, worst)
