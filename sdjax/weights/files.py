"""Weight files -> flat dicts of torch-named arrays, without PyTorch.

Formats: safetensors (read lazily: a tensor's bytes are read only when it is
converted, so loading never holds the whole file twice), the `*.{variant}.*`
variants diffusers and transformers write (`diffusion_pytorch_model.fp16.safetensors`),
sharded checkpoints (`*.safetensors.index.json` / `*.bin.index.json`, variant
`*.safetensors.index.fp16.json`), and PyTorch `.bin` pickles through the
restricted unpickler in `sdjax.weights.pickle_safe`.

Every value in the returned dicts has `.shape`, `.dtype`, `.ndim` and converts
with `np.asarray`; bfloat16 arrays use `ml_dtypes.bfloat16` (numpy's dtype as
used by JAX). Errors are `CheckpointError`s naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterable

import ml_dtypes
import numpy as np

from sdjax.errors import CheckpointError
from sdjax.weights.pickle_safe import load_torch_file

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

# A header larger than this is not a real safetensors header (the format caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


class LazyTensor:
    """One tensor of a safetensors file, read from disk when converted to numpy.

    `np.asarray(t)` reads exactly its bytes (one copy from the page cache) and
    returns a fresh, writable, C-contiguous array of `t.shape` / `t.dtype`.
    """

    __slots__ = ("path", "name", "shape", "dtype", "offset", "nbytes")

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype,
                 offset: int, nbytes: int):
        self.path, self.name, self.shape, self.dtype = path, name, shape, dtype
        self.offset, self.nbytes = offset, nbytes

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numpy(self) -> np.ndarray:
        buf = np.empty(self.nbytes, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            got = f.readinto(memoryview(buf))
        if got != self.nbytes:
            raise CheckpointError(f"{self.path}: tensor {self.name!r} is cut short "
                                  f"({got} of {self.nbytes} bytes); the file is truncated")
        return buf.view(self.dtype).reshape(self.shape)

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, shape={self.shape}, dtype={self.dtype}, file={self.path.name})"


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset of the data section), checked against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: not a valid safetensors file: header of {n} bytes "
                                  f"does not fit in the file of {size} bytes (truncated or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n


def read_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """A safetensors file -> {name: LazyTensor}; only the header is read now.

    Raises `CheckpointError` naming the file (and tensor) if the file is
    truncated, its header is malformed, or a dtype is unknown.
    """
    path = Path(path)
    header, start = read_safetensors_header(path)
    data_size = path.stat().st_size - start
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {info!r}") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype_name}, which sdjax cannot "
                                  f"read (supported: {', '.join(SAFETENSORS_DTYPES)})")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} {dtype_name} should take "
                                  f"{nbytes} bytes but the header gives offsets {begin}..{end}")
        if end > data_size:
            raise CheckpointError(f"{path}: file is truncated: tensor {name!r} ends at byte {start + end} "
                                  f"but the file has {start + data_size} bytes")
        out[name] = LazyTensor(path, name, shape, dtype, start + begin, nbytes)
    return out


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch `.bin` / `.pt` state dict -> {name: numpy array}, without importing torch.

    Uses the restricted unpickler (`sdjax.weights.pickle_safe`): a pickle that
    asks for anything but tensors and plain containers raises `UnsafePickleError`.
    A top-level `{"state_dict": {...}}` wrapper is unwrapped.
    """

    path = Path(path)
    obj = load_torch_file(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    out = {}
    for name, arr in obj.items():
        if not isinstance(arr, np.ndarray):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(arr).__name__}, not a tensor")
        out[str(name)] = arr
    return out


def read_weight_file(path: str | os.PathLike) -> dict[str, Any]:
    """One weight file (`.safetensors`, `.bin`, `.pt`, `.pth`, `.ckpt`) -> flat name -> array."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return read_torch_bin(path)
    raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r} "
                          "(expected .safetensors or a PyTorch .bin)")


def read_sharded(index_path: str | os.PathLike) -> dict[str, Any]:
    """A `*.index.json` (`{"weight_map": {name: shard file}}`) -> flat name -> array over all shards."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({type(e).__name__}: {e})") from None
    by_file: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_file.setdefault(shard, []).append(name)
    out: dict[str, Any] = {}
    for shard, names in sorted(by_file.items()):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is missing (it should hold {names[0]!r} "
                                  f"and {len(names) - 1} more tensors)")
        tensors = read_weight_file(shard_path)
        absent = [n for n in names if n not in tensors]
        if absent:
            raise CheckpointError(f"{shard_path}: tensor {absent[0]!r} is listed in {index_path.name} "
                                  f"but not in the shard ({len(absent)} missing)")
        for n in names:
            out[n] = tensors[n]
    return out


# File stems, in order of preference, that diffusers and transformers write.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def _candidates(stem: str, variant: str | None) -> Iterable[str]:
    for ext in ("safetensors", "bin"):
        if variant:
            yield f"{stem}.{variant}.{ext}"
            yield f"{stem}.{ext}.index.{variant}.json"
        else:
            yield f"{stem}.{ext}"
            yield f"{stem}.{ext}.index.json"


def find_weights(folder: str | os.PathLike, variant: str | None = None,
                 stems: Iterable[str] = WEIGHT_STEMS) -> Path:
    """The weight file (or shard index) of one component folder.

    Preference: safetensors over `.bin`, single file over shards. With
    `variant="fp16"`, only the variant's files count. Without a variant, a
    folder holding only one variant's files (say only `*.fp16.safetensors`)
    uses those.
    """
    folder = Path(folder)
    stems = tuple(stems)
    for stem in stems:
        for name in _candidates(stem, variant):
            if (folder / name).is_file():
                return folder / name
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if variant is None:
        pattern = re.compile(rf"^(?:{'|'.join(map(re.escape, stems))})"
                             r"(?:\.(\w+)\.(?:safetensors|bin)|\.(?:safetensors|bin)\.index\.(\w+)\.json)$")
        variants = {m.group(1) or m.group(2) for m in map(pattern.match, present) if m}
        if len(variants) == 1:
            return find_weights(folder, variants.pop(), stems)
    wanted = ", ".join(_candidates(stems[0], variant))
    raise CheckpointError(f"{folder}: no weight file found (looked for {wanted} and the same for "
                          f"{', '.join(stems[1:])}); the folder holds: {', '.join(present) or 'nothing'}")


def read_component_weights(folder: str | os.PathLike, variant: str | None = None
                           ) -> tuple[dict[str, Any], Path]:
    """(flat torch-named arrays, the file or index they came from) for one component folder."""
    path = find_weights(folder, variant)
    flat = read_sharded(path) if path.name.endswith(".json") else read_weight_file(path)
    return flat, path
