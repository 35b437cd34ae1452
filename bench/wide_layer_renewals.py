"""GAIT-prop's kept inverses on one network: steps whose targets were recomputed after a
missed bound, fresh or renewed inverses per square layer, corrections, and the mean step
time (issue 34: a wide layer with few rows, conv7's 3072-wide output layer at 224 px).

    python bench/wide_layer_renewals.py --net conv7-224 --batch 32 --steps 20     # float32, numpy
    python bench/wide_layer_renewals.py --net conv7-224 --batch 32 --steps 100    # the issue's rates

To compare two versions, run it with PYTHONPATH set to a worktree of each, alternating
(A, B, A, B); the counts are deterministic, the times are not.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import blas_line  # noqa: E402

from gait_ref.assembly import build_step  # noqa: E402
from gait_ref.config import Config  # noqa: E402

NETS = {"conv7-224": ("conv7", (3, 224, 224), 1000), "conv7-64": ("conv7", (3, 64, 64), 1000),
        "mlp-deep": ("mlp-deep", (784,), 10)}


@click.command()
@click.option("--net", default="conv7-224", type=click.Choice(sorted(NETS)), show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--steps", default=20, show_default=True)
def main(net, batch, steps):
    arch, shape, classes = NETS[net]
    step = build_step(Config(arch=arch, rule="gait", batch_size=batch, dtype="float32").resolved(), shape, classes)
    rng = np.random.default_rng(0)
    x, y = rng.random((batch,) + shape, dtype=np.float32), rng.integers(0, classes, batch)
    times = []
    for n in range(1, steps + 1):
        t = time.perf_counter()
        step(x, y, step=n, epoch=0)
        times.append(time.perf_counter() - t)
    rule = step.rule
    print(blas_line())
    print(f"{net}, batch {batch}, {steps} GP steps (float32, numpy): recomputed steps "
          f"{rule.stats['recursions'] - rule.stats['steps']}, fresh or renewed inverses per square layer "
          f"{[r.refreshes for r in rule.refined]}, corrections {rule.stats['corrections']}, "
          f"mean step after the first {np.mean(times[1:]):.2f} s")
    out = rule.refined[-1]
    if hasattr(out, "combined"):               # versions that combine corrections (issue 34)
        print(f"  output layer ({step.net.layers[-1].weight_shape[-1]} wide): {out.refreshes} inverses "
              f"(the first included), {out.corrections} corrections in {steps} steps, {out.combined} solves "
              f"combined by minimal residual; corrections needed by inverse age in the last full cycle "
              f"{out.last_cycle[1:]}")


if __name__ == "__main__":
    main()
