"""The training step of two checkouts of gait_ref, interleaved (A, B, A, B), each timing in
its own process so that neither imports the other's code. Prints ms per step and, for
GAIT-prop, the refinement's recomputed steps per step.

    git worktree add /tmp/old <commit>
    python bench/ab_versions.py /tmp/old . [--case mlp-deep:1:20 --case conv7-64px:1:12] [--repeats 3]

A case is network:ortho_every:steps[:rule] (networks as in bench/perf.py, float32, the
paper's settings, three warm-up steps first); rule is gait (the default), bp (the ordinary
network) or bp-square (BP on GAIT-prop's square network).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternating_processes  # noqa: E402

WORKER = """
import sys, time
root = sys.argv[1]
sys.path[:0] = [root + "/bench", root]
import numpy as np
import perf
name, every, steps, rule = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
s = perf.Setup(name, rule.replace("-square", ""), np, np.float32, perf.NETS[name][1], ortho_every=every,
               invertible=True if rule.endswith("-square") else None)
s.rule.stats = getattr(s.rule, "stats", {"recursions": 0, "steps": 0})
for _ in range(3):
    s.train_step()
st0 = dict(s.rule.stats)
t = time.perf_counter()
for _ in range(steps):
    s.train_step()
dt = (time.perf_counter() - t) / steps
st = {k: s.rule.stats[k] - st0[k] for k in st0}
import gait_ref
assert gait_ref.__file__.startswith(str(__import__("pathlib").Path(root).resolve())), gait_ref.__file__
print(dt, (st["recursions"] - st["steps"]) / max(1, st["steps"]))
"""


@click.command()
@click.argument("a", type=click.Path(exists=True, file_okay=False))
@click.argument("b", type=click.Path(exists=True, file_okay=False))
@click.option("--case", "cases", multiple=True, default=["mlp-deep:1:20", "conv7-64px:1:12"], show_default=True)
@click.option("--repeats", default=3, show_default=True)
def main(a, b, cases, repeats):
    roots = {"A": str(Path(a).resolve()), "B": str(Path(b).resolve())}
    print(f"A = {roots['A']}, B = {roots['B']}; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| case | A ms | B ms | B/A | A recomputed/step | B recomputed/step |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        name, every, steps, rule = (case + ":gait").split(":")[:4]
        med = alternating_processes({k: ["-c", WORKER, root, name, every, steps, rule] for k, root in roots.items()},
                                    repeats)
        t = {k: v[0] for k, v in med.items()}
        r = {k: v[1] for k, v in med.items()}
        print(f"| {name} {rule} every {every} | {t['A'] * 1e3:.0f} | {t['B'] * 1e3:.0f} | {t['B'] / t['A']:.2f} | "
              f"{r['A']:.2f} | {r['B']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
