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
import re
from dataclasses import dataclass, field

TASK_DEFAULT_ARCH = {"mnist": "mlp-784x4", "fashion-mnist": "mlp-784x4", "kmnist": "mlp-784x4",
                     "cifar10": "mlp-shallow", "imagenet": "conv7", "imagenet32": "conv7",
                     "synthetic": "mlp-64x2"}

TARGET_RULES = ("tp", "itp", "gait-vanilla", "gait")
DTP_RULES = ("dtp", "sdtp", "ldrl")


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
             feedback_lr=1e-2 if rule == "ldrl" else 1e-4)    # SGD (L-DRL) / Adam (DTP, SDTP)
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
    dtp_sigma: float | list | None = None
    feedback_lr: float | list | None = None
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
    train_subset: int = 0
    quiet: bool = False
    extra: dict = field(default_factory=dict)

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
        if c.schedule not in ("parallel", "alternating"):
            raise ValueError(f"--schedule must be parallel or alternating, got {c.schedule!r}")
        if c.optimizer not in ("adam", "sgd"):
            raise ValueError(f"--optimizer must be adam or sgd, got {c.optimizer!r}")
        if c.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"--lr-schedule must be constant or cosine, got {c.lr_schedule!r}")
        if c.gamma is None:
            c.gamma = {"gait": 1e-7, "gait-vanilla": 1e-3, "itp": 1e-3}.get(c.rule)
        return c

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**d)
