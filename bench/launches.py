"""Kernel launches, CuPy-internal reads and host-device traffic of one training step, per rule
and network, as CuPy 14.2 would make them (counted on the emulated device).

    python bench/launches.py [--rules bp,gait] [--nets conv7-64,mlp-deep] [--by-name]

A launch is a kernel or a cuBLAS/cuSOLVER call (``gait_ref/emulation/launches.py``): what
costs a few microseconds of host time each on a GPU, whatever the batch. The count does
not depend on the batch size, so the step runs at batch 8; it is the mean over steps 2-4
(step 1 builds the inverses and moments). ``--by-name`` lists the calls that launch most.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gait_ref import emulation as em  # noqa: E402
from gait_ref.assembly import build_step  # noqa: E402
from gait_ref.config import Config  # noqa: E402

# name: (--arch, input shape, classes)
NETS = {"conv7-64": ("conv7", (3, 64, 64), 1000), "conv7-224": ("conv7", (3, 224, 224), 1000),
        "mlp-deep": ("mlp-deep", (784,), 10), "mlp-shallow": ("mlp-shallow", (3072,), 10)}
TARGETS = {("conv7-64", "gait"): 500, ("conv7-64", "bp"): 250}


def built_step(net: str, rule: str, batch: int, dtype: str = "float32", xp=em):
    """(the training step as run.py builds it, a random batch) on ``xp``, the emulated device
    unless said otherwise."""
    arch, in_shape, classes = NETS[net]
    cfg = Config(arch=arch, rule=rule, batch_size=batch, dtype=dtype).resolved()
    step = build_step(cfg, in_shape, classes, xp)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.random((batch,) + in_shape, dtype=np.float32).astype(dtype))
    y = xp.asarray(rng.integers(0, classes, batch))
    return step, x, y


def step_counts(net: str, rule: str, steps: int = 4, batch: int = 8, by_name: bool = False, dtype="float32"):
    """Mean launches, internal reads, all reads and copies per step over steps 2..steps."""
    step, x, y = built_step(net, rule, batch, dtype)
    rows, names = [], Counter()
    for n in range(1, steps + 1):
        em.reset_counters()
        with em.launch_trace() as t:
            step(x, y, step=n, epoch=0)
        c = em.reset_counters()
        if n > 1:
            rows.append(c)
            for r in t:
                names[r["name"]] += r["launches"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return mean, (names.most_common(25) if by_name else None)


@click.command()
@click.option("--rules", default="bp,gait", show_default=True)
@click.option("--nets", default="conv7-64,mlp-deep", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--batch", default=8, show_default=True, help="Only the row-blocked solves depend on it.")
@click.option("--by-name", is_flag=True, help="List the 25 calls that launch most, per rule and net.")
def main(rules, nets, dtype, batch, by_name):
    print(f"launches per training step as CuPy {em.API['cupy_version']} makes them (emulated device, {dtype}, "
          f"batch {batch}; mean of steps 2-4)")
    print(f"{'net':<12} {'rule':<14} {'launches':>9} {'target':>7} {'CuPy reads':>11} {'all reads':>10} "
          f"{'H2D':>5} {'ptr tables':>11}")
    for net in nets.split(","):
        for rule in rules.split(","):
            c, top = step_counts(net, rule, batch=batch, by_name=by_name, dtype=dtype)
            target = TARGETS.get((net, rule))
            print(f"{net:<12} {rule:<14} {c['launch']:>9.0f} {target or '':>7} {c['internal_reads']:>11.0f} "
                  f"{c['d2h'] + c['sync']:>10.0f} {c['h2d']:>5.0f} {c['pointer_tables']:>11.0f}")
            if top:
                for name, n in top:
                    print(f"      {n / 3:7.1f}  {name}")


if __name__ == "__main__":
    main()
