"""Read PyTorch `torch.save` files into numpy arrays without importing torch or running code.

A `.bin` checkpoint is a pickle, and unpickling can call any importable function.
This module's unpickler resolves only an allow-list of globals, each to a
function or marker defined HERE (never torch's own): the tensor-rebuild
functions, the typed storage classes, dtypes, `collections.OrderedDict` and
`_codecs.encode` (protocol-2 bytes). Every other global raises
`UnsafePickleError` naming it, before anything is called.

Formats:
- zip (torch >= 1.6): `<root>/data.pkl` plus one raw little-endian record per
  storage, `<root>/data/<key>`;
- legacy (`_use_new_zipfile_serialization=False`): magic, protocol and
  sys-info pickles, the data pickle, the list of storage keys, then each
  storage as int64 element count + raw bytes.

Tensors come back as numpy arrays: float32/float16/bfloat16 (`ml_dtypes`),
float64 and the integer and bool types; non-contiguous strides and storage
offsets are honoured (the result is a contiguous copy where needed).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from sdjax.errors import CheckpointError, UnsafePickleError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "float64": np.float64, "double": np.float64,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class _Frozen:
    """Base of every object a pickle can reach: immutable, and the pickle BUILD opcode
    (`__setstate__`) is refused, so a file cannot alter the allow-list for later loads."""

    __slots__ = ()

    def __init__(self, **fields):
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name, value):
        raise UnsafePickleError(f"a pickle tried to set attribute {name!r} on {type(self).__name__}")

    def __setstate__(self, state):
        raise UnsafePickleError(f"a pickle tried to set the state of {type(self).__name__}")


class _StorageType(_Frozen):
    """Stands for `torch.FloatStorage` and friends: carries the element dtype."""

    __slots__ = ("name", "dtype")


class _DType(_Frozen):
    """Stands for `torch.float32` and friends."""

    __slots__ = ("dtype",)


class _TypeMarker(_Frozen):
    """Stands for `torch.Tensor` / `torch.nn.Parameter` inside `_rebuild_from_type_v2`."""

    __slots__ = ("name",)


class _Fn(_Frozen):
    """One allowed callable, defined in this module."""

    __slots__ = ("fn",)

    def __call__(self, *args):
        return self.fn(*args)


class _Storage(_Frozen):
    """A storage reference from a persistent id: resolved to bytes after unpickling.
    `view` is (offset, numel) in elements for legacy storage views."""

    __slots__ = ("key", "dtype", "numel", "view")


class _PendingTensor(_Frozen):
    """A tensor whose storage bytes are read once unpickling is done (sizes in elements)."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")


