"""Device mesh and shardings. One mesh with axes (data, fsdp, tensor); batches split over data.

No hand-written collectives: inputs carry shardings and XLA inserts what is needed
(for example the gradient all-reduce of data-parallel training).
"""

from __future__ import annotations

import math
import os

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


# ---------------------------------------------------------------------------------------------
# Parameter shardings: a rules table from logical axes to mesh axes.
# ---------------------------------------------------------------------------------------------

# Logical axis -> mesh axis (or None = replicated). The one place that says how model axes
# meet the mesh: "batch" splits over data x fsdp; under FSDP the weights' "fsdp_shard" axis
# (the axis chosen by `logical_axes`) splits over fsdp; "tensor" is reserved for tensor
# parallelism (no model annotates it yet, so the tensor mesh axis stays 1 in practice).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "fsdp_shard": "fsdp",
    "tensor": "tensor",
    "replicated": None,
}

MODES = ("replicate", "fsdp")

# Parameters smaller than this stay replicated under FSDP: sharding a bias or a norm scale
# saves nothing and costs a gather per use.
FSDP_MIN_SIZE = 1024


def logical_axes(shape: tuple[int, ...], mesh: Mesh, mode: str = "replicate") -> tuple[str, ...]:
    """Logical axis names of a parameter of `shape` under `mode`.

    replicate: every axis "replicated". fsdp: the largest axis whose length the fsdp mesh axis
    divides is "fsdp_shard" (ties: the last such axis, the output features of a kernel), the
    rest "replicated"; parameters with fewer than FSDP_MIN_SIZE elements, or with no divisible
    axis, stay replicated.
    """
    if mode not in MODES:
        raise ValueError(f"sharding mode {mode!r} is not supported; use one of {MODES}")
    names = ["replicated"] * len(shape)
    n = mesh.shape["fsdp"]
    if mode == "fsdp" and n > 1 and math.prod(shape) >= FSDP_MIN_SIZE:
        best = None
        for axis, size in enumerate(shape):
            if size % n == 0 and (best is None or size >= shape[best]):
                best = axis
        if best is not None:
            names[best] = "fsdp_shard"
    return tuple(names)


def logical_to_spec(names: tuple[str, ...], rules: dict | None = None) -> P:
    """A PartitionSpec from logical axis names through `rules` (default LOGICAL_RULES)."""
    rules = LOGICAL_RULES if rules is None else rules
    return P(*(rules[n] for n in names))


