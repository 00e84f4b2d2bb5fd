"""Textual-inversion embeddings: files -> vectors -> new tokens and token-embedding rows.

Formats read by `read_embedding`:
- A1111 `.pt` (restricted unpickler, no code runs): `{"string_to_param": {"*": (n, D)}, "name": ...}`;
- `.safetensors` with `emb_params` (n, D) (A1111/kohya), or SDXL-style `clip_l` / `clip_g`
  (`part` picks one, as SDXL's two encoders do; else the one whose width fits the text encoder
  is used: `clip_l` for SD1);
- diffusers `.bin` / `.safetensors`: `{token: (D,) or (n, D)}` (a single entry).

The prompt name of an embedding is the file stem (as in A1111) unless given.
Loading follows diffusers' `load_textual_inversion`: an n-vector embedding NAME
becomes the added tokens NAME, NAME_1, ..., NAME_{n-1}; their vectors become new
rows of the token-embedding matrix at the new token ids; a prompt is expanded
(`expand_prompt`) so that NAME reads NAME NAME_1 ... NAME_{n-1} before tokenizing.

    emb = read_embedding("easynegative.safetensors")
    tokenizer2, te_state2, names = add_embeddings(tokenizer, te_state, [emb])
    ids = tokenizer2(expand_prompt("a cat, easynegative", names, tokenizer2), ...).input_ids
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.errors import CheckpointError
from sdjax.weights.files import read_safetensors
from sdjax.weights.pickle_safe import load_torch_file


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding: prompt `name` and `vectors` float32 (n, D)."""

    name: str
    vectors: np.ndarray

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])


def _as_vectors(arr: Any, source: str) -> np.ndarray:
    v = np.asarray(arr).astype(np.float32)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[0] == 0:
        raise CheckpointError(f"{source}: embedding of shape {tuple(np.asarray(arr).shape)} is not (D,) or (n, D)")
    return v


def parse_embedding(obj: Mapping[str, Any], name: str, *, hidden_size: int | None = None,
                    source: str = "embedding", part: str | None = None) -> Embedding:
    """A loaded embedding file's contents (dict) -> Embedding. Pure.

    hidden_size: the text encoder's width; picks `clip_l` vs `clip_g` and checks the vectors.
    part: "clip_l" or "clip_g" to take that part of an SDXL-style file (SDXL's first or second
    encoder); an SDXL-style file without it raises CheckpointError.
    """
    if part is not None and ("clip_l" in obj or "clip_g" in obj):
        if part not in obj:
            raise CheckpointError(f"{source}: SDXL-style embedding without {part!r} (it has "
                                  f"{', '.join(k for k in ('clip_l', 'clip_g') if k in obj)})")
        obj = {part: obj[part]}
    if "string_to_param" in obj:  # A1111
        params = obj["string_to_param"]
        if not isinstance(params, Mapping) or not params:
            raise CheckpointError(f"{source}: string_to_param is empty")
        vectors = _as_vectors(params.get("*", next(iter(params.values()))), source)
    elif "emb_params" in obj:
        vectors = _as_vectors(obj["emb_params"], source)
    elif "clip_l" in obj or "clip_g" in obj:
        widths = {k: np.asarray(obj[k]).shape[-1] for k in ("clip_l", "clip_g") if k in obj}
        fits = [k for k, w in widths.items() if hidden_size is None or w == hidden_size]
        if not fits:
            raise CheckpointError(f"{source}: SDXL-style embedding with {widths}; none fits the text encoder "
                                  f"width {hidden_size}")
        vectors = _as_vectors(obj[fits[0]], source)
    else:
        tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray) or hasattr(v, "shape")}
        if len(tensors) != 1:
            raise CheckpointError(f"{source}: not a textual-inversion file (expected string_to_param, emb_params, "
                                  f"clip_l, or one {{token: tensor}} entry; found keys {sorted(obj)[:8]})")
        vectors = _as_vectors(next(iter(tensors.values())), source)
    if hidden_size is not None and vectors.shape[1] != hidden_size:
        raise CheckpointError(f"{source}: embedding width {vectors.shape[1]} does not fit the text encoder "
                              f"(width {hidden_size}); it was made for another model family")
    return Embedding(name, vectors)


