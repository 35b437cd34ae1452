"""B @ W^-1 for one square layer: LU factor + solve (what gait_ref does) against an explicit
inverse + GEMM, and one forward GEMM for scale. Prints milliseconds per call.

    python bench/inverse_strategies.py
"""
import time

import numpy as np
import scipy.linalg as sl


def ms(fn, reps=5):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


if __name__ == "__main__":
    print("| D | dtype | batch | LU + solve ms | inv + GEMM ms | one GEMM ms |")
    print("|---|---|---|---|---|---|")
    for D in (432, 864, 1024):
        for dt in (np.float32, np.float64):
            rng = np.random.default_rng(0)
            W = rng.standard_normal((D, D)).astype(dt)
            B = rng.standard_normal((256, D)).astype(dt)
            lu = ms(lambda: sl.lu_solve(sl.lu_factor(W, check_finite=False), B.T, trans=1, check_finite=False))
            inv = ms(lambda: B @ np.linalg.inv(W))
            gemm = ms(lambda: B @ W)
            print(f"| {D} | {dt.__name__} | 256 | {lu:.1f} | {inv:.1f} | {gemm:.1f} |", flush=True)
