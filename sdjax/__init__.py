"""sdjax: Stable Diffusion in JAX and Flax NNX.

`sdjax.load_pipeline(path, dtype="float32")` loads a diffusers checkpoint folder
(see `sdjax.pipeline`). It is imported on first use so that `import sdjax` stays cheap.
"""

import os

__version__ = "0.1.0"

# XLA:CPU computes bf16 matmuls and convs on float32 copies of their weights, and its
# default instruction scheduler (which favours concurrency) makes all of a sampling step's
# copies at once: a whole float32 UNet alive during sampling, so bf16 needed more memory
# than float32. The memory-minimising scheduler frees each copy after its layer: bf16
# SD 1.5 txt2img at 512x512 compiles to 0.56 GiB of temporaries instead of 3.44 GiB, with
# float32 speed unchanged. XLA reads this flag only from XLA_FLAGS (a jit's
# compiler_options do not reach it), so it is set here, before JAX starts its backend;
# a value the user already put in XLA_FLAGS wins.
_SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
if _SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_SCHEDULER_FLAG}=false".strip()

__all__ = ["load_pipeline", "Pipeline"]


def __getattr__(name):
    if name in ("load_pipeline", "Pipeline"):
        from sdjax import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
