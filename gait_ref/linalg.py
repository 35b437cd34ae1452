"""Right-division by a square weight matrix: B @ W^-1, for the exact inverses.

``SquareInverse(W)`` factorises W once (LU with partial pivoting) and applies it to the
whole batch at once; the target rules factorise each square layer once per step.
No explicit inverse is formed for 2-D matrices. Stacks of small matrices (locally
connected layers, one per output position) use the batched explicit inverse, which is
what the batched LAPACK routines offer.

Nothing here reads from the device: an exactly singular W gives non-finite solves,
which the training step's finiteness check catches, and the trainer then names the
singular layer from its condition number (``orthogonality_report``).
"""
from __future__ import annotations

from .backend import get_xp, scipy_linalg


class SquareInverse:
    """The map B -> B @ W^-1 for a square W of shape (D, D), or a stack (P, D, D)."""

    def __init__(self, W):
        xp = get_xp(W)
        if W.ndim < 2 or W.shape[-1] != W.shape[-2]:
            raise ValueError(f"exact inverse needs square weights, got shape {W.shape}")
        self.xp = xp
        self.shape = W.shape
        if W.ndim == 2:
            self._lu = scipy_linalg(xp).lu_factor(W, check_finite=False)
        else:
            self._inv = xp.linalg.inv(W)                           # (P, D, D)

    def right_solve(self, B):
        """X = B @ W^-1. B : (M, D) for a 2-D W, (P, M, D) for a stack."""
        if len(self.shape) == 2:
            # X W = B  <=>  W^T X^T = B^T  (trans=1 solves with W^T)
            xt = scipy_linalg(self.xp).lu_solve(self._lu, B.T, trans=1, check_finite=False)
            return xt.T
        return B @ self._inv
