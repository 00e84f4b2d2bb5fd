"""sdjax: Stable Diffusion in JAX and Flax NNX.

`sdjax.load_pipeline(path, dtype="float32")` loads a diffusers checkpoint folder
(see `sdjax.pipeline`). It is imported on first use so that `import sdjax` stays cheap.
Importing sdjax changes no process-wide setting: entry points call `sdjax.runtime.configure()`.
"""

__version__ = "0.1.0"

__all__ = ["load_pipeline", "Pipeline"]


def __getattr__(name):
    if name in ("load_pipeline", "Pipeline"):
        from sdjax import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
