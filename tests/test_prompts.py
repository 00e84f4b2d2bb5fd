"""Prompt parsing and chunking against AUTOMATIC1111's documented behaviour and the real tokenizers."""

import numpy as np
import pytest
import torch
from conftest import reference
from transformers import CLIPTokenizer

import jax
import jax.numpy as jnp

from sdjax.prompts import (
    PromptError,
    PromptTokens,
    apply_emphasis,
    encode_prompt,
    extract_lora_tags,
    pad_to_same_chunks,
    parse_prompt_attention,
    tokenize_prompt,
)

R, S = 1.1, 1 / 1.1

# (prompt, expected pieces). The first six are A1111's own docstring examples.
ATTENTION_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("", [("", 1.0)]),
    ("[word]", [("word", S)]),
    ("[[word]]", [("word", S * S)]),
    ("((word))", [("word", R * R)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 1.3 )", [("word", 1.3)]),
    ("(word:-0.5)", [("word", -0.5)]),
    ("(a (b:2) c)", [("a ", 1.1), ("b", 2 * 1.1), (" c", 1.1)]),
    ("[a (b) c]", [("a ", S), ("b", R * S), (" c", S)]),
    ("a) b", [("a) b", 1.0)]),  # unmatched closer is text
    ("a] b", [("a] b", 1.0)]),
    ("[unbalanced", [("unbalanced", S)]),
    ("((a) b", [("a", R * R), (" b", R)]),
    ("(a:1.3", [("a:1.3", 1.1)]),  # no ")" so the colon is text
    ("a:b", [("a:b", 1.0)]),
    ("[a:b:0.5]", [("a:b:0.5", S)]),  # prompt editing is not emphasis syntax
    ("back\\\\slash", [("back\\slash", 1.0)]),
    ("lone\\ slash", [("lone slash", 1.0)]),  # A1111 drops a lone backslash
    ("\\(a\\) (b)", [("(a) ", 1.0), ("b", 1.1)]),
    ("(a)(b:1.1)", [("ab", 1.1)]),  # 1.0 * 1.1 == 1.1 exactly, so they merge...
    ("(a)((b:1.0))", [("ab", 1.1)]),
    ("(a:1.21)((b))", [("a", 1.21), ("b", 1.2100000000000002)]),  # ...but float rounding may not
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a BREAKfast break b", [("a BREAKfast break b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111 quirk: no longer a break
    ("x BREAK (y)", [("x", 1.0), ("BREAK", -1.0), ("", 1.0), ("y", 1.1)]),
]


