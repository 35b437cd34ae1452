"""Comparisons of a rule's updates with BP's on the same batch and forward pass.

Everything is summed on the device in float64 and read once per comparison.
"""
from __future__ import annotations

import math

from .backend import get_xp, read_scalars


def _sums(a, b) -> list:
    """[a.a, b.b, a.b, |perp|^2, |a - b|^2] as 0-d float64 device arrays, where
    perp = a - (a.b / b.b) b is the component of a orthogonal to b."""
    xp = get_xp(a, b)
    a64, b64 = a.astype(xp.float64).reshape(-1), b.astype(xp.float64).reshape(-1)
    aa, bb, ab = a64 @ a64, b64 @ b64, a64 @ b64
    perp = a64 - (ab / xp.where(bb > 0, bb, 1.0)) * b64
    diff = a64 - b64
    return [aa, bb, ab, perp @ perp, diff @ diff]


def _angle(aa, bb, ab, pp) -> float:
    """atan2(|a x b|, a.b) in degrees, with |a x b| = |perp| |b|: unlike arccos(cos), accurate
    for angles near 0."""
    if aa == 0 or bb == 0:
        return float("nan")
    return math.degrees(math.atan2(math.sqrt(pp) * math.sqrt(bb), ab))


def angle_deg(a, b) -> float:
    """The angle between two arrays seen as flat vectors, in degrees (float64 sums)."""
    aa, bb, ab, pp, _ = read_scalars(_sums(a, b))
    return _angle(aa, bb, ab, pp)


def compare_updates(net, grads, grads_bp) -> dict:
    """Per layer: angle to BP (degrees), ratio of norms ||dW|| / ||dW_BP||, relative error
    ||dW - dW_BP|| / ||dW_BP||. One device-to-host read for the whole network."""
    sums = read_scalars([s for g, gb in zip(grads, grads_bp) for s in _sums(g["W"], gb["W"])])
    out = {}
    for i, layer in enumerate(net.layers):
        aa, bb, ab, pp, dd = sums[5 * i:5 * i + 5]
        nb = math.sqrt(bb)
        out[layer.name] = {"angle_deg": _angle(aa, bb, ab, pp),
                           "norm_ratio": math.sqrt(aa) / nb if nb else float("nan"),
                           "rel_error": math.sqrt(dd) / nb if nb else float("nan")}
    return out
