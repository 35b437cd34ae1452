"""What the refined solver's backward-error test costs: one warm-started power-iteration
step for ||W||_2 (``RefinedInverse.norm_squared``) against a whole refined solve that
includes it, on one square layer of the deep MLP. Interleaved repeats (solve, power step,
solve, ...), medians. Prints milliseconds and the share.

    python bench/power_step.py [--threads 1] [--K 2] [--repeats 20]
"""
from __future__ import annotations

import time

import click
import numpy as np
from threadpoolctl import threadpool_limits

from gait_ref.linalg import RefinedInverse
from gait_ref.backend import blas_info


@click.command()
@click.option("--threads", default=1, type=int, help="BLAS threads")
@click.option("--K", "corrections", default=2, type=int, help="refinement corrections per solve")
@click.option("--repeats", default=20, type=int)
@click.option("--dim", default=1024, type=int)
@click.option("--batch", default=256, type=int)
def main(threads, corrections, repeats, dim, batch):
    rng = np.random.default_rng(0)
    W = (np.linalg.qr(rng.standard_normal((dim, dim)))[0] + 1e-3 * rng.standard_normal((dim, dim))).astype(np.float32)
    B = rng.standard_normal((batch, dim)).astype(np.float32)
    state = RefinedInverse()
    state.refresh(W)
    state.K = corrections
    with threadpool_limits(threads):
        for lib in blas_info():
            print(f"BLAS: {lib['internal_api']} {lib['version']} {lib['architecture']}, {lib['num_threads']} threads")
        solve, power = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            state.operator(W).right_solve(B)
            solve.append(time.perf_counter() - t)
            t = time.perf_counter()
            state.norm_squared(W)
            power.append(time.perf_counter() - t)
    s, p = np.median(solve) * 1e3, np.median(power) * 1e3
    print(f"D = {dim}, B = {batch}, float32, K = {corrections}: refined solve {s:.2f} ms (power step included), "
          f"power step {p:.3f} ms, {100 * p / s:.1f}% of the solve")


if __name__ == "__main__":
    main()
