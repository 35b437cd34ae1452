"""Weight initialisation. Every draw comes from a seeded numpy Generator on the CPU
and is then moved to the backend, so numpy and cupy runs start bit-identical."""
from __future__ import annotations

import numpy as np

from .backend import to_device

SCHEMES = ("orthogonal", "glorot", "normal")


def orthogonal_matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols) or rows (rows < cols),
    Haar-distributed: QR of a Gaussian matrix with the signs of diag(R) folded into Q."""
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)                                      # q : (max, min)
    q *= np.sign(np.diag(r))
    return q if rows >= cols else q.T


def draw_weights(rng: np.random.Generator, shape, scheme: str, scale: float = 1.0) -> np.ndarray:
    """Weights of ``shape`` (.., fan_in, fan_out) in float64 on the CPU.

    orthogonal: each trailing (fan_in, fan_out) matrix orthogonal (a square conv's D x D
                kernel matrix included), times ``scale``;
    glorot:     U(-l, l), l = scale * sqrt(6 / (fan_in + fan_out));
    normal:     N(0, scale^2 / fan_in).
    """
    *lead, fan_in, fan_out = shape
    if scheme == "orthogonal":
        mats = [orthogonal_matrix(rng, fan_in, fan_out) for _ in range(int(np.prod(lead, dtype=int)))]
        return scale * np.stack(mats).reshape(shape)
    if scheme == "glorot":
        lim = scale * np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-lim, lim, size=shape)
    if scheme == "normal":
        return rng.standard_normal(shape) * (scale / np.sqrt(fan_in))
    raise ValueError(f"unknown init scheme {scheme!r}; choose one of {SCHEMES}")


def init_layer(layer, rng: np.random.Generator, scheme: str, xp, dtype, scale: float = 1.0) -> None:
    """Set layer.params = {'W': drawn, 'b': zeros}, on backend ``xp`` in ``dtype``."""
    W = draw_weights(rng, layer.weight_shape, scheme, scale)
    b_shape = layer.weight_shape[:-2] + layer.weight_shape[-1:]
    layer.params = {"W": to_device(W.astype(dtype), xp),
                    "b": to_device(np.zeros(b_shape, dtype=dtype), xp)}
