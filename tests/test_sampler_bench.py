"""The sampler bench in its quick form (2 samplers, 2 NFE values) on the embedded model: it writes
its table, JSON and plot, counts NFE from the UNet calls, and a rerun adds nothing (cache)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_bench_writes_table_plot_and_cache(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "scripts" / "sampler_bench.py"), "--quick", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=900, capture_output=True)
    data = json.loads(out.with_suffix(".json").read_text())
    res = data["results"]
    assert sorted(res) == sorted(f"{s}|karras|{n}|7" for s in ("euler", "dpmpp_2m") for n in (4, 8))
    for r in res.values():
        assert r["nfe"] == r["nfe_target"] and r["steps"] == r["nfe"]  # 1 UNet call of the CFG batch per step
        assert r["rmse_latent"] > 0 and r["rmse_image"] > 0
    for s in ("euler", "dpmpp_2m"):  # more NFE, closer to the 99-NFE reference
        assert res[f"{s}|karras|8|7"]["rmse_latent"] < res[f"{s}|karras|4|7"]["rmse_latent"]
    md = out.with_suffix(".md").read_text()
    assert "| euler |" in md and "| dpmpp_2m |" in md and "lowest latent RMSE at NFE 8" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The cache: a rerun computes nothing new (no model load, no reference) and keeps the results.
    rerun = subprocess.run(cmd, check=True, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert "reference" not in rerun.stdout
    assert json.loads(out.with_suffix(".json").read_text())["results"] == res
