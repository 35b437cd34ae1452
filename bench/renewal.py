"""How the refine solver keeps X for a layer whose solves have at least D rows: a fresh inverse of
each step's W (the policy), against a Newton-Schulz renewal X (2 I - W X) of the last step's X.

1. One matrix, D = 216 .. 1000 float32 (conv7's and the deep MLP's sizes): the time of
   ``numpy.linalg.inv`` and of the two Newton-Schulz GEMMs, interleaved.
2. conv7 at 64 px, batch 64, float32, GAIT-prop training steps on real images at the paper's
   settings, two networks from the same seed, one per policy, stepped alternately: ms per step,
   corrections per solve and recomputed steps per step, and each renewing layer's backward
   error before any correction (eta_0) and planned corrections at the end.
   For the layers with fewer rows than D, whose X is kept and renewed when the plan passes
   the maximum, their renewals per step. (A renewal priced at D / rows corrections, a ski
   rental, was tried with a section 3 here at commit 799830c and reverted: within noise,
   docs/bench-renewal-priced.txt.)

    python bench/renewal.py [--steps 12] [--repeats 3]
"""
from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import blas_line, interleaved_ms  # noqa: E402
from perf import Setup  # noqa: E402
from gait_ref.linalg import RefinedInverse  # noqa: E402


def _newton_operator(self, W, rows=0, retry=False):
    """RefinedInverse.operator with the alternative policy: renewing layers renew X by Newton-Schulz."""
    was_renewing = rows >= W.shape[-1]
    op = RefinedInverse.operator(self, W, 0, retry)          # rows 0: keeps X, renews nothing
    self.renewing = was_renewing
    if was_renewing and not self.exact_now:
        self.refresh(W, newton=True)
    return op


def _matrix_times(repeats):
    rng = np.random.default_rng(0)
    print("\n## 1. one matrix, float32: a fresh inverse against a Newton-Schulz renewal (ms, medians)")
    for D in (216, 432, 600, 864, 1000):
        W = np.linalg.qr(rng.standard_normal((D, D)))[0].astype(np.float32)
        X = np.linalg.inv(W)

        def newton():
            T = -(W @ X)
            T[np.arange(D), np.arange(D)] += 2
            return X @ T
        ms = interleaved_ms({"inv": lambda: np.linalg.inv(W), "newton": newton}, repeats)
        print(f"- D = {D}: numpy.linalg.inv {ms['inv']:.2f}, Newton-Schulz (2 GEMMs) {ms['newton']:.2f}")


def _compare(title, runs, steps, repeats):
    """Step each Setup of ``runs`` alternately, ``repeats`` blocks of ``steps`` after 3 warm-up
    steps; print ms per step and the refinement's statistics."""
    print(f"\n## {title} ({repeats} interleaved blocks of {steps} steps)")
    for s in runs.values():
        for _ in range(3):
            s.train_step()
    start = {k: (dict(s.rule.stats), [r.refreshes for r in s.rule.refined]) for k, s in runs.items()}
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, s in runs.items():
            t = time.perf_counter()
            for _ in range(steps):
                s.train_step()
            times[k].append((time.perf_counter() - t) / steps)
    for k, s in runs.items():
        (s0, r0), st = start[k], s.rule.stats
        n, solves = st["steps"] - s0["steps"], st["solves"] - s0["solves"]
        kept = [(l.name, r, r.refreshes - a) for l, r, a in zip(s.net.layers, s.rule.refined, r0)
                if r.X is not None and not r.renewing]
        print(f"- {k}: {1e3 * float(np.median(times[k])):.0f} ms per step (blocks: "
              f"{', '.join(f'{1e3 * t:.0f}' for t in times[k])}); "
              f"{(st['corrections'] - s0['corrections']) / solves:.2f} corrections per solve, "
              f"{(st['recursions'] - s0['recursions'] - n) / n:.2f} recomputed steps per step")
        renewing = [(l.name, r) for l, r in zip(s.net.layers, s.rule.refined) if r.renewing]
        if renewing:
            print("  layers renewed at every step, eta_0 and planned corrections at the end: "
                  + ", ".join(f"{name} {r.etas[0]:.1e} K={r.K}" for name, r in renewing))
        if kept:
            print("  layers with a kept X, renewals per step: "
                  + ", ".join(f"{name} {m / n:.2f}" for name, _, m in kept))


@click.command()
@click.option("--steps", default=12, show_default=True, help="training steps per timed block")
@click.option("--repeats", default=3, show_default=True, help="timed blocks per policy, interleaved")
def main(steps, repeats):
    print(blas_line())
    _matrix_times(20)
    runs = {"fresh inverse (the policy)": Setup("conv7-64px", "gait", np, np.float32, 64, solver="refine"),
            "Newton-Schulz renewal": Setup("conv7-64px", "gait", np, np.float32, 64, solver="refine")}
    for r in runs["Newton-Schulz renewal"].rule.refined:
        r.operator = types.MethodType(_newton_operator, r)
    _compare("2. layers with at least D rows: conv7 64 px, batch 64, float32, GP training steps", runs, steps, repeats)


if __name__ == "__main__":
    main()
