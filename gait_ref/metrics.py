"""Comparisons of a rule's updates with BP's on the same batch and forward pass."""
from __future__ import annotations

import math

from .backend import get_xp


def _flat_dot(a, b) -> float:
    return float((a.reshape(-1) * b.reshape(-1)).sum())


def angle_deg(a, b) -> float:
    """The angle between two arrays seen as flat vectors, in degrees (float64 sums).

    Computed as atan2(|a x b|, a.b) via |a|^2|b|^2 - (a.b)^2, which, unlike
    arccos(cos), stays accurate for angles near 0.
    """
    xp = get_xp(a, b)
    a64, b64 = a.astype(xp.float64), b.astype(xp.float64)
    aa, bb, ab = _flat_dot(a64, a64), _flat_dot(b64, b64), _flat_dot(a64, b64)
    if aa == 0 or bb == 0:
        return float("nan")
    # |a - (a.b / b.b) b|: the component of a orthogonal to b, computed directly
    perp = a64 - (ab / bb) * b64
    return math.degrees(math.atan2(math.sqrt(_flat_dot(perp, perp)) * math.sqrt(bb), ab))


def compare_updates(net, grads, grads_bp) -> dict:
    """Per layer: angle to BP (degrees), ratio of norms ||dW|| / ||dW_BP||, relative error."""
    out = {}
    for layer, g, gb in zip(net.layers, grads, grads_bp):
        a, b = g["W"], gb["W"]
        xp = get_xp(a, b)
        nb = float(xp.linalg.norm(b.astype(xp.float64).ravel()))
        na = float(xp.linalg.norm(a.astype(xp.float64).ravel()))
        rel = float(xp.linalg.norm((a.astype(xp.float64) - b).ravel())) / nb if nb else float("nan")
        out[layer.name] = {"angle_deg": angle_deg(a, b), "norm_ratio": na / nb if nb else float("nan"),
                           "rel_error": rel}
    return out
