"""scripts/bench_serve.py (issue 19: images/s of sequential against concurrent clients) runs
against a real server and prints both modes with the server's generation-call counts."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_serve_prints_sequential_and_concurrent_images_per_second():
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--requests", "2", "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = r"^(sequential|concurrent): ([0-9.]+) images/s \([0-9.]+ s, (\d+) generation calls\)$"
    found = {mode: (float(rate), int(calls)) for mode, rate, calls in re.findall(line, proc.stdout, flags=re.M)}
    assert set(found) == {"sequential", "concurrent"}, proc.stdout
    assert found["sequential"][1] == 2  # one single-image request, one compiled call each
    assert 1 <= found["concurrent"][1] <= 2 and found["sequential"][0] > 0 and found["concurrent"][0] > 0
