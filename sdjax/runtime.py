"""Process-wide settings, made by entry points (the CLI, scripts, the test suite), never on
`import sdjax`: a library must not change its host program's XLA flags or JAX config.

    from sdjax import runtime
    runtime.configure()                                        # XLA flags only
    runtime.configure(compilation_cache=runtime.default_cache_dir())   # what `sdjax` does
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

# XLA:CPU computes bf16 matmuls and convs on float32 copies of their weights, and its
# default instruction scheduler (which favours concurrency) makes all of a sampling step's
# copies at once: a whole float32 UNet alive during sampling, so bf16 needed more memory
# than float32. The memory-minimising scheduler frees each copy after its layer: bf16
# SD 1.5 txt2img at 512x512 compiles to 0.56 GiB of temporaries instead of 3.44 GiB, with
# float32 speed unchanged. XLA reads this flag only from XLA_FLAGS (a jit's
# compiler_options do not reach it), so it must be set before JAX starts its backend.
SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"

# CPython's cyclic garbage collector, by default, collects its youngest generation every 700
# net allocations and every generation after 100 of those. Tracing a model (JAX builds its
# jaxpr from millions of short-lived Python objects) then spends ~30% of its time in the
# collector, walking every object the process holds: a small train step traced in 1.8 s
# instead of 1.3 s, `sdjax generate` took ~5% longer. Collections 70x rarer keep cyclic garbage
# a little longer (the peak of the full-size SDXL + SD 1.5 UNet parity tests: 15.6 -> 15.9 GB);
# arrays outside reference cycles are freed at once, as before.
GC_THRESHOLD = (50_000, 20, 20)


def default_cache_dir() -> Path:
    """Where the CLI keeps JAX's persistent compilation cache: $SDJAX_CACHE_DIR, else
    $XDG_CACHE_HOME/sdjax/jax, else ~/.cache/sdjax/jax."""
    if os.environ.get("SDJAX_CACHE_DIR"):
        return Path(os.environ["SDJAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdjax" / "jax"


def configure(compilation_cache: str | os.PathLike | None = None) -> None:
    """Set sdjax's process-wide settings. Call it first thing in `main`, before JAX starts its
    backend (before the first `jax.devices()` or computation): after that the XLA flag has no
    effect.

    - XLA_FLAGS gets `--xla_cpu_enable_concurrency_optimized_scheduler=false` (the CPU
      scheduler that frees bf16 weight copies layer by layer), unless XLA_FLAGS already names
      that flag: a value the user set wins.
    - `compilation_cache`: a folder for JAX's persistent compilation cache (compiles over
      0.5 s are kept across processes), created if missing; None leaves the cache off. An
      unwritable folder is skipped silently: it only costs time.
    - Python's garbage collector runs less often (`GC_THRESHOLD`), unless the process already
      set a higher first threshold; a collector the process disabled stays disabled.
    """
    if gc.get_threshold()[0] < GC_THRESHOLD[0]:
        gc.set_threshold(*GC_THRESHOLD)
    flags = os.environ.get("XLA_FLAGS", "")
    if SCHEDULER_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{SCHEDULER_FLAG}=false".strip()
    if compilation_cache is not None:
        import jax

        try:
            path = Path(compilation_cache)
            path.mkdir(parents=True, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", str(path))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        except OSError:
            pass
