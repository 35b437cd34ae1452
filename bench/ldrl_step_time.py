"""Time of one L-DRL training step on Ernoult et al.'s SimpleVGG (CIFAR-10 shapes, their
per-layer feedback settings: 160 feedback iterations per batch), split into feedback
training, targets + forward updates, and a BP backward pass for scale. Prints figures.

    python bench/ldrl_step_time.py [--backend numpy|cupy] [--batch 128] [--repeats 2]
"""
from __future__ import annotations

import time

import click
import numpy as np

from gait_ref.architectures import build
from gait_ref.backend import get_backend, synchronize, to_device
from gait_ref.config import Config
from gait_ref.losses import make_loss
from gait_ref.rules import make_rule


@click.command()
@click.option("--backend", default="numpy", type=click.Choice(["numpy", "cupy"]))
@click.option("--batch", default=128, type=int)
@click.option("--repeats", default=2, type=int)
def main(backend, batch, repeats):
    xp = get_backend(backend)
    cfg = Config(task="cifar10", arch="simple-vgg", rule="ldrl").resolved()
    net = build("simple-vgg", (3, 32, 32), 10, False)
    net.init(0, "glorot", xp, np.float32)
    rule = make_rule("ldrl", net, dtp_options=dict(
        alpha=cfg.dtp_alpha, beta=cfg.ldrl_beta, sigma=cfg.dtp_sigma, feedback_lr=cfg.feedback_lr,
        ldrl_iters=cfg.ldrl_iters, feedback_form=cfg.feedback_form, reduction=cfg.reduction))
    rng = np.random.default_rng(0)
    x = to_device(rng.standard_normal((batch, 3, 32, 32)).astype(np.float32), xp)
    y = to_device(rng.integers(0, 10, batch), xp)
    loss = make_loss("cross_entropy", 10, "mean")
    for i in range(repeats):
        t0 = time.perf_counter()
        tr = net.forward(x)
        _, gy = loss.value_and_grad(tr.output, y)
        rule.feedback_step(tr, rng)
        synchronize(xp)
        t1 = time.perf_counter()
        rule.compute(tr, gy, y)
        synchronize(xp)
        t2 = time.perf_counter()
        net.backward(tr, gy)
        synchronize(xp)
        t3 = time.perf_counter()
        print(f"simple-vgg L-DRL, {backend}, batch {batch}, repeat {i}: feedback training {t1 - t0:.2f} s "
              f"({sum(rule.iters)} iterations), targets + updates {t2 - t1:.2f} s, BP backward {t3 - t2:.2f} s")


if __name__ == "__main__":
    main()
