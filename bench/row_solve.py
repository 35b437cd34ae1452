"""A renewing layer's solve two ways, interleaved: the bounded row solve that the step runs
(``_RefinedSolve._solve_by_rows``: x = B_c X_c as a float64 product rounded once, and an
upper bound on the backward error from E = I[:c] - X_c W) against the residual it replaced
(x = B_c X_c in float32, then r = B - x W, a rows x D x D GEMM, and its norm). Prints ms per
solve and the ratio for conv7's renewing layers at 64 px (batch 64, the benchmarks' size)
and at 224 px (batch 256, ImageNet's).

    python bench/row_solve.py [--backend numpy|cupy] [--px 64,224] [--repeats 5]

On a GPU this is the figure that says whether the float64 product pays there: a GPU with a
small float64 rate may run the residual faster (bench/gpu_check.py runs it).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import blas_line, interleaved  # noqa: E402

from gait_ref.architectures import build  # noqa: E402
from gait_ref.backend import get_backend, to_device  # noqa: E402
from gait_ref.linalg import (RefinedInverse, _RefinedSolve, _residual, backward_errors, residual_bound,  # noqa: E402
                             squared_norm)
from gait_ref.rules.targets import _solve_rows  # noqa: E402

BATCH = {64: 64, 224: 256}


def renewing_layers(px: int, batch: int):
    """(name, rows, D, c) of conv7's layers whose solves have at least D rows and c < D live
    channels at this size (shapes only)."""
    net = build("conv7", (3, px, px), 1000, invertible=True)
    net.init(0, "orthogonal", np, np.float32)
    out = []
    for i, layer in enumerate(net.layers[1:], start=1):
        W, c = layer.params["W"], net.live_channels(i)
        rows = _solve_rows(layer, W, batch)
        if c is not None and rows >= W.shape[-1]:
            out.append((layer.name, rows, W.shape[-1], c))
    return out


def residual_solve(B, Xc, W, state):
    """The path before: the float32 product and the residual that verified it."""
    x = B @ Xc
    r = _residual(B, x, W)
    return x, [state.norm_squared(W), squared_norm(B), squared_norm(x), squared_norm(r)]


def row_solve(B, W, state):
    """The path the step runs (``_RefinedSolve._solve_by_rows``)."""
    op = _RefinedSolve(state, W)
    return op.right_solve(B), op.sq


@click.command()
@click.option("--backend", default="numpy", type=click.Choice(["numpy", "cupy"]))
@click.option("--px", default="64,224", show_default=True)
@click.option("--repeats", default=5, show_default=True)
def main(backend, px, repeats):
    xp = get_backend(backend)
    print(f"row solve against the residual, backend {backend}, {os.cpu_count()} CPU cores, numpy {np.__version__}")
    print(blas_line())
    print("| size | layer | rows | D | live c | residual ms | row solve ms | row / residual | both meet 64 eps |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for p in (int(v) for v in px.split(",")):
        for name, rows, D, c in renewing_layers(p, BATCH[p]):
            W0 = np.linalg.qr(rng.standard_normal((D, D)))[0]
            W = to_device((W0 + 1e-3 * rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32), xp)
            B = to_device(rng.standard_normal((rows, c)).astype(np.float32), xp)
            state = RefinedInverse()
            state.operator(W, rows, live=c)                  # whole inverse first, as a first step
            state.settle(W)
            state.K = 0
            state.refresh(W, live=c)                         # the c rows a renewing layer keeps
            assert state.X.shape == (c, D)
            fns = {"residual": lambda: residual_solve(B, state.X, W, state), "rows": lambda: row_solve(B, W, state)}
            # the backward error (or its bound) each path reports, against the bound every solve must meet
            ok = {k: backward_errors(f()[1])[0] <= residual_bound(np.float32) for k, f in fns.items()}
            t = interleaved(fns, xp, reps=repeats, steps=1)
            a, b = t["residual"] * 1e3, t["rows"] * 1e3
            print(f"| {p} px, batch {BATCH[p]} | {name} | {rows} | {D} | {c} | {a:.2f} | {b:.2f} | {b / a:.2f} | "
                  f"{'yes' if all(ok.values()) else 'NO: ' + str(ok)} |", flush=True)


if __name__ == "__main__":
    main()
