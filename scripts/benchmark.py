"""sdjax vs diffusers (PyTorch) on this machine: same random SD 1.5 weights, dtype, sizes, sampler.

    python scripts/benchmark.py --quick                      # tiny config, seconds (CI)
    python scripts/benchmark.py --json bench_results/r.json  # SD 1.5 config, ~20-25 min on 2 cores
    python scripts/benchmark.py --sections unet,txt2img --images 256 --levers
    python scripts/benchmark.py --device gpu [--quick]       # on a GPU/TPU: scripts/bench_gpu.py

Prints the machine and date, one line per measurement as it completes, a table, and last a line
of ratios (sdjax's advantage, >1 = sdjax better). The code is `scripts/bench/` (`bench.run`); see its
docstring for what each section measures and `--help` for the flags.
"""

import sys

from sdjax import runtime

if __name__ == "__main__":
    runtime.configure()  # process-wide XLA settings, before JAX starts
    if any(a == "--device" or a.startswith("--device=") for a in sys.argv[1:]):
        # The accelerator benchmark (issue #23's table): scripts/bench_gpu.py.
        sys.path.insert(0, __import__("os").path.dirname(__file__))
        from bench_gpu import main as accelerator_main

        sys.exit(accelerator_main())
    from bench.run import main  # scripts/bench/, next to this file

    sys.exit(main())
