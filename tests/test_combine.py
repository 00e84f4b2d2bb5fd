"""Requests merged into one batch and split back (`sdjax.pipeline.combine`): which requests may
share a batch, per-image seeds kept, padding to a few batch shapes, host shares."""

import numpy as np
import pytest
from PIL import Image

from sdjax.cli import EMBEDDED_MODEL
from sdjax.errors import RequestError
from sdjax.pipeline import combine
from sdjax.pipeline.generator import GenerationResult
from sdjax.pipeline.load import load_pipeline
from sdjax.pipeline.request import Limits, Request


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(EMBEDDED_MODEL)


def test_batch_key_groups_only_what_one_compiled_call_can_share(pipe):
    base = Request("a cat", seed=1, steps=4, width=64, height=64)
    key = combine.batch_key(pipe, base)
    assert combine.batch_key(pipe, Request("a dog on a hill", negative_prompt="ugly", seed=99, batch_size=3,
                                           steps=4, width=64, height=64)) == key
    for other in (dict(steps=5), dict(width=128), dict(cfg_scale=3.0), dict(sampler="euler"), dict(clip_skip=2),
                  dict(knobs={"eta": 0.5}, sampler="euler_ancestral")):
        assert combine.batch_key(pipe, Request("a cat", **{**dict(seed=1, steps=4, width=64, height=64), **other})) != key
    assert combine.batch_key(pipe, Request("a cat <lora:x:0.5>", seed=1, steps=4, width=64, height=64)) != key
    long = " ".join(["word"] * 100)  # two 75-token chunks: the short prompt's conditioning would change
    assert combine.batch_key(pipe, Request(long, seed=1, steps=4, width=64, height=64)) != key
    img = Image.new("RGB", (64, 64), "red")
    a = combine.batch_key(pipe, Request("x", init_image=img, steps=4))
    assert a == combine.batch_key(pipe, Request("y", init_image=img.copy(), seed=5, steps=4))
    assert a != combine.batch_key(pipe, Request("x", init_image=Image.new("RGB", (64, 64), "blue"), steps=4))
    assert combine.batch_key(pipe, Request("x", noise=np.zeros((1, 8, 8, 4)))) is None


def test_merge_keeps_each_images_seed_and_prompt_and_split_cuts_back():
    a = Request("a", seed=10, batch_size=2, subseed=5, subseed_strength=0.3)
    b = Request(["b", "c", "d"], negative_prompt="n", seed=4_000_000_000, subseed=7, subseed_strength=0.3)
    m = combine.merge([a, b])
    assert m.batch_size == 5 and list(m.prompt) == ["a", "a", "b", "c", "d"]
    assert list(m.negative_prompt) == ["", "", "n", "n", "n"]
    assert combine.seeds_of(m) == ([10, 11, 4_000_000_000, 4_000_000_001, 4_000_000_002], [5, 6, 7, 8, 9])
    p = combine.pad(m, combine.bucket(5, 32))
    assert p.batch_size == 8 and combine.seeds_of(p)[0][5:] == [4_000_000_002] * 3 and list(p.prompt)[-1] == "d"
    result = GenerationResult([Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(8)], np.arange(8.0),
                              [f"t{i}" for i in range(8)], list(range(8)))
    parts = combine.split(result, [2, 3])
    assert [r.infotexts for r in parts] == [["t0", "t1"], ["t2", "t3", "t4"]]
    assert parts[1].images[0].getpixel((0, 0)) == (2, 0, 0)
    with pytest.raises(RequestError, match="seeds has 1 entries"):
        Request("x", seeds=[1], batch_size=2)
    with pytest.raises(RequestError, match="seeds"):
        Request("x", seeds=[2**33])


def test_buckets_and_host_ranges():
    assert [combine.bucket(n, 32) for n in (1, 2, 3, 5, 8, 9, 31, 32, 40)] == [1, 2, 4, 8, 8, 16, 32, 32, 40]
    assert combine.bucket(7, 6) == 7  # never below n, never above the cap otherwise
    for n in range(0, 12):
        for count in (1, 2, 3, 5):
            ranges = [combine.host_range(n, i, count) for i in range(count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(count - 1))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
    small = Limits(max_batch_size=2)  # each request within its limit; the merged batch is the server's
    assert combine.pad(combine.merge([Request("a", limits=small), Request("b", batch_size=2, limits=small)]),
                       4).batch_size == 4
    m = combine.slice_request(Request(["a", "b", "c"], seed=3), 1, 3)
    assert list(m.prompt) == ["b", "c"] and combine.seeds_of(m)[0] == [4, 5]
