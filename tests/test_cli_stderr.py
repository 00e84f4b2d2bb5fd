"""A normal CLI run shows only sdjax's own lines on stderr: no third-party notices.

The run mirrors the README's install (no PyTorch): torch is hidden, which is what made
transformers print "PyTorch was not found. Models won't be available..." on every run."""

import os
import subprocess
import sys

# `sdjax generate` as the console script runs it, with any `import torch` raising ImportError.
RUN_WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from sdjax.cli import main; sys.exit(main())"


def test_generate_prints_no_third_party_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "XLA_FLAGS"))}
    env.update(JAX_PLATFORMS="cpu")
    out = tmp_path / "circle.png"
    proc = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_TORCH, "generate", "a red circle on a blue background",
         "--steps", "1", "--width", "64", "--height", "64", "--seed", "1", "--no-progress", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file()
    foreign = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("sdjax")]
    assert foreign == [], proc.stderr