def _pending(storage, offset, size, stride, dtype=None) -> _PendingTensor:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    return _PendingTensor(storage=storage, offset=int(offset), size=tuple(int(s) for s in size),
                          stride=tuple(int(s) for s in stride),
                          dtype=np.dtype(dtype) if dtype is not None else storage.dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _pending(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, _DType):
        raise UnsafePickleError(f"_rebuild_tensor_v3 called with dtype {dtype!r}")
    return _pending(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, _PendingTensor):
        raise UnsafePickleError(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if not (isinstance(func, _Fn) and func.fn in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)
            and isinstance(new_type, _TypeMarker) and isinstance(args, tuple)):
        raise UnsafePickleError("_rebuild_from_type_v2 with something other than a tensor rebuild")
    return func(*args)


def _codecs_encode(text, encoding="utf-8"):
    # Protocol 2 pickles bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafePickleError(f"_codecs.encode with {type(text).__name__}, {encoding!r}")
    return text.encode(encoding)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _Fn(fn=_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Fn(fn=_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v3"): _Fn(fn=_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Fn(fn=_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Fn(fn=_rebuild_parameter),
    ("torch._tensor", "_rebuild_from_type_v2"): _Fn(fn=_rebuild_from_type_v2),
    ("torch", "Tensor"): _TypeMarker(name="torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker(name="torch.nn.parameter.Parameter"),
    ("_codecs", "encode"): _Fn(fn=_codecs_encode),
    ("torch", "UntypedStorage"): _StorageType(name="UntypedStorage", dtype=np.dtype(np.uint8)),
    ("torch.storage", "UntypedStorage"): _StorageType(name="UntypedStorage", dtype=np.dtype(np.uint8)),
    **{("torch", name): _StorageType(name=name, dtype=np.dtype(dt)) for name, dt in _STORAGE_DTYPES.items()},
    **{("torch", name): _DType(dtype=np.dtype(dt)) for name, dt in _TORCH_DTYPES.items()},
}


def allowed_globals() -> list[str]:
    """The `module.name` globals a checkpoint pickle may reference."""
    return sorted(f"{m}.{n}" for m, n in _ALLOWED)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` globals; persistent ids become `_Storage` references."""

    def __init__(self, file: BinaryIO, source: str, legacy: bool = False):
        super().__init__(file, encoding="utf-8")
        self.source, self.legacy = source, legacy

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {self.source}: its pickle asks for the global `{module}.{name}`, "
                "which is not a tensor or a plain container, so loading it could run code. "
                "If you trust the file, convert it to .safetensors with PyTorch first.") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"refusing to load {self.source}: unknown persistent id {pid!r:.80}")
        try:
            _, stype, key, _location, numel, *rest = pid
        except ValueError:
            raise UnsafePickleError(f"refusing to load {self.source}: malformed storage id {pid!r:.80}") from None
        view = rest[0] if (self.legacy and rest) else None
        if not isinstance(stype, _StorageType):
            raise UnsafePickleError(f"refusing to load {self.source}: storage of type {stype!r:.80}")
        if view is not None:
            _view_key, offset, view_numel = view
            view = (int(offset), int(view_numel))
        return _Storage(key=str(key), dtype=stype.dtype, numel=int(numel), view=view)


def _resolve(obj, read_storage, source: str):
    """Replace pending tensors (at any depth of dicts, lists, tuples) with numpy arrays."""
    if isinstance(obj, _PendingTensor):
        return _materialize(obj, read_storage(obj.storage), source)
    if isinstance(obj, dict):
        out = obj.__class__() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v, read_storage, source)
        return out
    if isinstance(obj, list):
        return [_resolve(v, read_storage, source) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v, read_storage, source) for v in obj)
    if isinstance(obj, (_Storage, _StorageType, _DType, _TypeMarker)):
        raise CheckpointError(f"{source}: a bare storage or type object outside a tensor")
    return obj


def _materialize(t: _PendingTensor, raw: np.ndarray, source: str) -> np.ndarray:
    """Storage bytes (uint8) + offset/size/stride (in elements) -> numpy array."""
    itemsize = t.dtype.itemsize
    data = raw.view(t.dtype) if raw.nbytes % itemsize == 0 else None
    if data is None:
        raise CheckpointError(f"{source}: storage {t.storage.key} is not a whole number of {t.dtype}")
    if not t.size:
        return data[t.offset:t.offset + 1].reshape(()).copy()
    extent = t.offset + 1 + sum((s - 1) * st for s, st in zip(t.size, t.stride) if s > 0)
    if min(t.size) > 0 and (extent > data.size or t.offset < 0 or min(t.stride) < 0):
        raise CheckpointError(f"{source}: tensor of size {t.size}, stride {t.stride}, offset {t.offset} "
                              f"reaches past its storage of {data.size} elements")
    contiguous = tuple(int(np.prod(t.size[i + 1:])) for i in range(len(t.size)))
    if t.offset == 0 and t.stride == contiguous and math.prod(t.size) == data.size:
        return data.reshape(t.size)
    view = np.lib.stride_tricks.as_strided(data[t.offset:], shape=t.size,
                                           strides=tuple(s * itemsize for s in t.stride), writeable=False)
    return np.array(view)  # contiguous copy; views must not outlive or alias the storage


def _load_zip(path: Path) -> Any:
    source = str(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: a zip file but not a PyTorch checkpoint (no <root>/data.pkl)")
        root = pkl[0].split("/")[0]
        byteorder = "little"
        if f"{root}/byteorder" in names:
            byteorder = zf.read(f"{root}/byteorder").decode().strip()
        try:
            obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), source).load()
        except (UnsafePickleError, CheckpointError):
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read its pickle ({type(e).__name__}: {e})") from None

        cache: dict[str, np.ndarray] = {}

        def read_storage(st: _Storage) -> np.ndarray:
            if st.key not in cache:
                entry = f"{root}/data/{st.key}"
                try:
                    raw = zf.read(entry)
                except KeyError:
                    raise CheckpointError(f"{path}: storage record {entry} is missing") from None
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise CheckpointError(f"{path}: storage record {entry} is unreadable ({e}); "
                                          "the file is truncated or corrupt") from None
                arr = np.frombuffer(raw, np.uint8)
                if byteorder == "big":
                    arr = np.frombuffer(arr.view(st.dtype.newbyteorder(">")).astype(st.dtype).tobytes(),
                                        np.uint8)
                cache[st.key] = arr
            return cache[st.key]

        return _resolve(obj, read_storage, source)


def _load_legacy(path: Path) -> Any:
    source = str(path)
    with open(path, "rb") as f:
        try:
            magic = _RestrictedUnpickler(f, source, legacy=True).load()
            if magic != _LEGACY_MAGIC:
                raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor "
                                      "the legacy torch.save format)")
            _RestrictedUnpickler(f, source, legacy=True).load()  # protocol version
            sys_info = _RestrictedUnpickler(f, source, legacy=True).load()
            if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
                raise CheckpointError(f"{path}: big-endian legacy checkpoints are not supported")
            obj = _RestrictedUnpickler(f, source, legacy=True).load()
            keys = _RestrictedUnpickler(f, source, legacy=True).load()
        except (UnsafePickleError, CheckpointError):
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read it as a PyTorch checkpoint "
                                  f"({type(e).__name__}: {e})") from None

        # Storages follow in `keys` order, each as int64 element count + raw data. Record where
        # each starts; its dtype comes from the tensors that reference it.
        dtypes: dict[str, np.dtype] = {}

        def collect(o):
            if isinstance(o, _PendingTensor):
                dtypes[o.storage.key] = o.storage.dtype
            elif isinstance(o, dict):
                for v in o.values():
                    collect(v)
            elif isinstance(o, (list, tuple)):
                for v in o:
                    collect(v)
        collect(obj)
        raw: dict[str, np.ndarray] = {}
        for key in keys:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is truncated in storage {key}")
            (numel,) = struct.unpack("<q", head)
            itemsize = dtypes.get(str(key), np.dtype(np.uint8)).itemsize
            data = f.read(numel * itemsize)
            if len(data) != numel * itemsize:
                raise CheckpointError(f"{path}: file is truncated in storage {key}")
            raw[str(key)] = np.frombuffer(data, np.uint8)

    def read_storage(st: _Storage) -> np.ndarray:
        if st.key not in raw:
            raise CheckpointError(f"{path}: storage {st.key} is referenced but not stored")
        data = raw[st.key]
        if st.view is not None:
            offset, numel = st.view
            data = data[offset * st.dtype.itemsize:(offset + numel) * st.dtype.itemsize]
        return data

    return _resolve(obj, read_storage, source)


def load_torch_file(path: str | os.PathLike) -> Any:
    """Unpickle a `torch.save` file (zip or legacy format) safely; tensors become numpy arrays.

    Returns the saved object (usually an OrderedDict name -> array). Raises
    `UnsafePickleError` (naming the global) if the pickle references anything
    beyond tensors, storages, dtypes, OrderedDict and plain containers, and
    `CheckpointError` for a truncated or malformed file. Nothing from the file
    is executed and torch is never imported.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    with open(path, "rb") as f:
        starts_like_zip = f.read(4) == b"PK\x03\x04"
    if starts_like_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: a zip archive without its directory; the file is truncated or corrupt")
    if starts_like_zip:
        try:
            return _load_zip(path)
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{path}: corrupt zip archive ({e}); the file may be truncated") from None
    return _load_legacy(path)
