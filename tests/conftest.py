"""Shared test setup: 8 simulated CPU devices, a key fixture, the reference configs."""

import os
from pathlib import Path

import jax
import pytest

# Must happen before JAX is first used.
jax.config.update("jax_num_cpu_devices", 8)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("SDJAX_REFERENCE", ROOT.parent / "shared" / "reference"))


def reference(name: str) -> Path:
    """Path of a reference checkpoint folder (configs + tokenizer), or skip with a reason."""
    path = REFERENCE / name
    if not path.is_dir():
        pytest.skip(f"reference configs not found at {path} (set SDJAX_REFERENCE)")
    return path


@pytest.fixture
def key():
    return jax.random.key(0)
