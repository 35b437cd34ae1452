"""Why numpy's elementwise work is not split over Python threads: right after a GEMM,
OpenBLAS's threads spin on the other core. Times a GEMM (4096 x 600 x 600, float32) followed by
conv7's first im2col (batch 64, 64 px, C = 3, K = 9, S = 2) or a leaky ReLU on a
(64, 216, 16, 16) map, each done in one thread or in two halves on two threads, interleaved.

    python bench/threaded_elementwise.py [--repeats 20]
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import blas_line, interleaved_ms  # noqa: E402
from gait_ref.im2col import ConvGeometry, im2col  # noqa: E402


@click.command()
@click.option("--repeats", default=20, show_default=True)
def main(repeats):
    print(blas_line())
    pool = ThreadPoolExecutor(2)
    rng = np.random.default_rng(0)
    x = rng.random((64, 64, 64, 3), dtype=np.float32).transpose(0, 3, 1, 2)     # channels-last, as in the step
    g = ConvGeometry(3, 64, 64, 9, 2, "same")
    A, W = rng.random((4096, 600), dtype=np.float32), rng.random((600, 600), dtype=np.float32)
    h = rng.standard_normal((64, 216, 16, 16), dtype=np.float32)
    a = np.float32(0.1)

    def halves(f):
        list(pool.map(f, (slice(0, 32), slice(32, 64))))

    def act_halves():
        out = np.empty_like(h)
        halves(lambda sl: np.maximum(h[sl], h[sl] * a, out=out[sl]))

    fns = {"GEMM": lambda: A @ W,
           "GEMM + im2col, one thread": lambda: (A @ W, im2col(x, g)),
           "GEMM + im2col, two threads": lambda: (A @ W, halves(lambda sl: im2col(x[sl], g))),
           "GEMM + leaky ReLU, one thread": lambda: (A @ W, np.maximum(h, h * a)),
           "GEMM + leaky ReLU, two threads": lambda: (A @ W, act_halves())}
    for k, ms in interleaved_ms(fns, repeats).items():
        print(f"- {k}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
