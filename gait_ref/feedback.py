"""Learned feedback (approximate inverse) layers for the DTP family, with explicit gradients.

Legend: N batch, O units of the forward layer's output, R units it reads (its input).

A dense forward layer l maps x (N, R) to y = f(x W + b) (N, O). Its feedback layer maps
back with weights of its own (Bartunov et al. 2018, sec. 2.1.1):

    g(u) = s(u V + c),    V : (O, R),  c : (R,)

Nothing is borrowed from W. ``s`` is the activation of the layer below (the one whose
activity g reconstructs).
"""
from __future__ import annotations

import numpy as np

from .backend import get_xp, to_device
from .init import draw_weights


class DenseFeedback:
    def __init__(self, n_out: int, n_read: int, activation, name: str):
        self.n_out, self.n_read, self.s, self.name = int(n_out), int(n_read), activation, name
        self.params = {}

    def init(self, rng: np.random.Generator, xp, dtype, scheme: str = "glorot") -> None:
        self.params = {"V": to_device(draw_weights(rng, (self.n_out, self.n_read), scheme).astype(dtype), xp),
                       "c": to_device(np.zeros(self.n_read, dtype), xp)}

    def forward(self, u):
        """u : (N, O) -> (g(u) : (N, R), z = u V + c)."""
        z = u @ self.params["V"] + self.params["c"]
        return self.s.f(z), z

    def param_grads(self, u, z, g_r):
        """Gradients of a loss with dL/dg(u) = g_r: {'V': u^T (g_r s'(z)), 'c': sum_n g_r s'(z)}."""
        gz = g_r * self.s.deriv(z)
        return {"V": u.T @ gz, "c": gz.sum(axis=0)}

    def jacobian(self, z):
        """J_g per sample as the (O, R) matrix du -> du J: V * s'(z_n). Returns (N, O, R)."""
        return self.params["V"][None] * self.s.deriv(z)[:, None, :]


def forward_jacobian(layer, activation, h):
    """J_f of a dense layer per sample as the (R, O) matrix dx -> dx J: W * f'(h_n). (N, R, O)."""
    return layer.params["W"][None] * activation.deriv(h)[:, None, :]


def jacobian_matching_error(layer, activation, h, fb, z) -> float:
    """mean_n ||J_g - J_f^T||_F / ||J_f||_F: how far the feedback is from the forward
    layer's transposed Jacobian (what L-DRL trains towards)."""
    xp = get_xp(h)
    Jf = forward_jacobian(layer, activation, h)                     # (N, R, O)
    Jg = fb.jacobian(z)                                             # (N, O, R)
    diff = Jg - Jf.transpose(0, 2, 1)
    num = xp.sqrt((diff ** 2).sum(axis=(1, 2)))
    den = xp.sqrt((Jf ** 2).sum(axis=(1, 2)))
    return float((num / den).mean())
