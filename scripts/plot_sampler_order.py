"""Plot error vs NFE (log-log) of every deterministic sampler on the analytic problems.

    python scripts/plot_sampler_order.py --out order.png [--steps 4,8,16,32] [--samplers euler,heun]

Left: Gaussian data (exact ODE flow in closed form); right: a Gaussian mixture (reference
by a fine RK4 solve). Dashed grey lines show slopes 1, 2 and 3 for comparison.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sdjax import runtime  # noqa: E402
from sdjax.sampling.analytic import Gaussian, GaussianMixture, convergence, measured_order  # noqa: E402
from sdjax.sampling.samplers import DETERMINISTIC_SAMPLERS  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--steps", default="4,8,16,32,64", help="comma-separated step counts")
    parser.add_argument("--samplers", default=",".join(DETERMINISTIC_SAMPLERS), help="comma-separated names")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    runtime.configure()  # process-wide XLA settings, before JAX starts
    steps = [int(s) for s in args.steps.split(",")]
    names = [s for s in args.samplers.split(",") if s]

    problems = [("Gaussian N(0.3, 0.5²)", Gaussian(0.3, 0.5)), ("Gaussian mixture (3 components, 2-D)",
                                                                  GaussianMixture.default(dim=2))]
    fig, axes = plt.subplots(1, len(problems), figsize=(13, 5.5))
    for ax, (title, problem) in zip(axes, problems):
        for name in names:
            nfes, errors = convergence(name, problem, steps, batch=args.batch)
            # The order over the three finest points: the coarse end is pre-asymptotic.
            label = f"{name} ({measured_order(nfes[-3:], errors[-3:]):.2f})" if len(steps) > 1 else name
            ax.loglog(nfes, errors, marker="o", markersize=3, label=label)
            print(f"{title.split()[1][:8]:8s} {name:12s} nfe={nfes} err={['%.2e' % e for e in errors]}")
        lo, hi = ax.get_xlim()
        anchor = np.array([lo * 1.2, hi / 1.2])
        y0 = ax.get_ylim()[1] / 3
        for order in (1, 2, 3):
            ax.loglog(anchor, y0 * (anchor / anchor[0]) ** -order, "--", color="0.6", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("NFE (denoiser evaluations)")
        ax.set_ylabel("RMS error at sigma_min vs exact ODE flow")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, title="sampler (slope, 3 finest)", title_fontsize=7)
    fig.suptitle("sdjax samplers: error vs NFE, Karras schedule 20 -> 0.02 (dashed: slopes 1, 2, 3)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
