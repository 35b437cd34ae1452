"""Builders shared by the tests (not fixtures: plain functions)."""
import numpy as np

from gait_ref.backend import to_device
from gait_ref.init import init_layer, orthogonal_matrix


def init_well_conditioned(layer, rng, xp, dtype=np.float64, skew=0.3):
    """Orthogonal plus a random perturbation: invertible, well conditioned, not orthogonal
    (so an inverse that silently became a transpose fails the tests)."""
    init_layer(layer, rng, "orthogonal", xp, dtype)
    shape = layer.weight_shape
    W = np.asarray(layer.params["W"].get() if hasattr(layer.params["W"], "get") else layer.params["W"])
    W = W + skew * rng.standard_normal(shape) / np.sqrt(shape[-2])
    layer.params["W"] = to_device(W.astype(dtype), xp)
    layer.params["b"] = to_device(rng.standard_normal(layer.params["b"].shape).astype(dtype), xp)


def rand(rng, shape, xp, dtype=np.float64):
    return to_device(rng.standard_normal(shape).astype(dtype), xp)
