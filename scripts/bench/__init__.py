"""The benchmark of sdjax against diffusers (PyTorch): `run` (sections, CLI), `report` (Plan, Row,
Report), `sections` (the measurements), `parts` (models, timing, subprocess workers).

Lives outside the `sdjax` package because it needs torch and diffusers (test-only dependencies)
and uses only sdjax's public modules. Run it with `python scripts/benchmark.py`; import it with
`scripts/` on `sys.path` (`import bench.run`).
"""
