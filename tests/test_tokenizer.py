"""The tiny CLIP-format tokenizer: loads in transformers, same ids, deterministic files."""

import json

import pytest
from conftest import reference

from sdjax.data.synthetic import SyntheticConfig, caption_vocabulary, sample
from sdjax.data.tokenizer import (ALPHABET, BOS, EOS, MODEL_MAX_LENGTH, load_clip_tokenizer, save_clip_tokenizer,
                                  train_merges, train_tokenizer)

FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
TEXTS = [
    "a small red circle at the top left on a blue background",
    "A Large  ORANGE triangle at the bottom right on a white background",
    "a red circle and a green square on a blue background",
    "an unseen zebra, 42 apples!! it's here",
    "",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def test_layout_matches_clip(folder):
    vocab = json.loads((folder / "vocab.json").read_text())
    ids = sorted(vocab.values())
    assert ids == list(range(len(vocab)))
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1
    assert vocab["!"] == 0 and vocab["!</w>"] == len(ALPHABET)
    assert len(vocab) < 600
    lines = (folder / "merges.txt").read_text().splitlines()
    assert lines[0] == "#version: 0.2"
    for line in lines[1:]:
        left, right = line.split(" ")
        assert left + right in vocab
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == MODEL_MAX_LENGTH and config["do_lower_case"] is True
    # The reference CLIP files carry the same keys.
    ref = reference("sd15") / "tokenizer"
    ref_map = json.loads((ref / "special_tokens_map.json").read_text())
    assert json.loads((folder / "special_tokens_map.json").read_text()) == ref_map
    assert (ref / "merges.txt").read_text().splitlines()[0] == lines[0]


def test_caption_words_are_single_tokens(folder):
    tok = load_clip_tokenizer(folder)
    for word in caption_vocabulary(SyntheticConfig()):
        assert tok.encode(word).tokens == [BOS, word + "</w>", EOS], word


@pytest.mark.parametrize("cls_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_transformers_loads_same_ids(folder, cls_name):
    transformers = pytest.importorskip("transformers")
    theirs = getattr(transformers, cls_name).from_pretrained(str(folder))
    ours = load_clip_tokenizer(folder)
    assert theirs.model_max_length == MODEL_MAX_LENGTH
    assert theirs.bos_token == BOS and theirs.eos_token == EOS and theirs.pad_token == EOS
    texts = TEXTS + [sample(0, i)[1] for i in range(20)]
    for text in texts:
        ids = theirs(text).input_ids
        assert ids == ours.encode(text).ids, text
        assert ids[0] == theirs.bos_token_id and ids[-1] == theirs.eos_token_id
    padded = theirs(TEXTS[0], padding="max_length", max_length=MODEL_MAX_LENGTH).input_ids
    assert len(padded) == MODEL_MAX_LENGTH and padded[-1] == theirs.pad_token_id


def test_round_trip(folder):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder))
    for text in TEXTS[:4] + [sample(1, i, "heldout")[1] for i in range(10)]:
        decoded = tok.decode(tok(text).input_ids, skip_special_tokens=True)
        # CLIP decoding puts a space after every word-final token, punctuation included.
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")
        if text.replace(" ", "").isalpha():
            assert decoded == " ".join(text.lower().split())


def test_deterministic_files(tmp_path):
    texts = [sample(5, i)[1] for i in range(200)]
    a = save_clip_tokenizer(tmp_path / "a", train_merges(texts))
    b = save_clip_tokenizer(tmp_path / "b", train_merges(list(texts)))
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_reference_clip_files_load_the_same(tmp_path):
    """load_clip_tokenizer reads the real CLIP files exactly as transformers does."""
    from transformers import CLIPTokenizer

    ref = reference("sd15") / "tokenizer"
    text = "a photo of an astronaut riding a horse, café 123!!"
    assert load_clip_tokenizer(ref).encode(text).ids == CLIPTokenizer.from_pretrained(str(ref))(text).input_ids


def test_rejects_non_ascii_training_text():
    with pytest.raises(ValueError, match="printable ASCII"):
        train_merges(["a café"])
