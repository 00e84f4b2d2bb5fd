"""The oldest-jax job of .ci/run tests what pyproject.toml promises.

.ci/oldest.txt pins jax, jaxlib and flax for the second CI job; these checks fail
when a lower bound in pyproject.toml moves without the pins (or the other way
round), so the oldest versions users may install are the ones CI runs.
"""

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLDEST = ROOT / ".ci" / "oldest.txt"
RUN = ROOT / ".ci" / "run"


def lower_bounds():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", dep.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def pins():
    out = {}
    for line in OLDEST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9.]*)", line)
            assert m, f".ci/oldest.txt: {line!r} is not an exact pin"
            out[m.group(1).lower()] = m.group(2)
    return out


def test_oldest_pins_are_pyprojects_lower_bounds():
    bounds, pinned = lower_bounds(), pins()
    assert set(pinned) == {"jax", "jaxlib", "flax"}
    for name in ("jax", "flax"):
        assert name in bounds, f"pyproject.toml has no `{name}>=` lower bound"
        assert pinned[name] == bounds[name], (
            f".ci/oldest.txt pins {name}=={pinned[name]} but pyproject.toml says "
            f"{name}>={bounds[name]}: change both together")
    assert pinned["jaxlib"] == pinned["jax"], "jax releases need the jaxlib of the same version"


def test_ci_run_installs_the_pins_and_runs_existing_tests():
    text = RUN.read_text()
    assert "-c .ci/oldest.txt" in text and ".venv-ci" in text
    words = shlex.split(text.replace("\\\n", " "), comments=True)
    tests = [w for w in words if w.startswith("tests/")]
    assert tests, ".ci/run's oldest-jax job names no test files"
    for t in tests:
        assert (ROOT / t).is_file(), f".ci/run names {t}, which does not exist"


def test_xdist_groups_run_on_one_worker(tmp_path):
    """`--dist loadgroup` (pyproject's addopts) must keep an xdist_group on one worker: the
    full-size parity tests rely on it to never hold two full-size models in 24 GiB at once, and
    modules with costly fixtures to build them once. (With pytest 9.2 and xdist 3.8 the group
    tag is silently lost and the tests spread over both workers.)"""
    (tmp_path / "test_grouped.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.xdist_group('g')\n"
        + "".join(f"def test_{i}(): pass\n" for i in range(6)))
    (tmp_path / "test_free.py").write_text("".join(f"def test_{i}(): pass\n" for i in range(6)))
    r = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v",
                        "-p", "no:cacheprovider", "-p", "no:randomly", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    workers = set(re.findall(r"\[(gw\d+)\].*PASSED .*test_grouped\.py", r.stdout))
    assert len(re.findall(r"PASSED .*test_grouped\.py", r.stdout)) == 6, r.stdout[-2000:]
    assert len(workers) == 1, f"the group ran on {sorted(workers)}:\n{r.stdout[-2000:]}"
    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "--dist loadgroup" in addopts
