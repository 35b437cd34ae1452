"""Shared pieces of the benchmarks: networks at initialisation, timing, a batch."""
from __future__ import annotations

import time

import numpy as np

from gait_ref.architectures import build
from gait_ref.backend import synchronize, to_device
from gait_ref.config import square_network
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
    net = build(arch, in_shape, K, invertible=square_network(rule))
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


def blas_line() -> str:
    """Which BLAS libraries and thread counts this process runs, for a benchmark's first line."""
    from gait_ref.backend import blas_info
    return "BLAS: " + "; ".join(f"{d['internal_api']} {d['version']} ({d['architecture']}) {d['num_threads']} threads"
                                for d in blas_info())


def interleaved(fns: dict, xp=np, reps: int = 5, steps: int = 1, per_repeat: bool = False) -> dict:
    """Median seconds per call of each function, timed A, B, A, B ... after one warm-up call
    each, ``steps`` calls each time, synchronising ``xp``'s device around each timing
    (``per_repeat``: every repeat's time, in order, instead of the median)."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            synchronize(xp)
            t = time.perf_counter()
            for _ in range(steps):
                f()
            synchronize(xp)
            times[k].append((time.perf_counter() - t) / steps)
    if per_repeat:
        return {k: np.array(v) for k, v in times.items()}
    return {k: float(np.median(v)) for k, v in times.items()}


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """``interleaved`` on the host, in milliseconds per call."""
    return {k: 1e3 * v for k, v in interleaved(fns, reps=repeats).items()}


def alternating_processes(argvs: dict, repeats: int) -> dict:
    """Run ``python`` with each argument list of ``argvs`` (a script and its arguments, or
    ``-c`` and code) in a fresh process, alternating (A, B, A, B ...) ``repeats`` times; each
    prints numbers on its last line. Returns, per key, the median of each printed number."""
    import statistics
    import subprocess
    import sys
    got = {k: [] for k in argvs}
    for _ in range(repeats):
        for k, argv in argvs.items():
            out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True)
            got[k].append([float(v) for v in out.stdout.strip().splitlines()[-1].split()])
    return {k: [statistics.median(col) for col in zip(*v)] for k, v in got.items()}


def rule_step(net, x, y, loss, rule_name, seed=0):
    """A closure computing one step's updates (forward, loss, rule), no optimiser."""
    rule = make_rule(rule_name, net, seed=seed)
    target = square_network(rule_name)

    def step():
        tr = net.forward(x)
        _, gy = loss.value_and_grad(tr.output, y)
        return rule.compute(tr, gy)[0]
    return step, target
