"""LoRAs and textual-inversion embeddings for one generation call (host side).

`apply_networks` turns a batch's prompts plus the caller's LoRA / embedding options into
the weights and tokenizer the call should use, without touching the pipeline's own:

- LoRAs: `<lora:name:m>` tags of the batch's first prompt (A1111 applies the first prompt's
  extra networks to the whole batch), looked up in `lora_dir`, plus explicit `loras=[(path,
  m)]`. They are merged into copies of the UNet and text-encoder states with
  `sdjax.weights.lora.merge` before sampling (no per-step cost). The merged states have the
  shapes and dtypes of the originals, so the jitted functions take them as ordinary traced
  arguments: changing a LoRA or its multiplier never recompiles.
- Embeddings: every file of `embeddings_dir` (files that do not fit the text encoder are
  skipped with a warning, as A1111 skips them) plus explicit `embeddings=[path]` (these must
  fit). Names are file stems; a name used as a word in a prompt gives its vectors
  (`sdjax.weights.embeddings`). The grown token table changes the text encoder's input
  shapes, so a call with embeddings compiles the text encoder once more.

SDXL: LoRAs adapt the UNet and both text encoders (`lora_te1_` / `lora_te2_`, `text_encoder_2.`;
UNet modules in diffusers or SGM names); an embedding needs a part for each encoder (`clip_l` for
the first, `clip_g` for the second, as A1111's and diffusers' SDXL embeddings have), with the same
number of vectors in both.

Infotext, as A1111: `Lora hashes: "name: <12 hex>"` (for .safetensors the sd-scripts / AddNet
hash: SHA-256 of the bytes after the JSON header, or the file's `sshs_model_hash` metadata;
other files: SHA-256 of the whole file) and `TI hashes: "name: <12 hex>"` (SHA-256 of the
whole file) for the embeddings a prompt actually uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from sdjax import prompts as prompt_lib
from sdjax.errors import CheckpointError
from sdjax.weights import embeddings as emb_lib
from sdjax.weights import lora as lora_lib

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


def _sha256(path: Path, offset: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's LoRA short hash (12 hex digits): `sshs_model_hash` from the safetensors
    metadata if present, else for .safetensors the AddNet hash (SHA-256 of everything after
    the 8-byte length and the JSON header), else the SHA-256 of the whole file."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                meta = json.loads(f.read(n)).get("__metadata__") or {}
            except ValueError:
                meta = {}
        if isinstance(meta.get("sshs_model_hash"), str) and meta["sshs_model_hash"]:
            return meta["sshs_model_hash"][:12]
        return _sha256(path, 8 + n)[:12]
    return _sha256(path)[:12]


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of the whole file, first 12 hex digits (A1111's TI short hash)."""
    return _sha256(Path(path))[:12]


