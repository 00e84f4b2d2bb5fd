"""Process-wide settings belong to entry points: `import sdjax` changes none and pulls in no
PyTorch; `sdjax.runtime.configure()` sets them, keeping a user's own XLA_FLAGS value.

Each check runs in a fresh interpreter: this process already ran conftest's configure()."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def _python(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_sets_no_xla_flag():
    _python(f"import sdjax, os; assert {FLAG!r} not in os.environ.get('XLA_FLAGS', '')")


def test_import_does_not_import_torch_or_diffusers():
    _python("import sys, sdjax, sdjax.cli; "
            "assert not {'torch', 'diffusers'} & set(sys.modules), {'torch', 'diffusers'} & set(sys.modules)")


def test_configure_adds_the_flag_and_keeps_the_users_flags():
    code = "import os; from sdjax import runtime; runtime.configure(); runtime.configure(); print(os.environ['XLA_FLAGS'])"
    assert _python(code).split() == [f"--{FLAG}=false"]  # once, however often it is called
    assert _python(code, XLA_FLAGS="--xla_cpu_use_onednn=true").split() == [
        "--xla_cpu_use_onednn=true", f"--{FLAG}=false"]
    assert _python(code, XLA_FLAGS=f"--{FLAG}=true").split() == [f"--{FLAG}=true"]  # the user's wins


def test_configure_enables_the_persistent_compilation_cache(tmp_path):
    cache = tmp_path / "made" / "here"
    out = json.loads(_python(
        "import json, jax; from sdjax import runtime; "
        f"runtime.configure(compilation_cache={str(cache)!r}); "
        "print(json.dumps(jax.config.jax_compilation_cache_dir))"))
    assert out == str(cache) and cache.is_dir()
    # Without a folder the cache stays as JAX's default.
    assert _python("import jax; from sdjax import runtime; runtime.configure(); "
                   "print(jax.config.jax_compilation_cache_dir)") == "None"


def test_default_cache_dir_follows_the_environment(tmp_path):
    code = "from sdjax import runtime; print(runtime.default_cache_dir())"
    assert _python(code, SDJAX_CACHE_DIR=str(tmp_path / "c")) == str(tmp_path / "c")
    env = {k: v for k, v in os.environ.items() if k != "SDJAX_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "x")
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == str(tmp_path / "x" / "sdjax" / "jax")


def test_configure_makes_garbage_collection_rarer_and_keeps_a_higher_setting():
    code = "import gc; from sdjax import runtime; {}runtime.configure(); print(*gc.get_threshold(), gc.isenabled())"
    from sdjax.runtime import GC_THRESHOLD

    assert _python(code.format("")).split() == [*map(str, GC_THRESHOLD), "True"]
    assert _python(code.format("gc.set_threshold(10**6, 5, 5); ")).split() == ["1000000", "5", "5", "True"]
    assert _python(code.format("gc.disable(); ")).split()[-1] == "False"
