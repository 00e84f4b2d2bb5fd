"""Device mesh and shardings. One mesh with axes (data, fsdp, tensor); batches split over data.

No hand-written collectives: inputs carry shardings and XLA inserts what is needed
(for example the gradient all-reduce of data-parallel training).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all). `data=None` takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices cannot be split into fsdp={fsdp} x tensor={tensor}")
        data = len(devices) // (fsdp * tensor)
    n = data * fsdp * tensor
    if n > len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {n} devices; "
                         f"{len(devices)} are available")
    return Mesh(np.array(devices[:n]).reshape(data, fsdp, tensor), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Shard dimension `batch_axis` over the data (and fsdp) axes, replicate the rest."""
    spec = [None] * batch_axis + [("data", "fsdp")]
    return NamedSharding(mesh, P(*spec))


def batch_divisor(mesh: Mesh) -> int:
    """Number of shards a batch is split into."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def pad_batch(n: int, mesh: Mesh) -> int:
    """The smallest batch size >= n that divides evenly over the mesh."""
    d = batch_divisor(mesh)
    return int(math.ceil(n / d) * d)
