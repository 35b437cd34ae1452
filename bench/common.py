"""Shared pieces of the benchmarks: networks at initialisation, timing, a batch."""
from __future__ import annotations

import time

import numpy as np

from gait_ref.architectures import build
from gait_ref.backend import synchronize, to_device
from gait_ref.losses import SoftmaxCrossEntropy
from gait_ref.rules import make_rule

NETWORKS = {
    # name: (arch, input shape, classes, batch)
    "mlp-deep": ("mlp-deep", (3, 32, 32), 10, 256),
    "conv7-64px": ("conv7", (3, 64, 64), 1000, 64),
}
QUICK_BATCH = {"mlp-deep": 64, "conv7-64px": 16}


def setup(name, rule, xp, dtype, seed=0, batch=None):
    arch, in_shape, K, B = NETWORKS[name]
    B = batch or B
    net = build(arch, in_shape, K, invertible=rule in ("tp", "itp", "gait-vanilla", "gait"))
    net.init(seed, "orthogonal", xp, dtype)
    rng = np.random.default_rng(seed + 1)
    x = to_device(rng.random((B,) + in_shape).astype(dtype), xp)      # like /255 pixels
    y = to_device(rng.integers(0, K, B), xp)
    return net, x, y, SoftmaxCrossEntropy(K)


def timed(fn, xp, repeats=3, warmup=1):
    """Median wall time of fn() over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(xp)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(xp)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def rule_step(net, x, y, loss, rule_name, seed=0):
    """A closure computing one step's updates (forward, loss, rule), no optimiser."""
    rule = make_rule(rule_name, net, seed=seed)
    target = rule_name in ("tp", "itp", "gait-vanilla", "gait")

    def step():
        tr = net.forward(x)
        _, gy = loss.value_and_grad(tr.output, y)
        return rule.compute(tr, gy)[0]
    return step, target
