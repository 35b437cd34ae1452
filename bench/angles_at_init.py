"""Per-layer angle to BP of every rule at initialisation, float32 and float64, and each
rule's step time relative to BP's in the same run (issue: learning rules benchmark).

    python bench/angles_at_init.py [--quick] [--backend numpy|cupy]
    python bench/angles_at_init.py --compare-forms      # absolute vs difference target form

Networks: the scaling paper's deep CIFAR MLP (six hidden layers of 1024) at batch
256, and its ImageNet conv net at 64 px, batch 64. The square (invertible) version of
each network is used for every rule, so all rules see the same forward pass.
"""
from __future__ import annotations

import click
import numpy as np

from common import NETWORKS, QUICK_BATCH, rule_step, setup, timed
from gait_ref.backend import get_backend
from gait_ref.metrics import compare_updates
from gait_ref.rules import RULES, make_rule


@click.command()
@click.option("--quick", is_flag=True, help="Smaller batches, one timing repeat.")
@click.option("--backend", default="numpy", type=click.Choice(["numpy", "cupy"]))
@click.option("--networks", default=",".join(NETWORKS), show_default=True)
@click.option("--compare-forms", is_flag=True,
              help="Only the deep MLP: vanilla and normalized GAIT-prop, absolute vs difference target form.")
def main(quick, backend, networks, compare_forms):
    xp = get_backend(backend)
    if compare_forms:
        return forms(xp, quick)
    for name in networks.split(","):
        for dtype in (np.float32, np.float64):
            batch = QUICK_BATCH[name] if quick else None
            net, x, y, loss = setup(name, "gait", xp, dtype, batch=batch)
            step_bp, _ = rule_step(net, x, y, loss, "bp")
            bp = step_bp()
            t_bp = timed(step_bp, xp, repeats=1 if quick else 3)
            print(f"\n## {name}, {dtype.__name__}, batch {x.shape[0]}, {backend} "
                  f"(BP step {t_bp * 1e3:.1f} ms)")
            names = [l.name for l in net.layers]
            print(f"| rule | {' | '.join(names)} | time / BP |")
            print("|---" * (len(names) + 2) + "|")
            for rule in RULES:
                step, _ = rule_step(net, x, y, loss, rule)
                cmp = compare_updates(net, step(), bp)
                t = timed(step, xp, repeats=1 if quick else 3)
                cells = " | ".join(f"{cmp[n]['angle_deg']:.3g}" for n in names)
                print(f"| {rule} | {cells} | {t / t_bp:.2f} |", flush=True)


def forms(xp, quick):
    """Why vanilla GP 'collapses' in deep nets: the absolute recursion's rounding."""
    batch = QUICK_BATCH["mlp-deep"] if quick else None
    print("| dtype | target form | rule | " + " | ".join(f"fc{i}" for i in range(1, 7)) + " |")
    print("|---" * 9 + "|")
    for dtype in (np.float64, np.float32):
        net, x, y, loss = setup("mlp-deep", "gait", xp, dtype, batch=batch)
        tr = net.forward(x)
        _, gy = loss.value_and_grad(tr.output, y)
        bp, _ = make_rule("bp", net).compute(tr, gy)
        for form in ("absolute", "difference"):
            for rule in ("gait-vanilla", "gait"):
                g, _ = make_rule(rule, net, form=form).compute(tr, gy)
                cmp = compare_updates(net, g, bp)
                cells = " | ".join(f"{cmp[f'fc{i}']['angle_deg']:.3g}" for i in range(1, 7))
                print(f"| {dtype.__name__} | {form} | {rule} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
