"""Shared test setup: sdjax's runtime settings, one persistent compilation cache per run, XLA's
fast-compile CPU flags, 8 simulated CPU devices, strict dtype promotion, a key fixture, the
reference configs, and an optional per-test timing log (SDJAX_TEST_TIMING_LOG)."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import pytest

from sdjax import runtime


def _session_cache_dir() -> tuple[Path, bool]:
    """One JAX persistent compilation cache per test run, shared by both xdist workers (they
    inherit the controller's environment) and every subprocess they start (CLI runs, servers,
    notebooks, README commands): the same tiny-model programs are compiled once per run instead
    of once per test. A new run starts empty, so no test reads what an older sdjax compiled.
    Returns (folder, whether this process made it and removes it at the end)."""
    made = "SDJAX_TEST_JAX_CACHE" not in os.environ
    if made:
        os.environ["SDJAX_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="sdjax-test-jax-cache-")
    return Path(os.environ["SDJAX_TEST_JAX_CACHE"]), made


JAX_CACHE, _OWN_CACHE = _session_cache_dir()
# Subprocesses inherit it (tests that build an env from os.environ keep it).
os.environ["SDJAX_CACHE_DIR"] = str(JAX_CACHE)

# Faster XLA:CPU compiles, here and in the subprocesses that inherit XLA_FLAGS: the suite's
# time is mostly XLA compiling tiny models. The HLO, its fusions and sdjax's kernel choice are
# unchanged; only the machine code is less optimised, which tiny models do not notice.
#  - LLVM's optimisation off: compile-bound tests take about half as long
#    (tests/test_generate.py alone: 153 s -> 82 s).
#  - fusions emitted by XLA's older elemental emitter instead of its MLIR fusion emitters:
#    another ~25% off a tiny UNet's compile (its gradient: 4.5 -> 3.2 s). Only added when this
#    jaxlib knows the flag (XLA aborts on an unknown one), checked once in a subprocess.
# (One thread per operation, XLA's and torch's, was tried for `-n 2` on 2 cores: 17% slower.)
# The benchmark smoke tests keep them too: they check what is printed, not the timings.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
FUSION_EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": flag}
    code = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # not yet set (the
    # xdist controller, or a run without xdist; workers and subprocesses inherit the result)
    fast = [FAST_COMPILE_FLAG] + ([FUSION_EMITTER_FLAG] if _xla_accepts(FUSION_EMITTER_FLAG) else [])
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + fast).strip()
# What subprocesses that build their own XLA_FLAGS add: the flags chosen above.
FAST_COMPILE_FLAGS = " ".join(f for f in os.environ["XLA_FLAGS"].split()
                              if f.startswith(("--xla_backend_optimization_level", "--xla_cpu_use_fusion_emitters")))
# XLA_FLAGS for a subprocess bound by execution rather than compilation (LLVM's optimisation off
# doubles a run): the suite's flags without the level, so XLA's default level applies.
EXECUTION_XLA_FLAGS = " ".join(f for f in os.environ["XLA_FLAGS"].split()
                               if not f.startswith("--xla_backend_optimization_level"))

# Must happen before JAX is first used. The suite is an entry point like the CLI: it selects
# sdjax's XLA flags itself (import sdjax does not), so tests run what users run, with the
# persistent compilation cache the CLI uses.
runtime.configure(compilation_cache=JAX_CACHE)
jax.config.update("jax_num_cpu_devices", 8)
# No implicit promotion between ints and floats or between float widths: casts are written out.
jax.config.update("jax_numpy_dtype_promotion", "strict")

ROOT = Path(__file__).resolve().parents[1]
# The repository carries them (reference/README.md); SDJAX_REFERENCE may point elsewhere.
REFERENCE = Path(os.environ.get("SDJAX_REFERENCE", ROOT / "reference"))


def cli_run(capsys, *args) -> subprocess.CompletedProcess:
    """`sdjax.cli.main(args)` run in the test's process, as a CompletedProcess: returncode is the
    status the `sdjax` script exits with, stdout and stderr what it printed. For tests of what a
    command writes and prints, without a Python and JAX start per command (and the worker's
    compiled programs are reused). What only a process shows (the console script, signals,
    concurrent runs, a killed run) is tested with real subprocesses."""
    from sdjax import cli

    args = [*map(str, args)]
    capsys.readouterr()
    try:
        status = cli.main(args)
    except SystemExit as e:  # argparse's usage errors (and --help): the script exits the same way
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["sdjax", *args], status, out.out, out.err)


def cli_main(capsys, *args) -> tuple[int, str]:
    """(status, stderr) of `cli_run`: for the input errors, where a subprocess only adds a Python
    and JAX start."""
    r = cli_run(capsys, *args)
    return r.returncode, r.stderr


def reference(name: str) -> Path:
    """Path of a reference checkpoint folder (configs + tokenizer). A missing one is an error,
    never a skip: the repository ships them, so a skip would only hide a broken checkout."""
    path = REFERENCE / name
    if not path.is_dir():
        raise FileNotFoundError(f"reference configs not found at {path} (see reference/README.md; "
                                "SDJAX_REFERENCE overrides the folder)")
    return path


def pytest_sessionfinish(session):
    if _OWN_CACHE:  # the xdist controller, or a run without xdist
        shutil.rmtree(JAX_CACHE, ignore_errors=True)


@pytest.fixture
def no_persistent_cache():
    """For tests that count XLA compilations (jax.monitoring's backend_compile events): a
    persistent-cache hit compiles nothing and would hide a recompilation, so the cache is off."""
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)


@pytest.fixture
def key():
    return jax.random.key(0)


_TIMING_LOG = os.environ.get("SDJAX_TEST_TIMING_LOG")


def pytest_runtest_logreport(report):
    """With SDJAX_TEST_TIMING_LOG=FILE, one line per test phase as it ends (phase, seconds,
    outcome, test id), appended by every xdist worker: where the suite's time goes, while it runs."""
    if _TIMING_LOG and not hasattr(report, "node"):  # the xdist controller sees each report again
        with open(_TIMING_LOG, "a") as f:
            f.write(f"{report.when} {report.duration:.1f} {report.outcome} {report.nodeid}\n")