def read_embedding(path: str | os.PathLike, name: str | None = None, *, hidden_size: int | None = None,
                   part: str | None = None) -> Embedding:
    """An embedding file (.pt, .bin, .safetensors) -> Embedding named `name` (default: file stem);
    `hidden_size`, `part` as `parse_embedding`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"embedding file {path} does not exist")
    if path.suffix == ".safetensors":
        obj: Any = read_safetensors(path)
    elif path.suffix in (".pt", ".bin", ".pth", ".ckpt"):
        obj = load_torch_file(path)
        if isinstance(obj, np.ndarray):
            obj = {"*": obj}
    else:
        raise CheckpointError(f"{path}: unknown embedding file type {path.suffix!r} (.pt, .bin or .safetensors; "
                              "embeddings inside PNG images are not supported)")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return parse_embedding(obj, name or path.stem, hidden_size=hidden_size, source=str(path), part=part)


def _embedding_path(state: nnx.State) -> tuple:
    for path, _ in nnx.to_flat_state(state):
        if path[-2:] == ("token_embedding", "embedding"):
            return path
    raise CheckpointError("the text-encoder state has no embeddings.token_embedding")


def add_embeddings(tokenizer, text_encoder_state: nnx.State, embeddings: Iterable[Embedding]
                   ) -> tuple[Any, nnx.State, dict[str, list[str]]]:
    """Add embeddings as new tokens. Returns (tokenizer copy, new text-encoder state, names).

    The input tokenizer and state are not modified. names: embedding name -> the
    added token strings ([NAME, NAME_1, ...]), for `expand_prompt`. The token
    embedding matrix (V, D) grows to cover the new ids (diffusers' layout: rows
    appended in order), with vectors cast to its dtype. Raises CheckpointError
    if a name is already a token, or a width does not fit.
    """
    tokenizer = copy.deepcopy(tokenizer)
    path = _embedding_path(text_encoder_state)
    flat = dict(nnx.to_flat_state(text_encoder_state))
    table = flat[path].get_value()
    width = table.shape[1]
    rows: dict[int, np.ndarray] = {}
    names: dict[str, list[str]] = {}
    for emb in embeddings:
        if emb.vectors.shape[1] != width:
            raise CheckpointError(f"embedding {emb.name!r} has width {emb.vectors.shape[1]}; the text encoder's "
                                  f"is {width} (an embedding for another model family)")
        tokens = [emb.name] + [f"{emb.name}_{i}" for i in range(1, emb.num_vectors)]
        vocab = tokenizer.get_vocab()
        taken = [t for t in tokens if t in vocab]
        if taken or emb.name in names:
            raise CheckpointError(f"embedding {emb.name!r}: token(s) {taken or [emb.name]} already exist in the "
                                  "tokenizer; rename the file or pass another name")
        tokenizer.add_tokens(tokens)
        for t, vec in zip(tokens, emb.vectors):
            rows[tokenizer.convert_tokens_to_ids(t)] = vec
        names[emb.name] = tokens
    if not rows:
        return tokenizer, text_encoder_state, names
    size = max(table.shape[0], max(rows) + 1)
    extra = np.zeros((size - table.shape[0], width), np.float32)
    for i, vec in rows.items():
        if i < table.shape[0]:
            raise CheckpointError(f"new token id {i} falls inside the existing embedding table "
                                  f"({table.shape[0]} rows); the tokenizer and text encoder disagree")
        extra[i - table.shape[0]] = vec
    new_table = jnp.concatenate([table, jnp.asarray(extra, table.dtype)], axis=0)
    state = nnx.from_flat_state([(p, var.replace(new_table) if p == path else var) for p, var in flat.items()])
    return tokenizer, state, names


def expand_prompt(prompt: str, names: Mapping[str, list[str]], tokenizer) -> str:
    """Write each multi-vector embedding NAME in `prompt` as `NAME NAME_1 ... NAME_{n-1}`
    (diffusers' `maybe_convert_prompt`), so that tokenizing gives all its token ids."""
    present = set(tokenizer.tokenize(prompt))
    for name, tokens in names.items():
        if len(tokens) > 1 and name in present:
            prompt = prompt.replace(name, " ".join(tokens))
    return prompt


__all__ = ["Embedding", "parse_embedding", "read_embedding", "add_embeddings", "expand_prompt"]
