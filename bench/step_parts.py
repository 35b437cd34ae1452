"""Two parts of a training step, each against its alternative, interleaved (A, B, A, B):

- Adam on the deep MLP's parameters (3072 x 1024, six 1024 x 1024, 1024 x 10; 9.4 M float32)
  updated block by block (``gait_ref.optim.CPU_BLOCK``) against whole arrays;
- the regulariser's W W^T for D = 1024 float32 as ``W @ W.T`` (numpy calls syrk) against a
  GEMM with a transposed copy;
- the training step's finiteness flag per layer output, and a solve's squared norm (see
  ``_finiteness_and_norms``).

    python bench/step_parts.py [--repeats 12]

Prints medians in ms and the BLAS that ran (threadpoolctl).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gait_ref import optim  # noqa: E402
from gait_ref.backend import blas_info  # noqa: E402


def _median_ms(times):
    return f"{1e3 * float(np.median(times)):.1f} ms"


@click.command()
@click.option("--repeats", default=12, show_default=True)
def main(repeats):
    print("BLAS: " + "; ".join(f"{d['internal_api']} {d['version']} ({d['architecture']}) {d['num_threads']} threads"
                               for d in blas_info()))
    rng = np.random.default_rng(0)
    shapes = [(3072, 1024)] + [(1024, 1024)] * 6 + [(1024, 10)]
    params = {f"{i}/W": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    blocks = {"blocked": optim.CPU_BLOCK, "whole arrays": 1 << 40}
    opts = {k: optim.Adam(lr=1e-4, eps_placement="tf") for k in blocks}
    copies = {k: {n: v.copy() for n, v in params.items()} for k in blocks}
    times = {k: [] for k in blocks}
    default = optim.CPU_BLOCK
    try:
        for _ in range(repeats):
            for k, block in blocks.items():
                optim.CPU_BLOCK = block
                t = time.perf_counter()
                opts[k].step(copies[k], grads)
                times[k].append(time.perf_counter() - t)
    finally:
        optim.CPU_BLOCK = default
    print("Adam, 9.4 M float32 parameters: " + ", ".join(f"{k} {_median_ms(v[2:])}" for k, v in times.items()))
    W = params["1/W"]
    forms = {"W @ W.T (syrk)": lambda: W @ W.T, "W @ copy of W.T (GEMM)": lambda: W @ np.ascontiguousarray(W.T)}
    times = {k: [] for k in forms}
    for _ in range(repeats):
        for k, f in forms.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    print("W W^T, D = 1024 float32: " + ", ".join(f"{k} {_median_ms(v[2:])}" for k, v in times.items()))
    _finiteness_and_norms(repeats)


def _finiteness_and_norms(repeats):
    """The step's per-layer finiteness flag on conv7's outputs (the square net, batch 64), as a
    count of non-finite entries against ``isfinite().all()``; a solve's squared norm on conv7's
    conv2 solve (16384 x 216) as ``(a * a).sum()`` against one BLAS dot (``squared_norm``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import interleaved_ms
    from perf import Setup
    from gait_ref.linalg import squared_norm
    s = Setup("conv7-64px", "bp", np, np.float32, 64, invertible=True)
    ys = s.net.forward(s.x).ys
    ms = interleaved_ms({"count": lambda: [(~np.isfinite(v)).sum() for v in ys],
                         "all": lambda: [np.isfinite(v).all() for v in ys]}, repeats)
    print(f"finiteness of conv7's {sum(v.size for v in ys) / 1e6:.1f} M outputs: count of non-finite entries "
          f"{ms['count']:.2f} ms, isfinite().all() {ms['all']:.2f} ms")
    a = np.random.default_rng(0).standard_normal((16384, 216), dtype=np.float32)
    exact = float((a.astype(np.float64) ** 2).sum())
    ms = interleaved_ms({"sum": lambda: (a * a).sum(), "dot": lambda: squared_norm(a)}, repeats)
    print(f"squared norm of a 16384 x 216 float32 matrix: (a * a).sum() {ms['sum']:.2f} ms "
          f"(relative error {abs(float((a * a).sum()) - exact) / exact:.1e}), squared_norm {ms['dot']:.2f} ms "
          f"({abs(float(squared_norm(a)) - exact) / exact:.1e})")


if __name__ == "__main__":
    main()
