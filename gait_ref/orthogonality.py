"""Orthogonality regularisers with explicit gradients, and the orthogonality report.

Weights here are (fan_in, fan_out) matrices used as h = x W, the transpose of the
papers' column convention W_p = W^T. For a conv the (D, O) kernel matrix is used
as it is stored (the scaling paper's kernel reshaped to D x D).

* 'offdiag' (NeurIPS eq. 23): lambda || W_p W_p^T * (J - I) ||^2, off-diagonal only.
  With G = W^T W (= W_p W_p^T) and O = G * (J - I): value sum O^2, gradient 4 W O.
* 'full' (scaling paper): lambda || W W^T - I ||^2. For square W, ||W W^T - I|| =
  ||W^T W - I|| (same singular values), gradient 4 (W W^T - I) W: two GEMMs.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_xp, read_scalars
from .kernels import Kernel
from .linalg import diagonal

FORMS = ("full", "offdiag")


def _residual(W, form: str):
    """The penalty's matrix R and the product P whose gradient is 4 P: value sum R^2.
    'full': R = W W^T - I, gradient 4 R W; 'offdiag': R = W^T W * (J - I), gradient 4 W R."""
    if form == "full":
        # numpy sends W @ W.T to BLAS's syrk (half the flops); whether that beats a GEMM with
        # a copy of W^T depends on the BLAS kernels (docs/BENCHMARKS.md, bench/step_parts.py)
        E = W @ W.T                                                 # (D, D)
        diag = diagonal(E)
        diag -= 1                                                   # W W^T - I
        return E, lambda: E @ W
    if form == "offdiag":
        O = W.T @ W                                                 # W_p W_p^T
        diagonal(O)[...] = 0                                        # * (J - I)
        return O, lambda: W @ O
    raise ValueError(f"unknown orthogonality form {form!r}; choose one of {FORMS}")


def ortho_penalty(W, form: str = "full"):
    """(value, gradient) of the unscaled penalty for one square (D, D) matrix; the value
    is a 0-d array on W's device."""
    R, product = _residual(W, form)
    return (R * R).sum(), 4 * product()


def _add_scaled(xp):
    def add_scaled(g, P, c):
        g += P * c
    return add_scaled


_ADD_SCALED = Kernel(_add_scaled, inplace=(0,))           # g += c P, one fused kernel on a GPU


def add_ortho_grads(net, grads, lam: float, form: str = "full") -> None:
    """grads[l]['W'] += lam * d penalty / dW for every square 2-D layer, in place. The
    penalty's value is not formed (the training step does not log it; ``ortho_penalty``
    gives it), which saves a pass over each D x D residual and the temporaries."""
    if not lam:
        return
    for layer, g in zip(net.layers, grads):
        W = layer.params["W"]
        if layer.square and W.ndim == 2:
            _, product = _residual(W, form)
            _ADD_SCALED(g["W"], product(), W.dtype.type(4 * lam))


def orthogonality_report(net) -> dict:
    """Per square layer: ||W W^T - I||_F / sqrt(D) and the condition number, from a float64
    SVD on the weights' device; the two numbers of every layer are read in one read (the
    weights never travel to the host: the 3072 x 3072 output layer at 224 px took 35 s on
    one CPU core). Weights that are not finite (no SVD exists) report ``finite: False``."""
    names, values = [], []
    for layer in net.layers:
        if not layer.square:
            continue
        W = layer.params["W"]
        xp = get_xp(W)
        Wd = W.astype(xp.float64).reshape((-1,) + W.shape[-2:])
        finite = xp.isfinite(Wd).all()
        s = xp.linalg.svd(xp.where(finite, Wd, 0.0), compute_uv=False)        # (P, D)
        err = xp.sqrt(((s ** 2 - 1) ** 2).sum(axis=-1) / W.shape[-1]).max()
        cond = (s.max(axis=-1) / xp.maximum(s.min(axis=-1), np.finfo(np.float64).tiny)).max()
        values += [xp.where(finite, err, np.nan), xp.where(finite, cond, np.inf)]
        names.append(layer.name)
    read = read_scalars(values)
    out = {}
    for name, err, cond in zip(names, read[0::2], read[1::2]):
        out[name] = {"ortho_error": err, "cond": cond, **({"finite": False} if math.isnan(err) else {})}
    return out