@pytest.mark.parametrize("prompt,expected", ATTENTION_CASES)
def test_parse_prompt_attention_matches_a1111(prompt, expected):
    got = parse_prompt_attention(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    for (_, w), (_, w_expected) in zip(got, expected):
        assert w == pytest.approx(w_expected, rel=1e-12, abs=0)
    # Docstring weights are exact floats: compare them bit for bit.
    if prompt.startswith("a (((house"):
        assert got == expected


def test_parse_prompt_attention_bad_weight_names_the_piece():
    with pytest.raises(PromptError, match=r"1\.\.2"):
        parse_prompt_attention("(a:1..2)")


def test_parse_prompt_attention_random_prompts_keep_all_plain_text():
    """Property: without brackets/escapes/BREAK the text comes back whole at weight 1."""
    rng = np.random.default_rng(0)
    alphabet = list("abc xyz,.:;!?-_'\"\n0123456789")
    for _ in range(200):
        prompt = "".join(rng.choice(alphabet, size=rng.integers(0, 40)))
        assert parse_prompt_attention(prompt) == [(prompt, 1.0)]
    brackets = list("ab ()[]:1.\\")
    parsed = weighted = 0
    for _ in range(300):
        prompt = "".join(rng.choice(brackets, size=rng.integers(0, 30)))
        try:
            got = parse_prompt_attention(prompt)
        except PromptError:
            continue  # e.g. "(a:1.1.)": A1111 raises too
        parsed += 1
        weighted += len(got) > 1
        assert len(got) >= 1
        for (_, w1), (_, w2) in zip(got, got[1:]):
            assert w1 != w2  # equal neighbours are merged
    # The property was checked on many prompts, many of them with several weights: a parser
    # that raised on everything would otherwise pass this loop having tested nothing.
    assert parsed >= 250 and weighted >= 100, (parsed, weighted)


@pytest.fixture(scope="module")
def tok15():
    return CLIPTokenizer.from_pretrained(reference("sd15") / "tokenizer")


@pytest.fixture(scope="module")
def tok21():
    return CLIPTokenizer.from_pretrained(reference("sd21") / "tokenizer")


def _words(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("folder", ["sd15/tokenizer", "sd21/tokenizer", "sdxl-base/tokenizer", "sdxl-base/tokenizer_2"])
def test_short_prompt_matches_standard_padded_tokenization(folder):
    """A one-chunk prompt equals diffusers' `padding="max_length"` ids (EOS pad for CLIP-L, `!` for OpenCLIP)."""
    name, sub = folder.split("/")
    tok = CLIPTokenizer.from_pretrained(reference(name) / sub)
    for prompt in ["a photo of an astronaut riding a horse on mars", "", "hello, world!"]:
        got = tokenize_prompt(tok, prompt)
        want = tok(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert got.ids.dtype == np.int32 and got.weights.dtype == np.float32
        assert got.ids.shape == (1, 77)
        np.testing.assert_array_equal(got.ids[0], want)
        np.testing.assert_array_equal(got.weights, np.ones((1, 77), np.float32))


def test_sd2_pads_with_pad_id_after_first_eos(tok21):
    got = tokenize_prompt(tok21, "a cat")
    assert tok21.pad_token_id == 0 and tok21.eos_token_id == 49407
    n = len(_words(tok21, "a cat"))
    assert got.ids[0, n + 1] == 49407
    assert (got.ids[0, n + 2 :] == 0).all()


def test_weights_follow_emphasis(tok15):
    got = tokenize_prompt(tok15, "a (red:1.3) [cat]")
    ids = [tok15.bos_token_id] + _words(tok15, "a") + _words(tok15, "red") + _words(tok15, "cat")
    np.testing.assert_array_equal(got.ids[0, : len(ids)], ids)
    np.testing.assert_allclose(got.weights[0, :5], [1.0, 1.0, 1.3, 1 / 1.1, 1.0], rtol=1e-6)
    # Emphasis "None": brackets are text and every weight is 1.
    plain = tokenize_prompt(tok15, "a (red:1.3) [cat]", emphasis=False)
    np.testing.assert_array_equal(plain.ids[0, 1:-1][plain.ids[0, 1:-1] != 49407], _words(tok15, "a (red:1.3) [cat]"))
    assert (plain.weights == 1).all()


def test_long_prompt_splits_into_75_token_chunks(tok15):
    words = _words(tok15, "cat " * 100)
    assert len(words) == 100
    got = tokenize_prompt(tok15, "cat " * 100)
    assert got.ids.shape == (2, 77)
    bos, eos = tok15.bos_token_id, tok15.eos_token_id
    assert (got.ids[:, 0] == bos).all() and (got.ids[:, 76] == eos).all()
    np.testing.assert_array_equal(got.ids[0, 1:76], words[:75])
    np.testing.assert_array_equal(got.ids[1, 1:26], words[75:])
    assert (got.ids[1, 26:] == eos).all()
    # Exactly 75 tokens fit one chunk; 150 fit two.
    assert tokenize_prompt(tok15, "cat " * 75).n_chunks == 1
    assert tokenize_prompt(tok15, "cat " * 150).n_chunks == 2
    assert tokenize_prompt(tok15, "cat " * 151).n_chunks == 3


@pytest.mark.parametrize("comma_at,backtrack,first_len", [(60, 20, 61), (55, 20, 56), (54, 20, 75), (60, 0, 75), (60, 10, 75)])
def test_comma_backtrack(tok15, comma_at, backtrack, first_len):
    """A full chunk moves the words after a comma within its last `backtrack` tokens to the next chunk."""
    prompt = "cat " * comma_at + ", " + "dog " * 30
    words = _words(tok15, prompt)
    assert words[comma_at] == 267 and len(words) == comma_at + 31
    got = tokenize_prompt(tok15, prompt, comma_backtrack=backtrack)
    eos = tok15.eos_token_id
    np.testing.assert_array_equal(got.ids[0, 1 : 1 + first_len], words[:first_len])
    assert (got.ids[0, 1 + first_len :] == eos).all()
    rest = words[first_len:]
    np.testing.assert_array_equal(got.ids[1, 1 : 1 + len(rest)], rest)


def test_break_starts_a_new_chunk(tok15):
    got = tokenize_prompt(tok15, "a red cat BREAK a (blue:1.2) dog")
    assert got.n_chunks == 2
    eos = tok15.eos_token_id
    first = _words(tok15, "a red cat")
    np.testing.assert_array_equal(got.ids[0, 1 : 1 + len(first)], first)
    assert (got.ids[0, 1 + len(first) :] == eos).all()
    np.testing.assert_allclose(got.weights[1, 1:4], [1.0, 1.2, 1.0], rtol=1e-6)
    # Leading BREAK gives an empty first chunk; trailing BREAK adds nothing.
    assert tokenize_prompt(tok15, "BREAK a").n_chunks == 2
    assert tokenize_prompt(tok15, "a BREAK").n_chunks == 1
    # Inside brackets it is the word "break" with A1111's odd weight -1.1.
    quirk = tokenize_prompt(tok15, "(a BREAK b)")
    assert quirk.n_chunks == 1
    np.testing.assert_allclose(quirk.weights[0, 1:4], [1.1, -1.1, 1.1], rtol=1e-6)


def test_pad_to_same_chunks(tok15):
    empty = tokenize_prompt(tok15, "")
    cond = tokenize_prompt(tok15, "cat " * 100)
    uncond = tokenize_prompt(tok15, "blurry")
    c2, u2 = pad_to_same_chunks(cond, uncond, empty)
    assert c2.ids.shape == u2.ids.shape == (2, 77)
    np.testing.assert_array_equal(c2.ids, cond.ids)
    np.testing.assert_array_equal(u2.ids[1], empty.ids[0])
    u3, c3 = pad_to_same_chunks(uncond, cond, empty)
    np.testing.assert_array_equal(u3.ids, u2.ids)
    with pytest.raises(PromptError):
        pad_to_same_chunks(cond, uncond, cond)


@pytest.mark.parametrize(
    "prompt,stripped,loras,n_warn",
    [
        ("a cat <lora:foo:0.8>", "a cat ", [("foo", 0.8)], 0),
        ("<lora:foo>, a cat", ", a cat", [("foo", 1.0)], 0),
        ("<lora:a b-c_1:1.5><lyco:d:-0.25>x", "x", [("a b-c_1", 1.5), ("d", -0.25)], 0),
        ("<lora:foo:te=0.6>", "", [("foo", 0.6)], 0),
        ("<lora:foo:0.6:0.9>", "", [("foo", 0.6)], 1),
        ("<hypernet:bar:1> cat", " cat", [], 1),
        ("no tags (a:1.2)", "no tags (a:1.2)", [], 0),
        ("<lora:foo:1:1:8>", "", [("foo", 1.0)], 1),
    ],
)
def test_extract_lora_tags(prompt, stripped, loras, n_warn):
    got = extract_lora_tags(prompt)
    assert got.prompt == stripped
    assert got.loras == loras
    assert len(got.warnings) == n_warn


def test_extract_lora_tags_bad_multiplier():
    with pytest.raises(PromptError, match="lora:foo:abc"):
        extract_lora_tags("<lora:foo:abc>")


def _a1111_original_emphasis(z, multipliers):
    """A1111 sd_emphasis.EmphasisOriginal on one chunk batch (torch, as written there)."""
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def test_apply_emphasis_matches_a1111_per_chunk():
    rng = np.random.default_rng(1)
    hidden = rng.normal(0.3, 1.0, size=(3, 77, 16)).astype(np.float32)
    weights = rng.uniform(0.5, 1.6, size=(3, 77)).astype(np.float32)
    # A1111 encodes chunk by chunk (batch of one prompt) and hstacks the results.
    want = torch.hstack(
        [_a1111_original_emphasis(torch.from_numpy(hidden[i : i + 1]), torch.from_numpy(weights[i : i + 1])) for i in range(3)]
    ).numpy()
    got = jax.jit(apply_emphasis)(jnp.asarray(hidden), jnp.asarray(weights))
    assert got.shape == (1, 3 * 77, 16) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # Unit weights change nothing.
    same = apply_emphasis(jnp.asarray(hidden), jnp.ones((3, 77)))
    np.testing.assert_allclose(np.asarray(same), hidden.reshape(1, -1, 16), rtol=1e-6)


def test_encode_prompt_applies_encoder_then_emphasis(tok15):
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.normal(size=(tok15.vocab_size, 8)).astype(np.float32))
    calls = []

    def encode_fn(ids, clip_skip):
        calls.append((ids.shape, ids.dtype, clip_skip))
        return table[ids] + clip_skip  # stands in for a CLIP layer choice

    tokens = tokenize_prompt(tok15, "a (red:1.4) cat BREAK on a [mat]")
    got = encode_prompt(encode_fn, tokens, clip_skip=2)
    assert calls == [((2, 77), jnp.int32, 2)]
    want = apply_emphasis(table[jnp.asarray(tokens.ids)] + 2, jnp.asarray(tokens.weights))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert isinstance(tokens, PromptTokens)
    with pytest.raises(PromptError):
        encode_prompt(encode_fn, tokens, clip_skip=0)
