"""Periodic training checkpoints with orbax: weights, optimizer state, EMA, step, data position.

The train state is saved as a flat {index: array} dict of its leaves, and restored
into the structure of a freshly built state (same config, same models), which
keeps orbax away from NNX's container types. Metadata (step, examples consumed,
the run config) goes beside it as JSON. The manager keeps the last N checkpoints;
orbax writes each one to a temporary folder and renames it when complete, so a
crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _flat(tree: Any) -> dict[str, Any]:
    return {f"{i:06d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


class Checkpointer:
    """Save / restore train states under `<output_dir>/checkpoints/<step>`."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, metadata: dict) -> None:
        flat = _flat(state)
        if jax.process_count() == 1:
            # This process holds every shard: one batched device-to-host copy, then orbax writes
            # host arrays. Given JAX arrays, orbax copies each shard of each leaf on its own:
            # ~2 ms a shard, 1.5-2.4 s for a small model's train state (915 leaves on a 2-device
            # mesh) against 0.45 s this way. Restoring puts them back on the template's
            # shardings either way; with several processes each one writes its own shards.
            flat = jax.device_get(flat)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat),
            metadata=ocp.args.JsonSave(metadata),
        ))
        self.manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into `template`'s structure, dtypes and shardings; returns (state, metadata)."""
        step = self.latest_step() if step is None else step
        leaves, treedef = jax.tree.flatten(template)
        abstract = {f"{i:06d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                    for i, x in enumerate(leaves)}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            metadata=ocp.args.JsonRestore(),
        ))
        flat = restored["state"]
        state = jax.tree.unflatten(treedef, [flat[f"{i:06d}"] for i in range(len(leaves))])
        return state, dict(restored["metadata"])

    def close(self) -> None:
        self.manager.close()