def _lora_file(name: str, lora_dir) -> Path:
    if lora_dir is None:
        raise CheckpointError(f"the prompt asks for <lora:{name}:...> but no lora_dir (--lora-dir) was given")
    for ext in (".safetensors", ".pt", ".ckpt", ".bin"):
        path = Path(lora_dir) / f"{name}{ext}"
        if path.is_file():
            return path
    raise CheckpointError(f"LoRA {name!r} not found in {lora_dir} (looked for {name}.safetensors, .pt, .ckpt, .bin)")


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`PATH[:MULT]` (the CLI's --lora) -> (path, multiplier); a path may itself hold ':'.

    CheckpointError when the part after the last ':' is not a number and `text` is not an
    existing file either (`f.safetensors:abc`): the multiplier is the likelier typo."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            mult = float(tail)
        except ValueError:
            if not Path(text).is_file() and "/" not in tail and "\\" not in tail:
                raise CheckpointError(f"--lora {text}: the multiplier {tail!r} is not a number "
                                      f"(use PATH:0.8, or PATH alone for 1)") from None
        else:
            if not math.isfinite(mult):
                raise CheckpointError(f"--lora {text}: the multiplier must be a finite number")
            return head, mult
    return text, 1.0


@dataclasses.dataclass
class AppliedNetworks:
    """What one call uses: `tokenizer`, `te_state`, `unet_state` (merged copies or the
    pipeline's own), `prompts` / `negatives` (embedding names expanded), `infotext` params;
    SDXL also `tokenizer_2`, `te2_state` (the refiner has only these: `tokenizer`, `te_state` None)."""

    tokenizer: Any
    te_state: Any
    unet_state: Any
    prompts: list[str]
    negatives: list[str]
    infotext: dict[str, Any]
    tokenizer_2: Any = None
    te2_state: Any = None


# Text encoder -> (tokenizer attribute, SDXL embedding part).
_ENCODERS = {"text_encoder": ("tokenizer", "clip_l"), "text_encoder_2": ("tokenizer_2", "clip_g")}


def _encoders(pipe) -> list[str]:
    return [name for name in _ENCODERS if getattr(pipe, name, None) is not None]


def _read_embeddings(pipe, paths: Sequence[Path], required: bool, cache: dict
                     ) -> list[tuple[dict[str, emb_lib.Embedding], Path]]:
    """Each file as {text encoder: Embedding} (one per encoder of the pipeline)."""
    sdxl = getattr(pipe, "family", "sd") != "sd"
    out = []
    for path in paths:
        key = (str(path.resolve()), path.stat().st_mtime_ns, tuple(_encoders(pipe)))
        if key not in cache:
            try:
                per = {name: emb_lib.read_embedding(path, hidden_size=int(getattr(pipe, name).config.hidden_size),
                                                    part=_ENCODERS[name][1] if sdxl else None)
                       for name in _encoders(pipe)}
                if len({e.num_vectors for e in per.values()}) > 1:
                    raise CheckpointError(f"{path}: its parts have different numbers of vectors "
                                          f"({', '.join(f'{k}: {e.num_vectors}' for k, e in per.items())})")
                cache[key] = per
            except CheckpointError as e:
                if required:
                    raise
                warnings.warn(f"embedding {path.name} skipped: {e}", stacklevel=3)
                cache[key] = None
        if cache[key] is not None:
            out.append((cache[key], path))
    return out


def apply_networks(pipe, prompts: Sequence[str], negatives: Sequence[str], *, lora_dir=None,
                   loras: Sequence[str | tuple[str, float]] | None = None, lora_strict: bool = True,
                   embeddings: Sequence[str | os.PathLike] | None = None, embeddings_dir=None,
                   embedding_cache: dict | None = None, lora_cache: dict | None = None) -> AppliedNetworks:
    """Resolve and apply LoRAs and embeddings for one batch; see the module docstring.

    loras: explicit files, each a path, `"PATH:MULT"` or (path, multiplier); prompt tags
    `<lora:name:m>` are resolved in `lora_dir`. lora_strict: LoRA modules that match no
    weight raise CheckpointError listing them (False: one warning, skipped).
    embedding_cache, lora_cache: files read before, kept by the caller (a `Generator`) per
    (path, mtime); None reads every file again.
    Raises CheckpointError for missing files, unmatched keys, unusable embeddings.
    """
    embedding_cache = {} if embedding_cache is None else embedding_cache
    lora_cache = {} if lora_cache is None else lora_cache
    prompts, negatives = list(prompts), list(negatives)
    infotext: dict[str, Any] = {}
    toks = {name: getattr(pipe, _ENCODERS[name][0]) for name in _encoders(pipe)}
    te_states = {name: getattr(pipe, name).state for name in _encoders(pipe)}
    unet_state = pipe.unet.state

    # Embeddings first: they change the text encoder's token table, LoRAs its other weights.
    files = [Path(p) for p in (embeddings or [])]
    found = []
    if embeddings_dir is not None:
        d = Path(embeddings_dir)
        if not d.is_dir():
            raise CheckpointError(f"embeddings folder {d} does not exist")
        found = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES)
    for p in files:
        if not p.is_file():
            raise CheckpointError(f"embedding file {p} does not exist")
    embs = (_read_embeddings(pipe, files, True, embedding_cache)
            + _read_embeddings(pipe, [p for p in found if p not in files], False, embedding_cache))
    if embs:
        unique = {}
        for per, path in embs:
            unique.setdefault(next(iter(per.values())).name, (per, path))  # explicit files first win a clash
        for enc in toks:
            toks[enc], te_states[enc], names = emb_lib.add_embeddings(toks[enc], te_states[enc],
                                                                      [per[enc] for per, _ in unique.values()])
        tokenizer = next(iter(toks.values()))  # every encoder got the same token names
        used = set()
        for text in prompts + negatives:
            present = set(tokenizer.tokenize(prompt_lib.extract_lora_tags(text).prompt))
            used |= {n for n in names if n in present}
        prompts = [emb_lib.expand_prompt(t, names, tokenizer) for t in prompts]
        negatives = [emb_lib.expand_prompt(t, names, tokenizer) for t in negatives]
        ti = {name: file_hash(path) for name, (_, path) in unique.items() if name in used}
        if ti:
            infotext["TI hashes"] = ti

    requests: list[tuple[str, Path, float, float]] = []
    if prompts:
        tags = prompt_lib.extract_lora_tags(prompts[0])
        for w in tags.warnings:
            warnings.warn(w, stacklevel=3)
        for req in tags.loras:
            name, unet_m, te_m = (req[0], req[1], req[1]) if len(req) == 2 else req
            requests.append((name, _lora_file(name, lora_dir), float(unet_m), float(te_m)))
    for item in loras or []:
        if isinstance(item, os.PathLike):  # a bare path: multiplier 1
            item = (item, 1.0)
        path, mult = parse_lora_arg(item) if isinstance(item, str) else (str(item[0]), float(item[1]))
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"LoRA file {path} does not exist")
        requests.append((path.stem, path, mult, mult))
    if requests:
        cache = lora_cache
        merge_input, hashes = [], {}
        for name, path, unet_m, te_m in requests:
            key = (str(path.resolve()), path.stat().st_mtime_ns, lora_strict)
            if key not in cache:
                cache[key] = (lora_lib.read_lora(path, name, strict=lora_strict), lora_hash(path))
            lora, digest = cache[key]
            merge_input.append((lora, unet_m, te_m))
            hashes[name] = digest
        merged, _ = lora_lib.merge({"unet": unet_state, **te_states}, merge_input, strict=lora_strict,
                                   unet_config=dataclasses.asdict(pipe.unet.config))
        unet_state, te_states = merged["unet"], {name: merged[name] for name in te_states}
        infotext["Lora hashes"] = hashes
    return AppliedNetworks(toks.get("text_encoder"), te_states.get("text_encoder"), unet_state, prompts, negatives,
                           infotext, toks.get("text_encoder_2"), te_states.get("text_encoder_2"))


__all__ = ["AppliedNetworks", "apply_networks", "lora_hash", "file_hash", "parse_lora_arg"]
