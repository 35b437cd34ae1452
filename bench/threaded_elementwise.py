"""Why numpy's elementwise work is not split over Python threads: right after a GEMM,
OpenBLAS's threads spin on the other core. Times a GEMM (4096 x 600 x 600, float32) followed by
conv7's first im2col (batch 64, 64 px, C = 3, K = 9, S = 2) or a leaky ReLU on a
(64, 216, 16, 16) map, each done in one thread or in two halves on two threads, interleaved.
The im2col is split two ways: two separate column matrices (what a step cannot use: the GEMM
needs one), and the two halves copied by ``numpy.copyto`` into one preallocated matrix.
With glibc's default malloc settings the big outputs are page-faulted in at every call,
and faulting in parallel is what two threads gained; with the trainer's setting
(``gait_ref.hostmem.keep_freed_memory``, the default here) that gain is gone.

    python bench/threaded_elementwise.py [--repeats 20] [--default-malloc]
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import blas_line, interleaved_ms  # noqa: E402
from gait_ref.hostmem import describe, keep_freed_memory  # noqa: E402
from gait_ref.im2col import ConvGeometry, im2col, windows  # noqa: E402


@click.command()
@click.option("--repeats", default=20, show_default=True)
@click.option("--default-malloc", is_flag=True, help="glibc's defaults, not the trainer's kept memory")
def main(repeats, default_malloc):
    if not default_malloc:
        keep_freed_memory()
    print(blas_line() + f"; host memory: {'glibc defaults' if default_malloc else describe()}")
    pool = ThreadPoolExecutor(2)
    rng = np.random.default_rng(0)
    x = rng.random((64, 64, 64, 3), dtype=np.float32).transpose(0, 3, 1, 2)     # channels-last, as in the step
    g = ConvGeometry(3, 64, 64, 9, 2, "same")
    A, W = rng.random((4096, 600), dtype=np.float32), rng.random((600, 600), dtype=np.float32)
    h = rng.standard_normal((64, 216, 16, 16), dtype=np.float32)
    a = np.float32(0.1)

    def halves(f):
        list(pool.map(f, (slice(0, 32), slice(32, 64))))

    def im2col_one_matrix():
        """The two halves of the window copy written into one column matrix (as the step needs)."""
        win = windows(x, g)
        out = np.empty(win.shape, dtype=x.dtype)
        halves(lambda sl: np.copyto(out[sl], win[sl]))
        return out.reshape(-1, g.D)

    def act_halves():
        out = np.empty_like(h)
        halves(lambda sl: np.maximum(h[sl], h[sl] * a, out=out[sl]))

    np.testing.assert_array_equal(im2col_one_matrix(), im2col(x, g))
    fns = {"GEMM": lambda: A @ W,
           "GEMM + im2col, one thread": lambda: (A @ W, im2col(x, g)),
           "GEMM + im2col, two threads, two matrices": lambda: (A @ W, halves(lambda sl: im2col(x[sl], g))),
           "GEMM + im2col, two threads, one matrix": lambda: (A @ W, im2col_one_matrix()),
           "GEMM + leaky ReLU, one thread": lambda: (A @ W, np.maximum(h, h * a)),
           "GEMM + leaky ReLU, two threads": lambda: (A @ W, act_halves())}
    for k, ms in interleaved_ms(fns, repeats).items():
        print(f"- {k}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
