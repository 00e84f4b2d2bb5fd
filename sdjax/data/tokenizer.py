"""A small CLIP-format BPE tokenizer for the tiny model, trained on the caption vocabulary.

The files match the real CLIP tokenizer (openai/clip-vit-large-patch14), so
`transformers.CLIPTokenizer.from_pretrained(folder)` loads them and every sdjax
prompt path works unchanged:

* vocab.json: the base alphabet (printable ASCII, in CLIP's bytes_to_unicode order),
  then the same symbols with the "</w>" end-of-word suffix, then one token per
  merge in merge order, then "<|startoftext|>" and "<|endoftext|>" last;
* merges.txt: the header line "#version: 0.2", then one "left right" merge a line;
* special_tokens_map.json, tokenizer_config.json: as CLIP's (lower-casing,
  model_max_length 77, pad = unk = eos = "<|endoftext|>").

Text outside printable ASCII maps to "<|endoftext|>" (the unknown token), as any
symbol missing from a CLIP vocabulary does. Training runs the `tokenizers` BPE
trainer on the same normalizer and pre-tokenizer as CLIP; its merges are then
re-laid out in CLIP's order, so the files depend only on the input captions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from sdjax.data.synthetic import SyntheticConfig, caption_vocabulary, sample

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"
MODEL_MAX_LENGTH = 77
# CLIP's pre-tokenizer pattern (transformers' CLIPTokenizer, tokenizers backend).
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Printable ASCII: byte-level encoding maps these bytes to themselves.
ALPHABET = [chr(b) for b in range(ord("!"), ord("~") + 1)]

_SPECIAL = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _special(content: str, typed: bool = False) -> dict:
    d = dict(_SPECIAL, content=content)
    return {"__type": "AddedToken", **d} if typed else d


def build_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A `tokenizers.Tokenizer` that behaves as transformers' CLIPTokenizer on these files.

    Encodings add <|startoftext|> ... <|endoftext|>; no padding or truncation.
    """
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix=SUFFIX, fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


def train_merges(texts: Iterable[str], num_merges: int = 400) -> list[tuple[str, str]]:
    """Learn at most `num_merges` BPE merges (fewer if every word is whole by then).

    texts: training captions; every character must be printable ASCII or whitespace.
    """
    texts = list(texts)
    for t in texts:
        bad = sorted({c for c in t.lower() if c not in ALPHABET and not c.isspace()})
        if bad:
            raise ValueError(f"caption {t!r} has characters outside printable ASCII: {bad}")
    # Train on a placeholder vocabulary with the same text pipeline as CLIP.
    tok = build_tokenizer({BOS: 0, EOS: 1}, [])
    tok.post_processor = None
    base = len(ALPHABET) * 2 + 2
    trainer = BpeTrainer(vocab_size=base + num_merges, min_frequency=1, show_progress=False,
                         special_tokens=[BOS, EOS], initial_alphabet=ALPHABET,
                         end_of_word_suffix=SUFFIX, limit_alphabet=len(ALPHABET))
    tok.train_from_iterator(texts, trainer=trainer)
    data = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data]
    return merges[:num_merges]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id layout: alphabet, alphabet + "</w>", merge results, then BOS, EOS."""
    tokens = list(ALPHABET) + [c + SUFFIX for c in ALPHABET]
    seen = set(tokens)
    for left, right in merges:
        if left not in seen or right not in seen:
            raise ValueError(f"merge {left!r} {right!r} uses a token that no earlier merge made")
        if left + right not in seen:
            tokens.append(left + right)
            seen.add(left + right)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def save_clip_tokenizer(out_dir: str | Path, merges: list[tuple[str, str]]) -> Path:
    """Write vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json.

    The bytes depend only on `merges`. Returns the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                    encoding="utf-8")
    special_map = {"bos_token": _special(BOS), "eos_token": _special(EOS), "pad_token": EOS,
                   "unk_token": _special(EOS)}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    config = {
        "add_prefix_space": False, "bos_token": _special(BOS, True),
        "do_lower_case": True, "eos_token": _special(EOS, True), "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH, "pad_token": EOS, "tokenizer_class": "CLIPTokenizer",
        "unk_token": _special(EOS, True),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def load_clip_tokenizer(folder: str | Path) -> Tokenizer:
    """Read a CLIP-format folder (ours or a real CLIP one) into a `tokenizers.Tokenizer`."""
    folder = Path(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return build_tokenizer(vocab, merges)


def default_corpus(num_captions: int = 2000, seed: int = 0) -> list[str]:
    """Captions of both synthetic splits (single and two-shape, template and varied) plus each vocabulary word."""

    config = SyntheticConfig(two_shape_prob=0.3, two_shape_positions=True)
    texts = [sample(seed, i, split, config)[1] for split in ("train", "heldout")
             for i in range(num_captions // 2)]
    # Captions as people write them (training phrasings only), as the tiny model is trained on.
    varied = SyntheticConfig(captions="varied", template_fraction=0.0)
    texts += [sample(seed, i, "train", varied)[1] for i in range(num_captions // 2)]
    return texts + caption_vocabulary(config)


def train_tokenizer(out_dir: str | Path, texts: Iterable[str] | None = None, num_merges: int = 400) -> Path:
    """Train on `texts` (default: `default_corpus()`) and save in CLIP format; returns the folder."""
    merges = train_merges(default_corpus() if texts is None else texts, num_merges)
    return save_clip_tokenizer(out_dir, merges)


if __name__ == "__main__":
    import sys

    print(train_tokenizer(sys.argv[1] if len(sys.argv) > 1 else "tiny_tokenizer"))
