"""The oldest-jax job of .ci/run tests what pyproject.toml promises.

.ci/oldest.txt pins jax, jaxlib and flax for the second CI job; these checks fail
when a lower bound in pyproject.toml moves without the pins (or the other way
round), so the oldest versions users may install are the ones CI runs.
"""

import re
import shlex
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
