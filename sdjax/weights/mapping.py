"""The one place where PyTorch checkpoint names meet sdjax module paths.

sdjax's modules mirror diffusers' and transformers' attribute names, so a torch
name maps mechanically to an NNX state path:

    down_blocks.0.resnets.1.conv1.weight  <->  ('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')

Leaf rules: Linear `weight` (out, in) <-> `kernel` (in, out); Conv `weight` OIHW <->
`kernel` HWIO; norm `weight` <-> `scale`; Embedding `weight` <-> `embedding`;
`bias` <-> `bias`. Per-model renames of the torch side (old attention names,
prefixes) are applied to the flat torch dict before these rules, as pure
functions `dict[str, array] -> dict[str, array]`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.errors import CheckpointError

Path = tuple[Any, ...]


def torch_name(path: Path) -> str:
    """State path -> torch parameter name."""
    *mods, leaf = path
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join(str(p) for p in (*mods, leaf))


def to_jax_layout(leaf: str, torch_array: np.ndarray) -> np.ndarray:
    """A torch tensor (as numpy) -> the layout of the NNX leaf named `leaf`."""
    if leaf == "kernel":
        if torch_array.ndim == 2:
            return torch_array.T
        if torch_array.ndim == 4:
            return torch_array.transpose(2, 3, 1, 0)
    return torch_array


def to_torch_layout(leaf: str, jax_array: np.ndarray) -> np.ndarray:
    """Inverse of `to_jax_layout`."""
    if leaf == "kernel":
        if jax_array.ndim == 2:
            return jax_array.T
        if jax_array.ndim == 4:
            return jax_array.transpose(3, 2, 0, 1)
    return jax_array


def _fmt(names, limit=20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_state(
    abstract_model: nnx.Module,
    flat: Mapping[str, Any],
    *,
    dtype=None,
    ignore: Callable[[str], bool] = lambda name: False,
    source: str = "checkpoint",
    sharding: Callable[[Path, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None = None,
) -> nnx.Module:
    """Fill an abstract model (from `nnx.eval_shape`) with torch-named arrays.

    flat: torch name -> array (numpy, or anything `np.asarray` takes), already
    renamed to diffusers/transformers names. Each array is converted once, cast
    to `dtype` (default: the abstract parameter's dtype) and placed with
    `sharding(path, abstract)` if given, else on the default device.

    Missing, unexpected and mis-shaped tensors raise `CheckpointError` naming
    them and `source`. Names for which `ignore(name)` holds (buffers such as
    `position_ids`) are dropped silently.
    """
    graphdef, abstract_state = nnx.split(abstract_model)
    flat_state = nnx.to_flat_state(abstract_state)
    wanted = {torch_name(path): path for path, _ in flat_state}
    given = {k for k in flat if not ignore(k)}
    missing = set(wanted) - given
    unexpected = given - set(wanted)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_fmt(unexpected)}")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))

    leaves = []
    bad = []
    for path, var in flat_state:
        name = torch_name(path)
        arr = to_jax_layout(path[-1], np.asarray(flat[name]))
        abstract = var.get_value()
        if tuple(arr.shape) != tuple(abstract.shape):
            bad.append(f"{name}: file has {tuple(np.asarray(flat[name]).shape)}, model expects "
                       f"{tuple(to_torch_layout(path[-1], np.empty(abstract.shape, np.bool_)).shape)}")
            continue
        target = jnp.dtype(dtype) if dtype is not None else abstract.dtype
        arr = np.asarray(arr)
        if arr.dtype != target:
            arr = arr.astype(target)
        placed = jax.device_put(arr, sharding(path, abstract) if sharding else None)
        leaves.append((path, var.replace(placed)))
    if bad:
        raise CheckpointError(f"{source}: tensors with the wrong shape: " + "; ".join(bad))
    state = nnx.from_flat_state(leaves)
    return nnx.merge(graphdef, state)


def export_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """A model's parameters as a flat torch-named dict of numpy arrays (torch layouts)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[torch_name(path)] = to_torch_layout(path[-1], np.asarray(var.get_value()))
    return out