def param_sharding(shape: tuple[int, ...], mesh: Mesh, mode: str = "replicate") -> NamedSharding:
    """The NamedSharding of one parameter of `shape` (see `logical_axes`)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes(tuple(shape), mesh, mode)))


def param_shardings(tree, mesh: Mesh, mode: str = "replicate"):
    """A pytree of NamedShardings matching `tree` (arrays or ShapeDtypeStructs; key arrays and
    scalars replicated). Usable as jit in/out_shardings and for orbax restores."""
    def one(x):
        shape = getattr(x, "shape", ())
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            return NamedSharding(mesh, P(*([None] * len(shape))))
        return param_sharding(shape, mesh, mode)

    return jax.tree.map(one, tree)


def shard_params(state, mesh: Mesh, mode: str = "replicate", *, copy: bool = False):
    """Place a parameter pytree (an nnx.State, an optimizer state, ...) on `mesh`.

    mode="replicate": every device holds every weight (data parallel).
    mode="fsdp": each parameter's largest axis divisible by the fsdp mesh axis is split over
    it, so each device holds ~1/fsdp of the weights; under jit XLA gathers them where they
    are used and reduce-scatters their gradients (no hand-written collectives).
    copy: new buffers even where a leaf is already placed so (a state that will be donated must
    not share buffers with the arrays it came from); a transfer, no compiled program per shape.
    """
    return jax.device_put(state, param_shardings(state, mesh, mode), may_alias=False if copy else None)


def loading_sharding(mesh: Mesh, mode: str = "replicate"):
    """A `load_pipeline(sharding=...)` callback: (path, abstract leaf) -> NamedSharding, so
    weights are placed sharded as they are read instead of first landing on one device."""
    return lambda path, leaf: param_sharding(tuple(leaf.shape), mesh, mode)


# ---------------------------------------------------------------------------------------------
# Batches: pad to the mesh, shard, trim.
# ---------------------------------------------------------------------------------------------


def device_mesh(devices: int | str | None = None, fsdp: int = 1) -> Mesh | None:
    """The generation mesh for the `devices` option: None or 1 -> None (one device, no sharding);
    "all" -> every local device; N -> the first N local devices. `fsdp` devices of those form
    the fsdp axis (weights sharded over them), the rest the data axis.

    Local devices only: in a multi-host run every host generates its own share of the images
    on its own devices (`sdjax.pipeline.batch.host_share`), so hosts never wait on each other.
    """
    if devices is None or devices == 1 or devices == "1":
        if fsdp not in (None, 1):
            raise ValueError("fsdp needs more than one device: pass devices='all' or a count")
        return None
    local = jax.local_devices()
    if devices == "all":
        n = len(local)
    else:
        try:
            n = int(devices)
        except (TypeError, ValueError):
            raise ValueError(f"devices must be 'all' or a positive integer, got {devices!r}") from None
        if not 1 <= n <= len(local):
            raise ValueError(f"devices={n} but this process has {len(local)} local device(s)")
    fsdp = n if fsdp == "all" else int(fsdp or 1)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} must divide the device count {n}")
    return make_mesh(data=n // fsdp, fsdp=fsdp, devices=local[:n])


def shard_batch(inputs: dict, mesh: Mesh, batch: int, unbatched=()) -> dict:
    """Pad every batched input to `pad_batch(batch, mesh)` rows and shard it over data x fsdp.

    An input is batched when its leading axis has length `batch` and its key is not in
    `unbatched`; padding repeats the last row (valid values, trimmed by the caller). Everything
    else (scalars, the sigma schedule, dicts of knobs) is replicated.
    """
    padded = pad_batch(batch, mesh)
    data, repl = batch_sharding(mesh), replicated(mesh)

    def put(key, x):
        if isinstance(x, dict):
            return {k: put(k, v) for k, v in x.items()}
        shape = getattr(x, "shape", ())
        if key in unbatched or not shape or shape[0] != batch:
            return jax.device_put(x, repl)
        if padded != batch:
            last = jax.numpy.repeat(x[-1:], padded - batch, axis=0)
            x = jax.numpy.concatenate([x, last], axis=0)
        return jax.device_put(x, data)

    return {k: (jax.device_put(v, repl) if k in unbatched else put(k, v)) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------
# Multi-host: jax.distributed from flags, environment or the cluster's own variables.
# ---------------------------------------------------------------------------------------------

ENV_COORDINATOR = "SDJAX_COORDINATOR"
ENV_NUM_PROCESSES = "SDJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SDJAX_PROCESS_ID"


def detected_cluster() -> str | None:
    """The name of the cluster JAX's own auto-detection finds (SLURM, Open MPI, Cloud TPU,
    Kubernetes, ...), or None when not in one."""
    try:
        from jax._src.clusters import ClusterEnv  # JAX's detection; private, hence guarded
    except ImportError:
        return None
    for cluster in getattr(ClusterEnv, "_cluster_types", []):
        if getattr(cluster, "opt_in_only_method", False):
            continue
        try:
            if cluster.is_env_present():
                return cluster.__name__
        except Exception:  # noqa: BLE001 -- a probe that fails means "not this cluster"
            continue
    return None


def distributed_init(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, auto: bool = True) -> bool:
    """Start `jax.distributed` for a multi-process run; returns True when it was started.

    Values come from the arguments, else $SDJAX_COORDINATOR / $SDJAX_NUM_PROCESSES /
    $SDJAX_PROCESS_ID. coordinator "auto" (or none of the three given while JAX detects a
    cluster: SLURM, Open MPI, a Cloud TPU pod slice, ...; `auto=False` turns that off) calls
    `jax.distributed.initialize()` with no arguments so JAX fills them in. Otherwise, with
    nothing given, this is a single-process run and nothing happens. Must run before anything
    touches a JAX device. Calling it again once initialized does nothing.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if jax.distributed.is_initialized():
        return True
    if coordinator == "auto" or (coordinator is None and num_processes is None and process_id is None):
        if coordinator != "auto" and not (auto and detected_cluster()):
            return False
        jax.distributed.initialize()
        return True
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    if num_processes == 1 and coordinator is None:
        return False
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None
