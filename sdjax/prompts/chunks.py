"""Prompt -> CLIP token chunks with per-token weights, as AUTOMATIC1111 builds them.

A1111 lifts CLIP's 77-token limit by cutting the weighted prompt into chunks of
75 tokens, wrapping each as `BOS + 75 tokens + EOS`, encoding every chunk on its
own and concatenating the hidden states along the sequence axis. This module
reproduces its chunking (`modules/sd_hijack_clip.py::tokenize_line`), including:

- `BREAK` (from the attention parser) closes the current chunk early;
- when a chunk is full and a comma appeared within its last
  `comma_backtrack` (A1111 default 20) tokens, the text after that comma moves to
  the next chunk so that a phrase is not split;
- short chunks are padded with EOS; for tokenizers whose pad token differs from
  EOS (OpenCLIP: SD2.x, SDXL's second encoder, pad `!` = id 0) every position
  after the first EOS is then set to the pad id, as A1111 does;
- an empty prompt gives one chunk `BOS EOS EOS ...`.

Textual-inversion embeddings are not handled here.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from sdjax.prompts.emphasis import PromptError, parse_prompt_attention

__all__ = [
    "CHUNK_LENGTH",
    "ExtraNetworkTags",
    "PromptTokens",
    "extract_lora_tags",
    "pad_to_same_chunks",
    "tokenize_prompt",
]

CHUNK_LENGTH = 75  # prompt tokens per chunk; +BOS +EOS = 77, CLIP's context length


class PromptTokens(NamedTuple):
    """One prompt as CLIP chunks.

    ids: int32 (n_chunks, 77) token ids, each row `BOS ... EOS [pad...]`.
    weights: float32 (n_chunks, 77) A1111 emphasis multipliers (1.0 on BOS/EOS/pad).
    """

    ids: np.ndarray
    weights: np.ndarray

    @property
    def n_chunks(self) -> int:
        return int(self.ids.shape[0])


def _special_ids(tokenizer) -> tuple[int, int, int, int | None]:
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    if comma is None or comma == tokenizer.unk_token_id:
        comma = None  # not a CLIP BPE vocabulary: no comma backtracking
    return bos, eos, pad, comma


def tokenize_prompt(
    tokenizer,
    prompt: str,
    *,
    comma_backtrack: int = 20,
    emphasis: bool = True,
) -> PromptTokens:
    """Tokenize `prompt` into A1111 chunks.

    tokenizer: a transformers `CLIPTokenizer` (SD1/SD2/SDXL vocabularies).
    comma_backtrack: A1111's `comma_padding_backtrack` setting (0 disables it).
    emphasis: False is A1111's emphasis "None": brackets and BREAK are plain text.
    Returns `PromptTokens(ids int32 (n, 77), weights float32 (n, 77))`, n >= 1.
    """
    bos, eos, pad, comma = _special_ids(tokenizer)
    parsed = parse_prompt_attention(prompt) if emphasis else [(prompt, 1.0)]
    # One call for all pieces; each piece is tokenized on its own, as in A1111.
    tokenized = tokenizer(
        [text for text, _ in parsed], truncation=False, add_special_tokens=False, verbose=False
    )["input_ids"]

    chunks: list[tuple[list[int], list[float]]] = []
    cur_ids: list[int] = []
    cur_weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal cur_ids, cur_weights, last_comma
        fill = CHUNK_LENGTH - len(cur_ids)
        ids = [bos] + cur_ids + [eos] * fill + [eos]
        weights = [1.0] + cur_weights + [1.0] * fill + [1.0]
        chunks.append((ids, weights))
        cur_ids, cur_weights, last_comma = [], [], -1

    for (text, weight), piece_ids in zip(parsed, tokenized):
        if text == "BREAK" and weight == -1:
            close_chunk()
            continue
        for token in piece_ids:
            if token == comma:
                last_comma = len(cur_ids)
            elif (
                comma_backtrack != 0
                and len(cur_ids) == CHUNK_LENGTH
                and last_comma != -1
                and len(cur_ids) - last_comma <= comma_backtrack
            ):
                # Move the words after the last comma into the next chunk.
                cut = last_comma + 1
                moved_ids, moved_weights = cur_ids[cut:], cur_weights[cut:]
                cur_ids, cur_weights = cur_ids[:cut], cur_weights[:cut]
                close_chunk()
                cur_ids, cur_weights = moved_ids, moved_weights
            if len(cur_ids) == CHUNK_LENGTH:
                close_chunk()
            cur_ids.append(token)
            cur_weights.append(float(weight))

    if cur_ids or not chunks:
        close_chunk()

    ids = np.asarray([c[0] for c in chunks], dtype=np.int32)
    weights = np.asarray([c[1] for c in chunks], dtype=np.float32)
    if pad != eos:
        # OpenCLIP pads with its own id after the end token (A1111 process_tokens).
        for row in ids:
            first_eos = int(np.argmax(row == eos))
            row[first_eos + 1 :] = pad
    return PromptTokens(ids, weights)


def pad_to_same_chunks(
    a: PromptTokens, b: PromptTokens, empty: PromptTokens
) -> tuple[PromptTokens, PromptTokens]:
    """Give cond and uncond the same number of chunks, as classifier-free guidance needs.

    The shorter one is extended with copies of `empty` (= `tokenize_prompt(tok, "")`),
    which is what A1111's `pad_cond_uncond` does with the encoded empty prompt.
    """
    if empty.n_chunks != 1:
        raise PromptError(f"`empty` must be the one-chunk empty prompt, got {empty.n_chunks} chunks")

    def extend(t: PromptTokens, n: int) -> PromptTokens:
        extra = n - t.n_chunks
        if extra <= 0:
            return t
        return PromptTokens(
            np.concatenate([t.ids, np.repeat(empty.ids, extra, axis=0)]),
            np.concatenate([t.weights, np.repeat(empty.weights, extra, axis=0)]),
        )

    n = max(a.n_chunks, b.n_chunks)
    return extend(a, n), extend(b, n)


# A1111 extra-network syntax `<kind:arg1:arg2...>` (modules/extra_networks.py).
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = ("lora", "lyco")  # A1111 treats `lyco` as an alias of `lora`


class ExtraNetworkTags(NamedTuple):
    """Result of `extract_lora_tags`.

    prompt: the prompt with every `<kind:...>` tag removed (surrounding text untouched).
    loras: `(name, multiplier)` per `<lora:name[:multiplier]>` tag, in prompt order.
    warnings: one message per tag or option sdjax ignores.
    """

    prompt: str
    loras: list[tuple[str, float]]
    warnings: list[str]


def _number(text: str, tag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PromptError(f"{tag}: multiplier {text!r} is not a number; write e.g. <lora:name:0.8>") from None


def extract_lora_tags(prompt: str) -> ExtraNetworkTags:
    """Strip A1111 extra-network tags and return the LoRAs they ask for.

    `<lora:name>` has multiplier 1.0, `<lora:name:0.8>` 0.8, `<lora:name:te=0.8>`
    also 0.8. A1111 lets a third value (or `unet=`) set a separate UNet multiplier;
    sdjax uses one multiplier for both and warns when they differ. Other kinds
    (`<hypernet:...>`, ...) are removed with a warning.
    """
    loras: list[tuple[str, float]] = []
    warnings: list[str] = []

    def found(match: re.Match) -> str:
        kind, tag = match.group(1), match.group(0)
        if kind not in _LORA_KINDS:
            warnings.append(f"{tag}: extra network type {kind!r} is not supported; tag ignored")
            return ""
        positional, named = [], {}
        for item in match.group(2).split(":"):
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        if not positional or not positional[0]:
            warnings.append(f"{tag}: no LoRA name; tag ignored")
            return ""
        name = positional[0]
        te = _number(positional[1], tag) if len(positional) > 1 else 1.0
        te = _number(named["te"], tag) if "te" in named else te
        unet = _number(positional[2], tag) if len(positional) > 2 else te
        unet = _number(named["unet"], tag) if "unet" in named else unet
        if unet != te:
            warnings.append(f"{tag}: separate UNet multiplier {unet} not supported; using {te} for both")
        ignored = [k for k in named if k not in ("te", "unet")] + (["dyn"] if len(positional) > 3 else [])
        if ignored:
            warnings.append(f"{tag}: options {ignored} not supported; ignored")
        loras.append((name, te))
        return ""

    stripped = _EXTRA_NETWORK.sub(found, prompt)
    return ExtraNetworkTags(stripped, loras, warnings)
