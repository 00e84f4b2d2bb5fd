"""scripts/bench_train.py --quick: runs both training loops and prints throughput lines (not timed here)."""

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_quick_prints_both_throughputs_and_ratio():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--quick"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    ours = re.search(r"^sdjax jitted train step: ([0-9.]+) examples/s .*last loss ([0-9.naif-]+)\)$", out, re.M)
    theirs = re.search(r"^torch AdamW loop \(diffusers UNet\): ([0-9.]+) examples/s .*last loss ([0-9.naif-]+)\)$",
                       out, re.M)
    ratio = re.search(r"^ratio sdjax/torch: ([0-9.]+)x$", out, re.M)
    assert ours and theirs and ratio, out
    values = [float(m.group(1)) for m in (ours, theirs, ratio)]
    assert all(math.isfinite(v) and v > 0 for v in values), out
    assert all(math.isfinite(float(m.group(2))) for m in (ours, theirs)), out  # both actually trained
    assert abs(values[2] - values[0] / values[1]) <= 0.01 * values[2] + 0.01
    assert "batch 2, 8x8x4 latents" in out
