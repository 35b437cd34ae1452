"""What one square layer's solve x = B W^-1 costs each way, in one run, interleaved
(A, B, A, B): the figures behind "the GP/BP targets are at the verified solver's flop count"
in docs/BENCHMARKS.md.

For the deep MLP's layers (D = 1024, 256 rows) and conv7's top layers (D = 864, 256 rows),
float32 and float64, milliseconds per call:

- ``numpy solve``: ``numpy.linalg.solve``, a fresh LU and triangular solves in numpy's
  OpenBLAS (what ``--inverse-solver lu`` runs);
- ``scipy LU``: ``scipy.linalg.lu_factor`` + ``lu_solve`` in scipy's own OpenBLAS, timed
  apart from numpy's calls;
- ``scipy LU after a GEMM``: the same, each call right after a numpy GEMM of the same
  size, minus that GEMM's time alone (the two libraries' thread pools contend; this is why
  the step no longer calls scipy);
- ``GEMM``: one B X (B x D times D x D), the unit the refined solve is made of: a refined
  solve with K corrections is 2 + 2K of them (the first product, two per correction, and the
  residual that verifies the last);
- ``Newton-Schulz``: one renewal X (2 I - W X) of the kept inverse, two D x D x D GEMMs;
- and the totals per solve: a fresh LU plus the one GEMM that would verify it (the bound
  is a guarantee only where it is checked), against refinement at K = 1 and K = 2.

    python bench/inverse_strategies.py [--repeats 7]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import scipy.linalg as sl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import blas_line, interleaved_ms  # noqa: E402


def _near_orthogonal(rng, D, dtype):
    Q = np.linalg.qr(rng.standard_normal((D, D)))[0]
    return (Q + 1e-2 * rng.standard_normal((D, D)) / np.sqrt(D)).astype(dtype)


@click.command()
@click.option("--repeats", default=7, show_default=True)
def main(repeats):
    print(blas_line())
    print("| D | rows | dtype | numpy solve | scipy LU | scipy LU after a GEMM | GEMM | Newton-Schulz | "
          "LU + verifying GEMM (best LU) | refine K = 1 | refine K = 2 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for D, rows in ((1024, 256), (864, 256)):
        for dt in (np.float32, np.float64):
            rng = np.random.default_rng(0)
            W = _near_orthogonal(rng, D, dt)
            X = np.linalg.inv(W)
            B = rng.standard_normal((rows, D)).astype(dt)
            WT = np.ascontiguousarray(W.T)
            two_i = 2 * np.eye(D, dtype=dt)
            def scipy_lu():
                return sl.lu_solve(sl.lu_factor(W, check_finite=False), B.T, trans=1, check_finite=False)
            # three groups, each interleaved within itself, with a pause between them so that
            # one library's spinning threads do not slow the other's calls except where meant
            ms = {}
            for group in ({"numpy solve": lambda: np.linalg.solve(WT, B.T), "GEMM": lambda: B @ X,
                           "Newton-Schulz": lambda: X @ (two_i - W @ X)},
                          {"scipy LU": scipy_lu},
                          {"GEMM then scipy LU": lambda: (B @ X, scipy_lu())}):
                time.sleep(0.5)
                ms.update(interleaved_ms(group, repeats))
            contended = ms["GEMM then scipy LU"] - ms["GEMM"]
            best_lu = min(ms["numpy solve"], ms["scipy LU"])
            print(f"| {D} | {rows} | {dt.__name__} | {ms['numpy solve']:.1f} | {ms['scipy LU']:.1f} | {contended:.1f} | "
                  f"{ms['GEMM']:.2f} | {ms['Newton-Schulz']:.1f} | {best_lu + ms['GEMM']:.1f} | "
                  f"{4 * ms['GEMM']:.1f} | {6 * ms['GEMM']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
