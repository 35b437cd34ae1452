"""Training steps with glibc's default malloc settings against ``gait_ref.hostmem.keep_freed_memory()``,
each case in a fresh process (the allocator's state is per process), alternating
default / kept, repeated. Prints ms per step and minor page faults per step (getrusage).

    python bench/host_memory.py [--repeats 3]

Cases (float32, the benchmark networks of bench/perf.py on real images): BP forward and
backward on conv7 at 64 px, ordinary and square network, batch 64; the GAIT-prop training
step on conv7 (batch 64) and on the deep MLP (batch 256).
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import alternating_processes, blas_line  # noqa: E402

WORKER = """
import resource, sys, time
sys.path[:0] = [sys.argv[1] + "/bench", sys.argv[1]]
import numpy as np
import perf
from gait_ref.hostmem import keep_freed_memory
if sys.argv[2] == "kept":
    assert keep_freed_memory()
name, rule, square, batch, steps = sys.argv[3], sys.argv[4], sys.argv[5] == "square", int(sys.argv[6]), int(sys.argv[7])
s = perf.Setup(name, rule, np, np.float32, batch, invertible=True if square else None, keep_memory=False)
fn = s.updates if rule == "bp" else s.train_step
for _ in range(3):
    fn()
f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range(steps):
    fn()
dt = (time.perf_counter() - t) / steps
print(dt, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)
"""
CASES = [("conv7-64px", "bp", "ordinary", 64, 30), ("conv7-64px", "bp", "square", 64, 10),
         ("conv7-64px", "gait", "square", 64, 6), ("mlp-deep", "gait", "square", 256, 8)]


@click.command()
@click.option("--repeats", default=3, show_default=True)
def main(repeats):
    print(blas_line())
    print("| case | default ms | kept ms | kept/default | default faults/step | kept faults/step |")
    print("|---|---|---|---|---|---|")
    for name, rule, net, batch, steps in CASES:
        med = alternating_processes({mode: ["-c", WORKER, str(ROOT), mode, name, rule, net, str(batch), str(steps)]
                                     for mode in ("default", "kept")}, repeats)
        t = {k: v[0] for k, v in med.items()}
        f = {k: v[1] for k, v in med.items()}
        print(f"| {name} {rule} {net} batch {batch} | {t['default'] * 1e3:.1f} | {t['kept'] * 1e3:.1f} | "
              f"{t['kept'] / t['default']:.2f} | {f['default']:.0f} | {f['kept']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
