"""Learning rules. Each computes, for one batch and one forward pass, every layer's
weight and bias update on BP's scale (a gradient to descend), from explicit maths:

    rule = make_rule(name, net, **options)
    grads, info = rule.compute(trace, dL_dyL, labels=None, batch=None)

``labels`` (SDTP's and L-DRL's targets) and ``batch`` (a ``BatchSlice``: this process's rows
of a global batch) are optional for every rule; rules that need neither ignore them.

Rules: bp, fa, dfa, tp, itp, gait-vanilla, gait (normalized GAIT-prop); and with learned
feedback: dtp, sdtp, ldrl (dense, conv, conv-pool and locally connected layers).
"""
from __future__ import annotations

from .bp import BP
from .dtp import DifferenceTargetProp
from .feedback_alignment import DFA, FA
from .targets import TargetRule

RULES = ("bp", "fa", "dfa", "tp", "itp", "gait-vanilla", "gait", "dtp", "sdtp", "ldrl")
DTP_RULES = ("dtp", "sdtp", "ldrl")


def make_rule(name: str, net, *, seed: int = 0, gamma: float | None = None,
              form: str = "difference", norm: str = "l2", sqrt_dim: bool = True,
              feedback_init: str = "orthogonal", n_classes: int = 10, dtp_options: dict | None = None,
              inverse_solver: str = "auto"):
    """Build rule ``name`` for ``net``. gamma defaults: 1e-3 (itp, gait-vanilla), 1e-7 (gait)."""
    if name == "bp":
        return BP(net)
    if name == "fa":
        return FA(net, seed=seed, init=feedback_init)
    if name == "dfa":
        return DFA(net, seed=seed, init="normal" if feedback_init == "orthogonal" else feedback_init)
    if name == "tp":
        return TargetRule(net, "tp", form=form, solver=inverse_solver)
    if name == "itp":
        return TargetRule(net, "itp", gamma=1e-3 if gamma is None else gamma, form=form, solver=inverse_solver)
    if name == "gait-vanilla":
        return TargetRule(net, "gait", gamma=1e-3 if gamma is None else gamma, form=form, solver=inverse_solver)
    if name == "gait":
        return TargetRule(net, "gait", gamma=1e-7 if gamma is None else gamma, gamma_mode="normalized", form=form,
                          norm=norm, sqrt_dim=sqrt_dim, solver=inverse_solver)
    if name in DTP_RULES:
        return DifferenceTargetProp(net, name, n_classes=n_classes, seed=seed, **(dtp_options or {}))
    raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")


__all__ = ["BP", "FA", "DFA", "TargetRule", "DifferenceTargetProp", "make_rule", "RULES", "DTP_RULES"]
