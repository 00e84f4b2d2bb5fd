"""Textual inversion: the same prompt through diffusers' `load_textual_inversion` and through sdjax's
`add_embeddings` must give the same token ids and text-encoder outputs, for each file format."""

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

from sdjax.errors import CheckpointError, UnsafePickleError
from sdjax.weights import diffusers as diffusers_folder
from sdjax.weights.embeddings import add_embeddings, expand_prompt, read_embedding
from test_single_file import write_tiny_folder

WIDTH = 32  # the tiny text encoder's hidden size


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = write_tiny_folder(tmp_path_factory.mktemp("ti") / "sd15", "sd15", seed=11)
    model, _ = diffusers_folder.load_model("text_encoder", folder / "text_encoder")
    tokenizer = diffusers_folder.load_tokenizer(folder / "tokenizer")
    return folder, nnx.split(model), tokenizer


def _write(fmt, path, vectors):
    t = torch.from_numpy(vectors)
    if fmt == "a1111":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(t)},
                    "name": path.stem, "step": 100, "sd_checkpoint": "abc", "sd_checkpoint_name": "m"}, path)
    elif fmt == "emb_params":
        torch_save_file({"emb_params": t}, str(path))
    elif fmt == "clip_l":
        np_save_file({"clip_l": vectors, "clip_g": np.ones((len(vectors), 48), np.float32)}, str(path))
    elif fmt == "diffusers":
        torch.save({path.stem: t[0] if len(t) == 1 else t}, path)
    return path


@pytest.mark.parametrize("fmt,suffix,n", [("a1111", ".pt", 3), ("emb_params", ".safetensors", 2),
                                          ("clip_l", ".safetensors", 2), ("diffusers", ".bin", 1)])
def test_matches_diffusers_load_textual_inversion(setup, tmp_path, fmt, suffix, n):
    import diffusers

    folder, (graphdef, state), tokenizer = setup
    rng = np.random.default_rng(n)
    vectors = rng.standard_normal((n, WIDTH)).astype(np.float32)
    name = f"mystyle{n}"
    path = _write(fmt, tmp_path / f"{name}{suffix}", vectors)
    prompt = f"a photo of {name} on a beach, {name}"

    emb = read_embedding(path, hidden_size=WIDTH)
    assert emb.name == name and emb.vectors.shape == (n, WIDTH)
    tok2, state2, names = add_embeddings(tokenizer, state, [emb])
    text = expand_prompt(prompt, names, tok2)
    ids = np.asarray(tok2([text], padding="max_length", max_length=77, truncation=True).input_ids)
    ours = np.asarray(nnx.merge(graphdef, state2)(ids).last_hidden_state)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    if fmt in ("emb_params", "clip_l"):  # diffusers reads these keys only as a bare tensor
        pipe.load_textual_inversion(torch.from_numpy(vectors), token=name)
    else:
        pipe.load_textual_inversion(str(path), token=name)
    t_text = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    t_ids = pipe.tokenizer([t_text], padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
    np.testing.assert_array_equal(ids, t_ids.numpy())
    assert (ids >= 49408).sum() == 2 * n  # the embedding's n tokens appear twice
    with torch.no_grad():
        theirs = pipe.text_encoder(t_ids)[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    # the inputs are untouched
    assert len(tokenizer) == 49408 and state["embeddings"]["token_embedding"]["embedding"].shape[0] == 49408


def test_two_embeddings_and_conflicts(setup, tmp_path):
    _, (graphdef, state), tokenizer = setup
    a = _write("emb_params", tmp_path / "embaaa.safetensors", np.ones((2, WIDTH), np.float32))
    b = _write("a1111", tmp_path / "embbbb.pt", np.full((1, WIDTH), 2.0, np.float32))
    ea, eb = read_embedding(a), read_embedding(b)
    tok2, state2, names = add_embeddings(tokenizer, state, [ea, eb])
    assert names == {"embaaa": ["embaaa", "embaaa_1"], "embbbb": ["embbbb"]}
    table = np.asarray(state2["embeddings"]["token_embedding"]["embedding"])
    ids = [tok2.convert_tokens_to_ids(t) for t in ("embaaa", "embaaa_1", "embbbb")]
    assert ids == [49408, 49409, 49410] and table.shape == (49411, WIDTH)
    np.testing.assert_array_equal(table[ids], [[1.0] * WIDTH, [1.0] * WIDTH, [2.0] * WIDTH])
    np.testing.assert_array_equal(table[:49408], np.asarray(state["embeddings"]["token_embedding"]["embedding"]))
    with pytest.raises(CheckpointError, match="already exist"):
        add_embeddings(tok2, state2, [ea])
    with pytest.raises(CheckpointError, match="width"):
        read_embedding(a, hidden_size=768)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "ran"))


def test_malicious_pt_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "x": _Evil(str(marker))}, path)
    with pytest.raises(UnsafePickleError):
        read_embedding(path)
    assert not marker.exists()


def test_sdxl_style_width_check():
    from sdjax.weights.embeddings import parse_embedding
    with pytest.raises(CheckpointError, match="SDXL-style"):
        parse_embedding({"clip_g": np.zeros((1, 1280), np.float32)}, "x", hidden_size=768)
