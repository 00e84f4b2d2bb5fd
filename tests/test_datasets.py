"""Caption datasets and the deterministic, resumable loader."""

import json

import numpy as np
import pytest
from PIL import Image

from sdjax.data.datasets import (CaptionLoader, DatasetError, ImageCaptionFolder, JsonlCaptions,
                                 SyntheticCaptions, load_image, open_dataset, preprocess,
                                 write_synthetic_folder)
from sdjax.data.synthetic import SyntheticConfig, sample
from sdjax.errors import SdjaxError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_synthetic_folder(tmp_path_factory.mktemp("synth"), 12, seed=3)


def test_write_synthetic_folder(folder):
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 12 and len(list(folder.glob("*.txt"))) == 12
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for i, record in enumerate(records):
        image, caption, attributes = sample(3, i)
        assert record["caption"] == caption == (folder / f"{i:05d}.txt").read_text().strip()
        assert record["attributes"] == attributes
        assert np.array_equal(np.asarray(Image.open(folder / record["image"])), np.asarray(image))


def test_folder_and_jsonl_agree_with_synthetic(folder):
    by_folder = ImageCaptionFolder(folder, resolution=64)
    by_jsonl = JsonlCaptions(folder / "metadata.jsonl", resolution=64)
    direct = SyntheticCaptions(12, seed=3, resolution=64)
    assert len(by_folder) == len(by_jsonl) == len(direct) == 12
    for i in range(12):
        (a, ca), (b, cb), (c, cc) = by_folder[i], by_jsonl[i], direct[i]
        assert a.dtype == np.float32 and a.shape == (64, 64, 3)
        assert -1.0 <= a.min() and a.max() <= 1.0
        assert ca == cb == cc
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_preprocess_resizes_shorter_side_and_center_crops():
    # 40 x 20 (w x h): left half black, right half white.
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, 20:] = 255
    out = preprocess(array, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.float32
    # Shorter side 20 -> 10, so 40 -> 20 wide; the crop keeps x in [5, 15): the centre.
    assert out[:, :4].max() < -0.9 and out[:, 6:].min() > 0.9
    tall = preprocess(np.full((30, 10, 3), 128, np.uint8), 16)
    assert tall.shape == (16, 16, 3)
    np.testing.assert_allclose(tall, 128 / 127.5 - 1, atol=1e-6)


def test_open_dataset_specs(folder):
    assert isinstance(open_dataset(folder, 32), ImageCaptionFolder)
    assert open_dataset(folder, 32)[0][0].shape == (32, 32, 3)
    assert isinstance(open_dataset(folder / "metadata.jsonl", 32), JsonlCaptions)
    ds = open_dataset("synthetic:5:100:heldout", 32)
    assert isinstance(ds, SyntheticCaptions) and len(ds) == 100 and ds.split == "heldout"
    assert ds[0][0].shape == (32, 32, 3)
    assert len(open_dataset("synthetic", 64)) == 65_536
    with pytest.raises(DatasetError, match="synthetic"):
        open_dataset("synthetic:x", 64)


def test_errors_name_the_file(tmp_path, folder):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="nope"):
        ImageCaptionFolder(missing, 64)
    with pytest.raises(SdjaxError, match="nope.jsonl"):
        JsonlCaptions(tmp_path / "nope.jsonl", 64)

    no_caption = tmp_path / "no_caption"
    no_caption.mkdir()
    Image.new("RGB", (8, 8)).save(no_caption / "cat.png")
    with pytest.raises(DatasetError, match="cat.png"):
        ImageCaptionFolder(no_caption, 64)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dog.png").write_bytes(b"not a png at all")
    (broken / "dog.txt").write_text("a dog")
    ds = ImageCaptionFolder(broken, 64)
    with pytest.raises(DatasetError, match="dog.png"):
        ds[0]
    with pytest.raises(DatasetError, match="dog.png"):
        load_image(broken / "dog.png")

    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"image": "missing.png", "caption": "x"}\n')
    with pytest.raises(DatasetError, match="missing.png"):
        JsonlCaptions(bad_jsonl, 64)
    bad_jsonl.write_text('{"caption": "x"}\n')
    with pytest.raises(DatasetError, match="bad.jsonl:1"):
        JsonlCaptions(bad_jsonl, 64)


def test_transparent_png_over_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png")).min() == 255


def _signature(batch):
    return batch["indices"].tolist(), batch["captions"]


def test_loader_epochs_are_permutations_and_deterministic():
    ds = SyntheticCaptions(10, seed=1, resolution=16)
    loader = CaptionLoader(ds, batch_size=4, seed=7)
    idx = np.concatenate([loader.indices(s)[0] for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:]) == list(range(10))
    assert idx[:10].tolist() != idx[10:].tolist()  # a fresh shuffle per epoch
    assert loader.indices(2)[1].tolist() == [0, 0, 1, 1]  # batch 2 straddles the epochs
    other = CaptionLoader(ds, batch_size=4, seed=7)
    for s in range(5):
        a, b = loader.batch(s), other.batch(s)
        assert _signature(a) == _signature(b)
        np.testing.assert_array_equal(a["images"], b["images"])
    assert CaptionLoader(ds, 4, seed=8).indices(0)[0].tolist() != loader.indices(0)[0].tolist()


def test_loader_resume_continues_exactly():
    ds = SyntheticCaptions(9, seed=2, resolution=16)
    full = CaptionLoader(ds, batch_size=4, seed=3, caption_dropout=0.3)
    stream = full.batches()
    reference = [_signature(next(stream)) for _ in range(8)]
    first = CaptionLoader(ds, batch_size=4, seed=3, caption_dropout=0.3)
    it = iter(first)
    got = [_signature(next(it)) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    resumed = CaptionLoader(ds, batch_size=4, seed=3, caption_dropout=0.3, num_workers=2)
    resumed.load_state_dict(state)
    it = iter(resumed)
    got += [_signature(next(it)) for _ in range(5)]
    assert got == reference
    assert [_signature(b) for b, _ in zip(CaptionLoader(ds, 4, 3, 0.3).batches(5), range(3))] == reference[5:]
    with pytest.raises(DatasetError, match="seed"):
        CaptionLoader(ds, batch_size=4, seed=4, caption_dropout=0.3).load_state_dict(state)


def test_caption_dropout_rate_and_key():
    ds = SyntheticCaptions(50, seed=0, resolution=16)
    loader = CaptionLoader(ds, batch_size=50, seed=1, caption_dropout=0.5)
    batch = loader.batch(0)
    dropped = [c == "" for c in batch["captions"]]
    assert 10 < sum(dropped) < 40
    # Dropout depends on (seed, epoch, index), not on the batch layout.
    small = CaptionLoader(ds, batch_size=5, seed=1, caption_dropout=0.5)
    for s in range(10):
        b = small.batch(s)
        for i, c in zip(b["indices"], b["captions"]):
            assert (c == "") == dropped[batch["indices"].tolist().index(i)]
    assert all(CaptionLoader(ds, 50, seed=1, caption_dropout=0.0).batch(0)["captions"])
    assert not any(CaptionLoader(ds, 50, seed=1, caption_dropout=1.0).batch(0)["captions"])


def test_synthetic_dataset_is_resolution_independent_in_content():
    ds32 = SyntheticCaptions(4, seed=9, split="heldout", resolution=32)
    ds64 = SyntheticCaptions(4, seed=9, split="heldout", resolution=64)
    assert [ds32[i][1] for i in range(4)] == [ds64[i][1] for i in range(4)]
    assert ds32.attributes(0) == sample(9, 0, "heldout", SyntheticConfig(resolution=32))[2]
