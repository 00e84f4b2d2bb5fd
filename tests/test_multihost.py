"""One job across many hosts: deterministic split of a prompts file, and the real CLI in
2 processes x 2 simulated CPU devices (jax.distributed over 127.0.0.1, gloo collectives)
equal to the single-process run, each image exactly once, a rerun after a loss resuming."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdjax.pipeline import batch
from sdjax.images import make_grid, read_infotext
from sdjax_tiny import write_tiny_folder
from conftest import FAST_COMPILE_FLAGS

PROMPTS = 'a red cube\n{"prompt": "a blue ball", "batch_size": 3}\n# skipped\ngreen hills\n{"prompt": "sea", "seed": 40}\n'
ARGS = ["--steps", "2", "--width", "64", "--height", "64", "--batch-size", "2"]


def _entries():
    return [(1, {"prompt": "a"}), (2, {"prompt": "b", "batch_size": 3}), (3, {"prompt": "c", "subseed": 7}),
            (4, {"prompt": ["d", "e", "f", "g"], "batch_size": 4, "seed": 50})]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 13, 20])
def test_host_share_no_duplicates_no_gaps(count):
    jobs = batch.plan(_entries(), {"batch_size": 2, "seed": 10}, batch_count=2)
    wanted = {}
    for job in jobs:
        for i, name in enumerate(job.names):
            prompt = job.options["prompt"]
            wanted[name] = (job.options["seed"] + i, prompt[i] if isinstance(prompt, list) else prompt,
                            None if "subseed" not in job.options else job.options["subseed"] + i)
    got = {}
    sizes = []
    for h in range(count):
        share = batch.host_share(jobs, h, count)
        assert share == batch.host_share(jobs, h, count)  # deterministic
        sizes.append(sum(len(j.names) for j in share))
        for job in share:
            assert job.options["batch_size"] == len(job.names)
            for i, name in enumerate(job.names):
                assert name not in got, f"{name} on two hosts"
                prompt = job.options["prompt"]
                got[name] = (job.options["seed"] + i, prompt[i] if isinstance(prompt, list) else prompt,
                             None if "subseed" not in job.options else job.options["subseed"] + i)
    assert got == wanted  # no gaps, and every image keeps its seed, prompt and subseed
    assert max(sizes) - min(sizes) <= 1  # balanced
    with pytest.raises(batch.BatchError):
        batch.host_share(jobs, count, count)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    """The CLI's environment: no SDJAX_ settings or XLA flags but the run's compilation cache and fast-compile flags (conftest.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDJAX_", "XLA_FLAGS"))}
    return {**env, "SDJAX_CACHE_DIR": os.environ["SDJAX_CACHE_DIR"], "XLA_FLAGS": FAST_COMPILE_FLAGS,
            "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices),
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}


def _cli(args):
    return [sys.executable, "-m", "sdjax.cli", "generate", *map(str, args)]


# Runs the CLI with an audit hook that logs every file renamed or hard-linked onto a grid-*.png
# path (how sdjax.images writes atomically) to $GRID_SPY_LOG.<process id>: who wrote the grid.
GRID_SPY = """
import os, runpy, sys
log = os.environ["GRID_SPY_LOG"] + "." + sys.argv[sys.argv.index("--process-id") + 1]
def hook(event, args):
    if event in ("os.rename", "os.link") and os.path.basename(os.fspath(args[1])).startswith("grid-"):
        with open(log, "a") as f:
            f.write(os.fspath(args[1]) + "\\n")
sys.addaudithook(hook)
runpy.run_module("sdjax.cli", run_name="__main__", alter_sys=True)
"""


def _run_hosts(args, n=2, timeout=400, spy=None):
    """Launch n processes of the real CLI as one jax.distributed job on 127.0.0.1 (with `spy`, a
    log path: through GRID_SPY). Returns each process's printed .png paths."""
    port = _free_port()
    env = _env(2)
    if spy is not None:
        spy.parent.joinpath("grid_spy.py").write_text(GRID_SPY)
        env["GRID_SPY_LOG"] = str(spy)
    cmds = [_cli([*args, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", n, "--process-id", i])
            for i in range(n)]
    if spy is not None:
        cmds = [[sys.executable, str(spy.parent / "grid_spy.py"), *c[3:]] for c in cmds]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outs.append([line for line in out.splitlines() if line.endswith(".png")])
    return outs


def _pixels(path):
    return np.asarray(Image.open(path), np.int16)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    model = write_tiny_folder(tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    multi, single = tmp_path / "multi", tmp_path / "single"
    common = ["--model", model, "--prompts-file", prompts, *ARGS]

    # Random seed (-1): process 0 draws it and every process must use the same one.
    spy = tmp_path / "spy" / "writes"
    spy.parent.mkdir()
    outs = _run_hosts([*common, "--seed", -1, "--devices", "all", "--grid", "--out", multi], spy=spy)
    records = batch.read_manifests(multi)
    files = sorted(p.name for p in multi.glob("*.png") if not p.name.startswith("grid-"))
    assert len(files) == 2 + 3 + 2 + 2
    assert sorted(r["file"] for r in records) == files  # each image recorded exactly once
    printed = [os.path.basename(p) for out in outs for p in out if not os.path.basename(p).startswith("grid-")]
    assert sorted(printed) == files and len(set(outs[0]) & set(outs[1])) == 0  # each host its own images
    assert all(outs)  # both hosts did work

    # --grid: process 0 alone writes one grid of all 9 images (both hosts' shares) in plan order.
    grids = list(multi.glob("grid-*.png"))
    assert len(grids) == 1 and grids[0].name == batch.grid_name([multi / n for n in files])
    assert [os.path.basename(p) for p in outs[0] if "grid-" in p] == [grids[0].name]
    assert not [p for p in outs[1] if "grid-" in p]
    writers = {int(p.name.rsplit(".", 1)[1]): p.read_text().split() for p in spy.parent.glob("writes.*")}
    assert writers == {0: [str(grids[0])]}, writers  # written once, by process 0 only
    assert not list(multi.glob(".grid-*"))  # no temp file left
    expected = make_grid([Image.open(multi / n) for n in files])  # 9 images: 3 x 3
    np.testing.assert_array_equal(_pixels(grids[0]), np.asarray(expected, np.int16))
    seed = int(files[0].split("-")[1].split(".")[0])

    r = subprocess.run(_cli([*common, "--seed", seed, "--out", single]), env=_env(1),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in single.glob("*.png")) == files
    for name in files:
        diff = np.abs(_pixels(multi / name) - _pixels(single / name))
        assert diff.max() <= 1, f"{name} differs by {diff.max()}/255"
        assert read_infotext(multi / name) == read_infotext(single / name)

    # A host lost some images (crash): the rerun makes exactly those again, nothing twice,
    # even where the lost image shares its batch with images that were kept.
    lost = [files[1], files[-1]]  # one from each host's share
    before = {n: _pixels(multi / n) for n in lost}
    stamp = {n: (multi / n).stat().st_mtime_ns for n in files}
    for n in lost:
        (multi / n).unlink()
    _run_hosts([*common, "--seed", seed, "--devices", "all", "--out", multi])
    for n in files:
        assert (multi / n).exists()
        assert ((multi / n).stat().st_mtime_ns != stamp[n]) == (n in lost)
    for n in lost:
        assert np.abs(_pixels(multi / n) - before[n]).max() <= 1
    assert sorted(r["file"] for r in batch.read_manifests(multi)) == files



def test_distributed_init_single_process_and_errors(monkeypatch):
    from sdjax import parallel

    for k in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    assert parallel.distributed_init(auto=False) is False  # nothing given: one process
    assert parallel.distributed_init(num_processes=1, process_id=0) is False
    with pytest.raises(ValueError, match="process_id 2"):
        parallel.distributed_init("127.0.0.1:1", num_processes=2, process_id=2)
    monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="SDJAX_NUM_PROCESSES"):
        parallel.distributed_init()


def test_coordinator_auto_reaches_jax_cluster_detection(monkeypatch):
    """`--coordinator-address auto` (flag or $SDJAX_COORDINATOR) calls jax.distributed.initialize()
    with no arguments, so JAX's cluster detection fills them in; with no flags and no cluster
    nothing starts, and inside a detected cluster (SLURM variables here) detection is used
    without the flag. Outside any cluster "auto" is JAX's own clear error, which the CLI turns
    into a one-line usage error (exit 2)."""
    import jax

    from sdjax import cli, parallel

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for k in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID,
              "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(jax, "process_count", lambda: 1)

    args = cli._parser().parse_args(["generate", "x", "--coordinator-address", "auto"])
    assert args.coordinator_address == "auto"
    cli.start_distributed(vars(args))
    assert calls == [((), {})]
    monkeypatch.setenv(parallel.ENV_COORDINATOR, "auto")
    cli.start_distributed({})
    assert calls[-1] == ((), {}) and len(calls) == 2
    monkeypatch.delenv(parallel.ENV_COORDINATOR)
    assert parallel.detected_cluster() is None
    cli.start_distributed({})
    assert len(calls) == 2  # nothing given, no cluster: a single process
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node001", "SLURM_NTASKS": "2",
                 "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    assert parallel.detected_cluster() == "SlurmCluster"
    cli.start_distributed({})
    assert calls[-1] == ((), {}) and len(calls) == 3
    # An explicit address wins over detection and is passed through.
    cli.start_distributed({"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1})
    assert calls[-1] == ((), {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1})


@pytest.mark.slow
def test_coordinator_auto_outside_a_cluster_is_a_clear_error(tmp_path):
    env = {k: v for k, v in _env(1).items() if not k.startswith(("SLURM_", "OMPI_"))}
    r = subprocess.run(_cli(["x", "--coordinator-address", "auto", "--steps", "1", "--out", tmp_path / "o"]),
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "coordinator" in r.stderr.lower(), r.stderr[-2000:]
