"""Bartunov et al.'s (2018) random hyperparameter search for DTP and SDTP, as a table of
runs: configurations drawn from their search space (their Table 4), each screened by a
short training run, and the best configuration trained to convergence.

The paper drew 60 random configurations per method and "selected the best run ... based
on validation set accuracy across 5 consecutive training epochs". Here each configuration
trains ``SCREEN_EPOCHS`` epochs with the last 10,000 training images held out, and its
score is its mean validation error over its last 5 epochs; the best-scoring configuration
of each method is then trained like the other rows of table ``bartunov`` (early stopping,
test error at the best validation epoch). The screen is shorter than the paper's runs (a
CPU budget): it favours configurations that learn fast, which the report says.

The paper gives the ranges but not how it sampled them: learning rates are drawn
log-uniformly, alpha and sigma uniformly, the discrete choices uniformly. Adam's beta1 is
fixed to 0.9 by the paper and is the default here.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .runfolder import read_records

SCREEN_EPOCHS = 12
SCORE_EPOCHS = 5                      # "validation set accuracy across 5 consecutive training epochs"
N_CONFIGS = {"sdtp": 60, "dtp": 60}   # the paper drew 60 per method

# Bartunov et al. 2018, Table 4: (option, kind, domain)
SEARCH_SPACE = (
    ("--lr", "log-uniform", (1e-5, 3e-4)),
    ("--adam-beta2", "choice", (0.99, 0.999)),
    ("--adam-eps", "choice", (1e-4, 1e-6, 1e-8)),
    ("--feedback-lr", "log-uniform", (1e-5, 3e-4)),
    ("--feedback-adam-beta2", "choice", (0.99, 0.999)),
    ("--feedback-adam-eps", "choice", (1e-4, 1e-6, 1e-8)),
    ("--dtp-alpha", "uniform", (0.01, 0.2)),            # DTP only: SDTP's top target has no step
    ("--dtp-sigma", "uniform", (0.01, 0.3)),
)


def draw_configs(rule: str, n: int, seed: int = 2018) -> list[list]:
    """``n`` configurations for ``rule`` (dtp or sdtp) as run.py arguments, the same on
    every machine (the stream is keyed by the seed and the rule)."""
    rng = np.random.default_rng([seed, ("dtp", "sdtp").index(rule)])
    configs = []
    for _ in range(n):
        args = []
        for option, kind, domain in SEARCH_SPACE:
            if kind == "log-uniform":
                value = math.exp(rng.uniform(math.log(domain[0]), math.log(domain[1])))
            elif kind == "uniform":
                value = rng.uniform(*domain)
            else:
                value = domain[int(rng.integers(len(domain)))]
            if option == "--dtp-alpha" and rule != "dtp":
                continue                                   # drawn anyway: the streams stay aligned
            args += [option, float(f"{value:.3g}")]
        configs.append(args)
    return configs


def screen_score(run_dir: Path) -> float | None:
    """Mean validation error (%) over the run's last ``SCORE_EPOCHS`` epochs; None before
    the run has validation records."""
    try:
        vals = read_records(run_dir, "val")
    except FileNotFoundError:
        return None
    if not vals:
        return None
    last = vals[-SCORE_EPOCHS:]
    return 100 * (1 - sum(r["top1"] for r in last) / len(last))


def best_screened(scores: dict) -> str | None:
    """The name with the lowest score (ties: the first drawn); None if any is missing."""
    if not scores or any(v is None for v in scores.values()):
        return None
    return min(scores, key=lambda name: (scores[name], name))
