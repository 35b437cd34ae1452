"""Right-division by a square weight matrix, B @ W^-1, for the exact inverses.

Two solvers, both in the BLAS/LAPACK the rest of the step uses (numpy's own, or CuPy's):
mixing scipy.linalg's separate OpenBLAS with numpy's GEMMs made each library's spinning
threads steal the cores the other needed (a GEMM then an LU: 42 ms alternating against
24 ms for the two apart, float32, D = 1024, here).

* ``SquareInverse(W)`` (``--inverse-solver lu``): a fresh LU factorisation and solve
  (``xp.linalg.solve``, batched for stacks of matrices), every time.
* ``RefinedInverse`` (``--inverse-solver refine``): state kept per layer across steps: an
  explicit inverse X of the weights at some earlier step. A solve is X-preconditioned
  iterative refinement with GEMMs only,

      x_0 = B X,   r_k = B - x_k W,   x_{k+1} = x_k + r_k X        (k = 0 .. K - 1)

  and leaves on the device what its normwise backward errors

      eta_k = ||r_k||_F / (||W||_2 ||x_K||_F)

  are made of (||W||_2 by one warm-started power-iteration step per solve, see
  ``RefinedInverse.norm_squared``). The rule reads all of a step's at once: a layer whose
  eta_K missed ``residual_bound(dtype)`` gets one
  more correction (or, past ``MAX_CORRECTIONS``, a fresh inverse of its current weights)
  and the step's targets are computed again; after a step where every layer met it, each
  layer plans for next time the fewest corrections that met a quarter of the bound (a
  margin for the weights' drift). So every x that reaches an update solves x W = B - r
  exactly with ||r||_F <= 64 eps ||W||_2 ||x||_F, the bound a backward-stable solve (a
  fresh LU) meets, and the host reads the device once per step.

Why the backward error and not the relative residual ||r||_F / ||B||_F: a backward-stable
solve leaves a relative residual of about eps x cond(W), so a bound on it cannot be met in
float32 once a layer's condition number passes a few tens (the linear network without the
regulariser stopped on it, at cond 27.5), although the solve is as exact as the dtype
allows. eta is what a backward-stable solve bounds (about eps, whatever the conditioning);
for orthogonal W (||W||_2 = 1, ||x|| = ||B||) the two are the same number. The power
iteration's estimate never exceeds ||W||_2, so an inexact estimate only makes the test
stricter.

Measured here (deep MLP, D = 1024, batch 256, GAIT-prop training step with the
regulariser): float32 308 ms refine, 489 ms lu, 600 ms scipy's LU; float64 580 ms lu,
1152 ms refine (the weights move about 3e-3 relative per step, so a one-step-old inverse
needs five or more corrections to reach float64 round-off, each two GEMMs, more than an
LU). ``solver_for(dtype)`` therefore picks refine for float32 and lu for float64
(``--inverse-solver auto``).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_xp

SOLVERS = ("auto", "refine", "lu")
MAX_CORRECTIONS = 3
POWER_WARMUP = 10              # power-iteration steps from the fixed start vector


def backward_errors(sq: list, world: int = 1) -> list:
    """A solve's ``_RefinedSolve.sq`` as read on the host (each entry summed over ``world``
    processes, which share the weights and split the rows): eta_k for k = 0..K."""
    s2, x2, *r2 = (float(v) for v in sq)
    denom = np.sqrt(s2 / world * x2)                          # ||W||_2 ||x_K||_F
    # B = 0 solved by x = 0 is exact; anything non-finite stays NaN or inf, and fails the
    # bound (the caller's error names the layer, so numpy's warning would only be noise)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [0.0 if denom == 0 and r == 0 else float(np.sqrt(r) / denom) for r in r2]


def residual_bound(dtype) -> float:
    """The normwise backward error ||B - x W||_F / (||W||_2 ||x||_F) every refined solve must
    reach: 64 eps (float32 7.6e-6, float64 1.4e-14), a small multiple of what a backward-stable
    solve gives."""
    return 64 * float(np.finfo(dtype).eps)


def solver_for(kind: str, dtype) -> str:
    if kind not in SOLVERS:
        raise ValueError(f"--inverse-solver must be one of {', '.join(SOLVERS)}, got {kind!r}")
    if kind == "auto":
        return "refine" if np.dtype(dtype) == np.float32 else "lu"
    return kind


def _t(a):
    """Swap the last two axes: (D, M) <-> (M, D), (P, D, M) <-> (P, M, D)."""
    return a.swapaxes(-1, -2)


class SquareInverse:
    """The map B -> B @ W^-1 for a square W (D, D), or a stack (P, D, D): a fresh LU solve."""

    def __init__(self, W):
        if W.ndim < 2 or W.shape[-1] != W.shape[-2]:
            raise ValueError(f"exact inverse needs square weights, got shape {W.shape}")
        self.W, self.xp, self.shape = W, get_xp(W), W.shape

    def right_solve(self, B):
        """X = B @ W^-1. B : (M, D) for a 2-D W, (P, M, D) for a stack.  X W = B <=> W^T X^T = B^T."""
        return _t(self.xp.linalg.solve(_t(self.W), _t(B)))


class RefinedInverse:
    """One square layer's refinement state: an approximate inverse X and how many
    corrections its solves apply (see the module docstring)."""

    def __init__(self):
        self.X, self.K, self.refreshes = None, 1, 0
        self._planned, self.rho = None, None
        self.v = None                  # the power iteration's unit vector(s), (D,) or (P, D)

    def norm_squared(self, W):
        """||W||_2^2 estimated on the device (0-d, no read): one step of power iteration on
        W W^T, warm-started from the last step's vector (the weights move little), so
        u = v W, estimate ||u||^2 (a Rayleigh quotient, never above ||W||_2^2), then
        v <- normalised u W^T. A stack (P, D, D) gives the largest over its P matrices."""
        xp = get_xp(W)
        steps = 1
        if self.v is None or self.v.shape != W.shape[:-1]:
            # a fixed start made on the device (no copy): generic, so never orthogonal to
            # the leading singular vector but by accident
            v = xp.sin(xp.arange(1, math.prod(W.shape[:-1]) + 1, dtype=W.dtype) * W.dtype.type(0.618034))
            v = v.reshape(W.shape[:-1])
            self.v = v / xp.sqrt((v * v).sum(axis=-1, keepdims=True))
            steps = POWER_WARMUP
        for _ in range(steps):
            u = (self.v[..., None, :] @ W)[..., 0, :]               # v W, (.., D)
            est = (u * u).sum(axis=-1)
            w = (u[..., None, :] @ _t(W))[..., 0, :]                 # v W W^T
            self.v = w / xp.sqrt((w * w).sum(axis=-1, keepdims=True))
        return est.max()

    def refresh(self, W, newton: bool = False) -> None:
        """A better X for the current weights, K = 1: with ``newton``, one Newton-Schulz step
        X (2 I - W X) (two GEMMs; it squares ||I - W X||) if the corrections still contract
        fast (measured rate rho < 1/2); else a fresh inverse."""
        xp = get_xp(W)
        if newton and self.X is not None and self.rho is not None and self.rho < 0.5 and self.X.shape == W.shape:
            T = -(W @ self.X)                                        # -W X
            T[..., xp.arange(T.shape[-1]), xp.arange(T.shape[-1])] += 2   # 2 I - W X
            self.X = self.X @ T
        else:
            self.X = xp.linalg.inv(W)
        self.K, self.rho = 1, None
        self.refreshes += 1

    def operator(self, W) -> "_RefinedSolve":
        if self.X is None or self.X.shape != W.shape:
            self.refresh(W)
        return _RefinedSolve(self, W)

    def check(self, etas: list, bound: float, W) -> bool:
        """``etas``: the backward errors after 0..K corrections of this step's solve. True
        if the last met the bound (and the fewest corrections that met bound / 4 are planned
        for the next step); else the solver is strengthened: one more correction, or a fresh
        inverse."""
        if len(etas) > 1 and etas[0] > 0:                             # how fast corrections contract
            self.rho = max(b / a for a, b in zip(etas, etas[1:]) if a > 0)
        if etas[-1] <= bound:
            # the fewest corrections that reached bound / 4; none did: one more than now (the
            # kept inverse only grows staler, so a residual near the bound misses it next step)
            self._planned = next((k for k, e in enumerate(etas) if e <= bound / 4), len(etas))
            return True
        self._planned = None
        if self.K >= MAX_CORRECTIONS:
            self.refresh(W)
        else:
            self.K += 1
        return False

    def settle(self, W) -> None:
        """The step succeeded on every layer: use the planned number of corrections (past
        ``MAX_CORRECTIONS``, a fresh inverse of the weights instead)."""
        if self._planned is not None:
            self.K, self._planned = self._planned, None
            if self.K > MAX_CORRECTIONS:                  # planned, not forced: Newton-Schulz will do
                self.refresh(W, newton=True)

    def state_dict(self, prefix: str) -> dict:
        from .backend import to_numpy
        if self.X is None:
            return {}
        state = {f"{prefix}X": to_numpy(self.X), f"{prefix}K": np.array(self.K)}
        if self.v is not None:
            state[f"{prefix}v"] = to_numpy(self.v)
        return state

    def load_state_dict(self, state: dict, prefix: str, xp) -> None:
        from .backend import to_device
        if f"{prefix}X" in state:
            self.X, self.K = to_device(state[f"{prefix}X"], xp), int(state[f"{prefix}K"])
        if f"{prefix}v" in state:                    # absent in checkpoints from before the bound used it
            self.v = to_device(state[f"{prefix}v"], xp)


class _RefinedSolve:
    """B -> B @ W^-1 by refinement from the layer's X; keeps what its backward errors are
    made of (``backward_errors``)."""

    def __init__(self, state: RefinedInverse, W):
        self.state, self.W, self.sq = state, W, []

    def right_solve(self, B):
        """B @ W^-1, refined. ``self.sq`` becomes [||W||_2^2 (estimated), ||B||^2, ||x_K||^2,
        ||r_0||^2, .., ||r_K||^2], 0-d arrays on the device."""
        X, W = self.state.X, self.W
        x = B @ X                                                    # (.., M, D)
        r = B - x @ W
        r2 = [(r * r).sum()]
        for _ in range(self.state.K):
            x = x + r @ X
            r = B - x @ W
            r2.append((r * r).sum())
        self.sq = [self.state.norm_squared(W), (x * x).sum()] + r2
        return x
