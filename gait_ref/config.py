"""Run configuration and the papers' presets.

Hyperparameters depend on the architecture family and the rule, following the two
reference codes (see ../shared/notes/ALGORITHMS.md):

* ``neurips`` (mlp-<W>x<N>, mlp-tower; GAIT-prop NeurIPS 2020 code): leaky ReLU on every
  layer, MSE to one-hot averaged over the batch, batch 60, 100 epochs, off-diagonal
  orthogonality regulariser; BP/GAIT lr 1e-4 (GAIT lambda 0.1), TP lr 1e-5 lambda 1000.
* ``scaling-cifar`` (mlp-shallow, mlp-deep) and ``scaling-imagenet`` (conv7): the scaling
  paper's code: softmax cross-entropy summed over the batch, batch 256, 200 epochs,
  Adam (TF epsilon placement), full orthogonality regulariser, values of Appendix
  table in ALGORITHMS.md.
* ``bartunov`` (bartunov-mlp, bartunov-lc; Bartunov et al. 2018): tanh, Glorot, softmax
  cross-entropy, Adam for model and inverses with values inside the paper's search
  ranges (its Table 4 gives ranges, not the chosen values).
* ``ernoult`` (simple-vgg, vgg-*; Ernoult et al. 2022's public code, CIFAR-10 defaults):
  batch 128, 90 epochs; L-DRL and BP: SGD lr 0.08 momentum 0.9 weight decay 1e-4 with
  a cosine schedule (the other rules: Adam 3e-4); L-DRL beta 0.7 and, for SimpleVGG's five feedback layers (g_1 first),
  feedback SGD (momentum 0.9) lrs 1e-4, 3.5e-4, 8e-3, 8e-3, 0.18, noise 0.4, 0.4, 0.2,
  0.2, 0.08 and 20, 30, 35, 55, 20 iterations per batch.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np

TASK_DEFAULT_ARCH = {"mnist": "mlp-784x4", "fashion-mnist": "mlp-784x4", "kmnist": "mlp-784x4",
                     "cifar10": "mlp-shallow", "imagenet": "conv7", "imagenet32": "conv7",
                     "synthetic": "mlp-64x2"}

TARGET_RULES = ("tp", "itp", "gait-vanilla", "gait")
DTP_RULES = ("dtp", "sdtp", "ldrl")


def square_network(rule: str, square_net: bool = False) -> bool:
    """Whether ``rule`` trains the square (invertible) version of an architecture: the target
    rules invert every layer above the first; any rule does with ``--square-net``."""
    return rule in TARGET_RULES or bool(square_net)


def arch_family(arch: str) -> str:
    if re.fullmatch(r"mlp-\d+x\d+", arch) or arch == "mlp-tower":
        return "neurips"
    if arch in ("mlp-shallow", "mlp-deep"):
        return "scaling-cifar"
    if arch == "conv7":
        return "scaling-imagenet"
    if arch in ("bartunov-mlp", "bartunov-lc"):
        return "bartunov"
    if arch == "simple-vgg" or re.fullmatch(r"vgg(-\d+)+", arch):
        return "ernoult"
    return "other"


def rule_presets(family: str, rule: str) -> dict:
    """The reference hyperparameters for (architecture family, rule)."""
    fa_like = rule in ("fa", "dfa")
    target = rule in TARGET_RULES
    if family == "neurips":
        p = dict(loss="mse", reduction="mean", batch_size=60, epochs=100, lr=1e-4, adam_beta2=0.999,
                 adam_eps=1e-8, ortho_form="offdiag", ortho_lambda=0.0)
        if rule in ("gait", "gait-vanilla", "itp"):
            p["ortho_lambda"] = 0.1
        if rule == "tp":
            p.update(lr=1e-5, ortho_lambda=1000.0)
        return p
    if family == "bartunov":
        # Bartunov et al. give search ranges only (model/inverse Adam lr 1e-5..3e-4,
        # beta2 0.99/0.999, eps 1e-4..1e-8, alpha 0.01..0.2, sigma 0.01..0.3): values inside them
        return dict(loss="cross_entropy", reduction="mean", batch_size=100, epochs=50, lr=1e-4,
                    adam_beta2=0.999, adam_eps=1e-8, ortho_form="full", ortho_lambda=0.0, init="glorot")
    if family == "ernoult":
        p = dict(loss="cross_entropy", reduction="mean", batch_size=128, epochs=90, lr=0.08, optimizer="sgd",
                 momentum=0.9, weight_decay=1e-4, lr_schedule="cosine", adam_beta2=0.999, adam_eps=1e-8,
                 ortho_form="full", ortho_lambda=0.0, init="glorot")
        if rule not in ("ldrl", "bp"):
            # Ernoult et al.'s SGD settings are tuned for L-DRL (and their BP baseline); with
            # them DTP, SDTP and FA diverge within 200 steps on MNIST. The others get Adam at
            # 3e-4, the top of Bartunov et al.'s search range.
            p.update(lr=3e-4, optimizer="adam", momentum=0.0, weight_decay=0.0, lr_schedule="constant")
        return p
    if family == "scaling-imagenet":
        p = dict(loss="cross_entropy", reduction="sum", batch_size=256, epochs=200, lr=4.9e-5,
                 adam_beta2=0.99, adam_eps=1e-8, ortho_form="full", ortho_lambda=1.0 if target else 0.0)
        if fa_like:
            p.update(lr=4.3e-5, adam_eps=1e-4)
        return p
    # scaling-cifar and anything else
    p = dict(loss="cross_entropy", reduction="sum", batch_size=256, epochs=200, lr=1.9e-5,
             adam_beta2=0.999, adam_eps=1e-6, ortho_form="full", ortho_lambda=100.0 if target else 0.0)
    if fa_like:
        p.update(lr=2.5e-5, adam_beta2=0.99, adam_eps=1e-4)
    return p


# Ernoult et al.'s SimpleVGG L-DRL settings, per feedback layer g_1 first: the conv
# blocks 2-5, then the dense output (their public code's CIFAR-10 defaults)
ERNOULT_CONV = dict(feedback_lr=[1e-4, 3.5e-4, 8e-3, 8e-3], dtp_sigma=[0.4, 0.4, 0.2, 0.2], ldrl_iters=[20, 30, 35, 55])
ERNOULT_TOP = dict(feedback_lr=0.18, dtp_sigma=0.08, ldrl_iters=20)


def dtp_presets(arch: str, rule: str) -> dict:
    """Learned-feedback settings (dtp, sdtp, ldrl); per-layer lists run g_1 first.

    L-DRL on simple-vgg takes Ernoult et al.'s per-layer values; on a custom vgg-<C1>-...
    with n blocks, the values of SimpleVGG's top n - 1 conv blocks (the first repeated
    when n > 5) and of its output layer.
    """
    p = dict(dtp_alpha=0.1, dtp_sigma=0.1, ldrl_beta=0.7, ldrl_iters=5, feedback_form="bartunov",
             feedback_lr=1e-2 if rule == "ldrl" else 1e-4,    # SGD (L-DRL) / Adam (DTP, SDTP)
             feedback_adam_beta2=0.999, feedback_adam_eps=1e-8,  # the inverses' Adam (DTP, SDTP)
             sdtp_step=1.0)
    if arch_family(arch) == "ernoult":
        p["feedback_form"] = "ernoult"
        if rule == "ldrl":
            n_conv = 4 if arch == "simple-vgg" else len(arch.split("-")) - 2   # blocks with a feedback
            for k, vals in ERNOULT_CONV.items():
                vals = [vals[0]] * max(0, n_conv - len(vals)) + vals
                p[k] = (vals[len(vals) - n_conv:] if n_conv else []) + [ERNOULT_TOP[k]]
    return p


@dataclass
class Config:
    task: str = "mnist"
    arch: str | None = None
    rule: str = "gait"
    target_form: str = "difference"
    inverse_solver: str = "auto"
    ortho_every: int = 1
    backend: str = "numpy"
    dtype: str = "float32"
    seed: int = 0
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    gamma: float | None = None
    gamma_norm: str = "l2"
    gamma_sqrt_dim: bool = True
    ortho_lambda: float | None = None
    ortho_form: str | None = None
    loss: str | None = None
    reduction: str | None = None
    adam_beta1: float = 0.9
    adam_beta2: float | None = None
    adam_eps: float | None = None
    adam_eps_placement: str = "tf"
    feedback_init: str = "orthogonal"
    init: str | None = None
    optimizer: str | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    lr_schedule: str | None = None
    schedule: str = "parallel"
    inverse_loss: str = "denoising"
    feedback_form: str | None = None
    dtp_alpha: float | None = None
    sdtp_step: float | None = None
    linear_top_inverse: bool = False
    dtp_sigma: float | list | None = None
    feedback_lr: float | list | None = None
    feedback_adam_beta2: float | None = None
    feedback_adam_eps: float | None = None
    ldrl_beta: float | None = None
    ldrl_iters: int | list | None = None
    linear: bool = False
    data: str | None = None
    image_size: int | None = None
    out: str | None = None
    resume: bool = False
    angles_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 50
    cond_every: int = 100
    cond_max: float = 1e6
    eval_subset: int = 0
    eval_batch_size: int = 1000
    train_subset: int = 0
    val_holdout: int = 0
    patience: int = 0
    square_net: bool = False
    quiet: bool = False
    loader_workers: int = 0
    in_memory: str | None = None
    overwrite: bool = False
    force_unlock: bool = False
    verify_data: str = "cached"
    allow_config_change: list | str | None = None
    distributed: str = "none"
    comm_timeout: float = 600.0

    def resolved(self) -> "Config":
        """A copy with every None filled in from the task and the papers' presets."""
        c = dataclasses.replace(self)
        if c.arch is None:
            c.arch = "bartunov-mlp" if c.rule in DTP_RULES else TASK_DEFAULT_ARCH.get(c.task, "mlp-shallow")
        for presets in (rule_presets(arch_family(c.arch), c.rule), dtp_presets(c.arch, c.rule),
                        dict(init="orthogonal", optimizer="adam", momentum=0.0, weight_decay=0.0,
                             lr_schedule="constant")):
            for k, v in presets.items():
                if getattr(c, k) is None:
                    setattr(c, k, v)
        if c.gamma is None:
            c.gamma = {"gait": 1e-7, "gait-vanilla": 1e-3, "itp": 1e-3}.get(c.rule)
        c.validate()
        return c

    def validate(self) -> None:
        """Every option's type and range, for the CLI and --config files alike; a ValueError
        naming the option (as typed on the command line) and the value."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            rule = OPTION_RULES.get(f.name)
            if rule is None or v is None:
                continue
            kind, check, want = rule
            values = v if isinstance(v, list) and f.name in PER_LAYER else [v]
            for x in values:
                ok_type = (isinstance(x, bool) if kind is bool else
                           isinstance(x, int) and not isinstance(x, bool) if kind is int else
                           isinstance(x, (int, float)) and not isinstance(x, bool) if kind is float else
                           isinstance(x, str))
                if not ok_type or (kind is float and not math.isfinite(x)) or not check(x):
                    raise ValueError(f"--{f.name.replace('_', '-')} must be {want}, got {x!r}")
                if kind is float and self.dtype == "float32" and f.name not in HOST_FLOATS and x != 0:
                    with np.errstate(over="ignore"):
                        x32 = float(np.float32(x))
                    if not 0 < abs(x32) < math.inf:
                        raise ValueError(f"--{f.name.replace('_', '-')} {x!r} is {x32!r} in float32, the precision "
                                         "this run computes in: choose a value float32 holds, or --dtype float64")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**d)


def _choice(*options):
    return (str, lambda v: v in options, "one of " + ", ".join(options))


def _positive(kind=float):
    return (kind, lambda v: v > 0, "> 0")


def _at_least(lo, kind=int):
    return (kind, lambda v: v >= lo, f">= {lo}")


def _unit(closed_low=True):
    return (float, lambda v: 0 <= v < 1, "in [0, 1)")


# (type, check, what the message says it must be) per option; None values (unset) pass.
MAX_LOADER_WORKERS = 256
# float options that only set host-side behaviour, never an array's value
HOST_FLOATS = {"comm_timeout"}
OPTION_RULES = {
    "task": (str, lambda v: True, "a task name"),
    "arch": (str, lambda v: bool(v), "an architecture name"),
    "out": (str, lambda v: bool(v), "a folder"),
    "data": (str, lambda v: bool(v), "a folder"),
    "backend": _choice("numpy", "cupy", "emulated"),
    "dtype": _choice("float32", "float64"),
    "target_form": _choice("absolute", "difference"),
    "inverse_solver": _choice("auto", "refine", "lu"),
    "ortho_every": _at_least(1),
    "seed": _at_least(0),
    "epochs": _at_least(1),
    "max_steps": _at_least(1),
    "batch_size": _at_least(1),
    "lr": _positive(),
    "gamma": _positive(),
    "gamma_norm": _choice("l2", "squared"),
    "gamma_sqrt_dim": (bool, lambda v: True, "true or false"),
    "ortho_lambda": _at_least(0.0, float),
    "ortho_form": _choice("full", "offdiag"),
    "loss": _choice("cross_entropy", "mse"),
    "reduction": _choice("sum", "mean"),
    "adam_beta1": _unit(),
    "adam_beta2": _unit(),
    "adam_eps": _positive(),
    "adam_eps_placement": _choice("tf", "hat"),
    "feedback_init": _choice("orthogonal", "normal", "glorot"),
    "init": _choice("orthogonal", "glorot", "normal"),
    "optimizer": _choice("adam", "sgd"),
    "momentum": _unit(),
    "weight_decay": _at_least(0.0, float),
    "lr_schedule": _choice("constant", "cosine"),
    "schedule": _choice("parallel", "alternating"),
    "inverse_loss": _choice("denoising", "noise-preserving"),
    "feedback_form": _choice("bartunov", "ernoult"),
    "dtp_alpha": _positive(),
    "sdtp_step": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "linear_top_inverse": (bool, lambda v: True, "true or false"),
    "dtp_sigma": _at_least(0.0, float),
    "feedback_lr": _positive(),
    "feedback_adam_beta2": _unit(),
    "feedback_adam_eps": _positive(),
    "ldrl_beta": _positive(),
    "ldrl_iters": _at_least(1),
    "linear": (bool, lambda v: True, "true or false"),
    "image_size": _at_least(1),
    "resume": (bool, lambda v: True, "true or false"),
    "angles_every": _at_least(0),
    "checkpoint_every": _at_least(0),
    "log_every": _at_least(1),
    "cond_every": _at_least(0),
    "cond_max": (float, lambda v: v > 1, "> 1"),
    "eval_subset": _at_least(0),
    "eval_batch_size": _at_least(1),
    "train_subset": _at_least(0),
    "val_holdout": _at_least(0),
    "patience": _at_least(0),
    "square_net": (bool, lambda v: True, "true or false"),
    "quiet": (bool, lambda v: True, "true or false"),
    "loader_workers": (int, lambda v: 0 <= v <= MAX_LOADER_WORKERS, f"in 0..{MAX_LOADER_WORKERS}"),
    "in_memory": _choice("host", "device"),
    "overwrite": (bool, lambda v: True, "true or false"),
    "force_unlock": (bool, lambda v: True, "true or false"),
    "verify_data": _choice("cached", "always"),
    "distributed": _choice("none", "mpi"),
    "comm_timeout": _positive(),
}
PER_LAYER = ("dtp_sigma", "feedback_lr", "ldrl_iters")

# Options that do not change what a run computes: a resumed run may change them freely.
# (epochs may grow too, unless the learning rate schedule depends on it: see config_changes.)
RESULT_NEUTRAL = {"quiet", "log_every", "eval_batch_size", "max_steps", "checkpoint_every", "angles_every",
                  "cond_every", "out", "resume", "overwrite", "force_unlock", "verify_data", "allow_config_change",
                  "data", "loader_workers", "in_memory",
                  "comm_timeout", "distributed"}


# Options added after checkpoints were written: a configuration without the key ran with
# this value, so resuming it with that value is no change.
ADDED_LATER = {"feedback_adam_beta2": 0.999, "feedback_adam_eps": 1e-8, "sdtp_step": 1.0, "linear_top_inverse": False}


def config_changes(old: dict, new: dict) -> tuple[dict, dict]:
    """(changes that alter the result, changes that do not): {option: [old, new]}."""
    result, neutral = {}, {}
    old = {**ADDED_LATER, **old} if old else old
    for k in sorted(set(old) | set(new)):
        if k == "extra" or old.get(k) == new.get(k):      # 'extra': an empty field of older configurations
            continue
        if k == "data_digest" and k not in old:         # checkpoints from before it was recorded
            continue
        change = [old.get(k), new.get(k)]
        grows = k == "epochs" and None not in change and change[1] > change[0] and new.get("lr_schedule") == "constant"
        (neutral if k in RESULT_NEUTRAL or grows else result)[k] = change
    return result, neutral


def allowed_changes(value) -> set:
    """--allow-config-change 'lr,batch-size' (or a list) -> {'lr', 'batch_size'}."""
    if not value:
        return set()
    items = value if isinstance(value, list) else str(value).split(",")
    return {str(v).strip().replace("-", "_") for v in items if str(v).strip()}
