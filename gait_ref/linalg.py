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
  eta_K missed ``residual_bound(dtype)`` gets one more correction (or, past
  ``max_corrections(dtype)``, a fresh inverse of its current weights) and the step's
  targets are computed again; after a step where every layer met it, each layer plans for
  next time the fewest corrections that met a quarter of the bound (a margin for the
  weights' drift). So every x that reaches an update solves x W = B - r exactly with
  ||r||_F <= 64 eps ||W||_2 ||x||_F, the bound a backward-stable solve (a fresh LU) meets,
  and the host reads the device once per step.

  How X is kept (``RefinedInverse.operator``, ``settle``): where a step's solves have at
  least D rows per matrix, X is a fresh inverse of this step's W, made at every step: it
  costs 2 D^3 flops (at LAPACK's slower rate), less than the one correction (4 rows D^2) that
  a Newton-Schulz renewal X (2 I - W X) would still need, because the float32 Newton product
  leaves a backward error of 2.8e-6 to 1.1e-5, above the plan's bound / 4, where a fresh
  inverse leaves about 3e-7 and needs none (conv7, ``python bench/renewal.py``). Where such a
  layer's right-hand sides have only c < D live columns (a square layer's auxiliary channels,
  ``gait_ref.live``), X is only the c rows of W^-1 they meet, and in float32 the solve's
  backward error is bounded from the c x D error of those rows and a float64 product instead
  of the rows x D x D residual (``_RefinedSolve._solve_by_rows``). Elsewhere X is kept, and
  renewed (Newton-Schulz where it is close, else a fresh inverse) when the planned
  corrections pass the layer's ``correction_cap``: ``max_corrections(dtype)``, or more where a
  renewal costs many corrections (D / (4 rows): a wide layer with few rows, such as conv7's
  3072-wide output layer at 224 px, batch 32, which with two corrections missed the bound at
  every other step and was renewed at every step). After a renewal the plan is that maximum
  (one more where the cap allows), not one, because the next step's W is a step's drift away
  again (planning one made a miss, and a recomputation of the whole step's targets, at every
  renewal once the weights moved steadily); such layers plan one correction of margin, and a
  miss on a kept inverse jumps to the corrections its contraction predicts
  (``corrections_to_reach``), so the step is recomputed once, not once per correction.

  Such a float32 layer (``RefinedInverse.krylov``: not renewing, cap above
  ``max_corrections``) combines its corrections by minimal residual instead of adding them
  (``_RefinedSolve._solve_by_krylov``: GMRES over the same Krylov space, from the same
  GEMMs, plus the residual of the x returned). An inverse kept for several steps has a few
  slow directions (I - X W's largest eigenvalues, from the weights' drift), which limit
  the plain iteration and which the combination removes first: on conv7's 3072-wide layer
  at 224 px, batch 32, an inverse 15 steps old needed 39 corrections added and 6 combined.
  It is renewed by cost rather than by a cap (``_renewal_pays``: when the next step's
  corrections exceed the cycle's mean cost per step, a renewal counted as D / rows
  corrections, at most ``MAX_KRYLOV``), and each age of an inverse plans at least what the
  same age needed in the cycle before (the drift grows fastest just after a renewal). On
  that layer: one renewal in about 40 steps, against one in 5-6 with the cap alone.

Why the backward error and not the relative residual ||r||_F / ||B||_F: a backward-stable
solve leaves a relative residual of about eps x cond(W), so a bound on it cannot be met in
float32 once a layer's condition number passes a few tens (the linear network without the
regulariser stopped on it, at cond 27.5), although the solve is as exact as the dtype
allows. eta is what a backward-stable solve bounds (about eps, whatever the conditioning);
for orthogonal W (||W||_2 = 1, ||x|| = ||B||) the two are the same number. The power
iteration's estimate never exceeds ||W||_2, so an inexact estimate only makes the test
stricter.

In float32 a refined solve is cheaper than a fresh LU (the deep MLP's GP step: 283 ms
against 318-337 ms); in float64 it is not (961 against 428 ms: the weights move about
3e-3 relative per step, so a one-step-old inverse needs five or more corrections, each
two GEMMs, to reach float64 round-off). ``solver_for(dtype)`` therefore picks refine for
float32 and lu for float64 (``--inverse-solver auto``). ``python bench/perf.py --only
solver`` prints the figures; docs/BENCHMARKS.md keeps their history.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_xp
from .kernels import Kernel, RawKernel
from .live import widen

SOLVERS = ("auto", "refine", "lu")
# corrections per solve at most, past which X is renewed (see settle): in float32, 2 (each
# correction is two GEMMs of the batch's rows on every step, a Newton-Schulz renewal two
# D x D x D GEMMs once in a while); in float64, whose bound needs about (drift)^(K + 1)
# <= 1e-14, 5
MAX_CORRECTIONS = {4: 2, 8: 5}
MAX_KRYLOV = 16               # corrections a kept inverse may plan where they are combined (RefinedInverse.krylov)
MAX_PLANNED = 8                # corrections a kept inverse may plan at most (correction_cap)
NEWTON_FROM = 1e-2             # a kept X whose uncorrected solve was this close renews by Newton-Schulz
# _RefinedSolve._solve_by_krylov: the shift of its unit-diagonal Gram matrices, far above
# their float64 rounding (about 1e-15) and far below the squared relative residual a float32
# solve needs (bound / 4 from an eta_0 of at most 0.1: 4e-10)
KRYLOV_SHIFT = 1e-12
POWER_WARMUP = 10              # power-iteration steps from the fixed start vector
# rows x D entries per block of _RefinedSolve._solve_by_rows's float64 product (32 MiB): at
# ImageNet's 224 px, batch 256, conv2's whole product would be 347 MB of float64 (200,704 x 216).
# A memory budget, not maths: on a device (tens of GB) 512 MiB, where each block is five kernel
# launches (48 blocks there were 240 launches a step, half of a GP step's, bench/launches.py)
ROWS_BLOCK = 1 << 22
DEVICE_ROWS_BLOCK = 1 << 26


def backward_errors(sq: list, world: int = 1) -> list:
    """A solve's ``_RefinedSolve.sq`` as read on the host (each entry summed over ``world``
    processes, which share the weights and split the rows): eta_k for k = 0..K."""
    s2, _, x2, *r2 = (float(v) for v in sq)
    denom = np.sqrt(s2 / world * x2)                          # ||W||_2 ||x_K||_F
    # B = 0 solved by x = 0 is exact; anything non-finite stays NaN or inf, and fails the
    # bound (the caller's error names the layer, so numpy's warning would only be noise)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [0.0 if denom == 0 and r == 0 else float(np.sqrt(r) / denom) for r in r2]


class SingularWeights(ArithmeticError):
    """A solve proved its weights numerically singular in their dtype (``RefinedInverse.check``)."""


class InverseFailure(ArithmeticError):
    """A square layer's exact inverse cannot be computed in its dtype; the message names the
    layer. Raised by the target rules, and caught by the trainer, which stops the run with the
    last good checkpoint kept."""


def solve_amplifies_past(sq, cond_max: float):
    """On the device (no read): True where a solve's ``sq`` = [w2, b2, x2] (a lower bound on
    ||W||_2^2, ||B||^2, ||x||^2, the last two summed over processes) shows
    ||W||_2 ||x|| / ||B|| > ``cond_max``, a lower bound on cond_2(W) (see
    ``condition_lower_bound``) past it: the weights are (nearly) singular. A non-finite x
    fails too (NaN compares false); B = 0 solved by x = 0 passes."""
    w2, b2, x2 = sq[:3]
    c = w2.dtype.type(cond_max) if isinstance(cond_max, (int, float)) else cond_max    # typed (or in a fused kernel)
    return ~(w2 * x2 <= b2 * (c * c))


def norm_lower_bound_squared(W):
    """A lower bound on ||W||_2^2 with no state: the largest squared norm of a row or a column
    (of any matrix of a stack (P, D, D)), on the device. Exact for orthogonal W."""
    W2 = W * W
    return get_xp(W).maximum(W2.sum(axis=-1).max(), W2.sum(axis=-2).max())


def squared_norm(a):
    """||a||_F^2 as a device scalar: one BLAS dot product of a with itself, with no temporary.
    On numpy it runs on every BLAS thread: 0.28 ms against 0.90 ms for ``(a * a).sum()`` on a
    16384 x 216 float32 matrix (conv7's conv2 solve at batch 64, 2 cores, ``python
    bench/step_parts.py``). BLAS sums in the array's dtype, with several partial sums:
    1.8e-5 relative there in float32 (the pairwise ``sum`` 4.8e-8), ample for a backward error tested against 64 eps with a margin of 4."""
    flat = a.ravel(order="K")                # a view of an array contiguous in any order
    return flat @ flat


def condition_lower_bound(sq: list, world: int = 1) -> float:
    """||W||_2 ||x||_F / ||B||_F from a solve's ``sq``: at most cond_2(W) (since ||x|| <=
    ||W^-1||_2 ||B||, and the norm estimate never exceeds ||W||_2), so a value past 1 / eps
    proves W numerically singular in that dtype. A small backward error does not: on an
    exactly singular W, rounding leaves the LU a tiny pivot instead of a zero one on some
    BLAS kernels, and the huge x it gives solves a neighbouring matrix backward-stably."""
    s2, b2, x2 = (float(v) for v in sq[:3])
    with np.errstate(invalid="ignore", divide="ignore"):
        return 0.0 if b2 == 0 else float(np.sqrt(s2 / world * x2 / b2))


def max_corrections(dtype) -> int:
    return MAX_CORRECTIONS[np.dtype(dtype).itemsize]


def correction_cap(dtype, rows: int, D: int) -> int:
    """The most corrections a kept inverse may plan before it is renewed. A correction is two
    GEMMs of rows x D x D (4 rows D^2 flops), a Newton-Schulz renewal two of D x D x D (4 D^3):
    D / rows corrections cost one renewal. But corrections are paid at every step and grow
    with the inverse's age (about one more a step on conv7's 3072-wide layer at 224 px: 3, 4,
    6, 7, 8 at ages 1-5), so keeping an inverse pays only where a renewal costs several times
    a step's corrections: the cap is D / (4 rows), at least ``max_corrections(dtype)`` (then
    the layer renews as it always did; the deep MLP at batch 256 measured more corrections than
    renewals saved with D / rows) and at most ``MAX_PLANNED`` (an inverse that needs more has
    drifted so far that its contraction per correction is no longer small). conv7's output
    layer at 224 px, batch 32: 24, so 8. A float32 layer whose cap passes ``max_corrections``
    combines its corrections instead (``RefinedInverse.krylov``) and is renewed by cost
    (``RefinedInverse._renewal_pays``), up to ``MAX_KRYLOV``."""
    if rows <= 0:                                       # rows unknown: the dtype's maximum
        return max_corrections(dtype)
    return int(min(MAX_PLANNED, max(max_corrections(dtype), D // (4 * int(rows)))))


def corrections_to_reach(etas: list, target: float, rho) -> int | None:
    """The corrections a solve like this one would need for its backward error to reach
    ``target``, from its errors ``etas`` (after 0..K corrections) and their contraction per
    correction ``rho``; None where the errors do not contract (rho unknown or >= 1)."""
    if rho is None or not 0 < rho < 1 or not np.isfinite(etas[-1]):
        return None
    K = len(etas) - 1
    if etas[-1] <= target:
        return K
    return K + int(math.ceil(math.log(target / etas[-1]) / math.log(rho)))


def _fewest_next_step(etas: list, target: float, age: int) -> int:
    """The fewest corrections k whose error eta_k, grown by one more step of drift, stays
    within ``target``: the drift of the weights from the ones X was made for grows about
    linearly with X's age, and the error after k corrections like the drift to the power
    k + 1, so the next step's eta_k is about eta_k ((age + 1) / age)^(k + 1). (conv7's 3072
    layer at 224 px, one step after a fresh inverse: 8.7e-7 after one correction, 1.3e-5 after
    two at the next step; the first cycle has no earlier one to plan from.) ``age`` 0: the
    fewest that met ``target`` as measured. None reach it: one more than there are."""
    g = (age + 1) / age if age >= 1 else 1.0           # age 0: the errors as measured
    return next((k for k, e in enumerate(etas) if e * g ** (k + 1) <= target), len(etas))


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


def diagonal(M):
    """The leading diagonal of the last two axes of a C-contiguous (.., r, n) array, as a
    strided view (M[..., i, i] for i < min(r, n)): writing through it is one kernel on a GPU,
    where indexing with two arange arrays is five."""
    if not M.flags.c_contiguous:
        raise ValueError("diagonal() needs a C-contiguous array")
    r, n = M.shape[-2:]
    return M.reshape(M.shape[:-2] + (-1,))[..., :min(r, n) * (n + 1):n + 1]


def _t(a):
    """Swap the last two axes: (D, M) <-> (M, D), (P, D, M) <-> (P, M, D)."""
    return a.swapaxes(-1, -2)


def _residual(B, x, W, out=None):
    """r = B - x W, in the product's array (``out`` if given); B may hold only the first c
    columns (the rest zero)."""
    xp = get_xp(x)
    r = xp.matmul(x, W, out=out)
    c = B.shape[-1]
    if c == r.shape[-1]:
        return xp.subtract(B, r, out=r)
    if B.flags.c_contiguous and r.flags.c_contiguous:
        return _NARROW_MINUS(B, c, r.shape[-1], r)          # one kernel on a GPU
    return _narrow_minus_host(B, c, r.shape[-1], r)


def _narrow_minus_host(B, c, n, r):
    """r <- [B, 0] - r in place, B the first c of n columns."""
    r = get_xp(r).negative(r, out=r)
    r[..., :c] += B
    return r


_NARROW_MINUS = RawKernel("raw T B, int64 c, int64 n", "T r",
                          "long long col = i % n; r = col < c ? B[(i / n) * c + col] - r : -r;",
                          "gait_ref_narrow_minus", _narrow_minus_host)


# One fused kernel each on a GPU (gait_ref.kernels): sum(a^2) over the last axis; a / sqrt(s)
_SUM_OF_SQUARES_LAST = Kernel(lambda xp: lambda a: xp.sum(a * a, axis=a.ndim - 1), name="sum_of_squares_last")
_DIVIDE_BY_SQRT = Kernel(lambda xp: lambda a, s: a / xp.sqrt(s), name="divide_by_sqrt")


class SquareInverse:
    """The map B -> B @ W^-1 for a square W (D, D), or a stack (P, D, D): a fresh LU solve."""

    def __init__(self, W):
        if W.ndim < 2 or W.shape[-1] != W.shape[-2]:
            raise ValueError(f"exact inverse needs square weights, got shape {W.shape}")
        self.W, self.xp, self.shape = W, get_xp(W), W.shape
        self.sq = []

    def right_solve(self, B):
        """X = B @ W^-1. B : (M, D) for a 2-D W, (P, M, D) for a stack, or only its first c
        columns, (.., M, c), the rest being zero.  X W = B <=> W^T X^T = B^T.
        ``self.sq`` becomes [a lower bound on ||W||_2^2, ||B||^2, ||X||^2], 0-d device arrays
        (``solve_amplifies_past``): a nearly singular W gives a huge but finite X, which
        nothing else would notice (an LU meets a tiny pivot, not always a zero one)."""
        B = widen(B, self.shape[-1])
        x = _t(self.xp.linalg.solve(_t(self.W), _t(B)))
        self.sq = [norm_lower_bound_squared(self.W), squared_norm(B), squared_norm(x)]
        return x


class RefinedInverse:
    """One square layer's refinement state: an approximate inverse X and how many
    corrections its solves apply (see the module docstring)."""

    def __init__(self):
        self.X, self.K, self.refreshes = None, 1, 0
        self.corrections, self.combined = 0, 0     # corrections applied and combined solves, all told (statistics)
        self._planned, self.rho, self.eta0 = None, None, None
        # X was made from the very weights this step solves with (the first step, or a retry
        # after a miss), so this step's errors show none of the drift the next step will add
        self.exact_now = False
        self.renewing = False          # X is renewed for the weights at every step (see operator)
        self.retry = False             # this solve recomputes a step after a miss (see operator)
        self.v = None                  # the power iteration's unit vector(s), (D,) or (P, D)
        self.cap = None                # corrections planned at most, from the step's rows (operator)
        # the corrections are combined by minimal residual (_RefinedSolve._solve_by_krylov): a
        # float32 layer that keeps its inverse for many steps (set by operator)
        self.krylov = False
        self.rows = 0                  # the step's rows per matrix, over all processes (operator)
        # a kept inverse's cycle (krylov layers): steps solved with X since it was made, the
        # corrections spent in them, and the corrections each age needed (the fewest that met
        # bound / 4), in this cycle and the one before, which plans the same age of the next
        self.age, self.spent, self.needed, self.last_cycle = 0, 0, [], []
        self.etas = []                 # the last checked solve's backward errors (check)

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
            est = _SUM_OF_SQUARES_LAST(u)
            w = (u[..., None, :] @ _t(W))[..., 0, :]                 # v W W^T
            self.v = _DIVIDE_BY_SQRT(w, _SUM_OF_SQUARES_LAST(w)[..., None])
        return est.max()

    def refresh(self, W, newton: bool = False, K: int | None = None, live: int | None = None) -> None:
        """A better X for the weights W: with ``newton``, one Newton-Schulz step X (2 I - W X)
        (two GEMMs; it squares I - W X) if the kept X is close (the corrections contracted by
        rho < 1/2, or the last uncorrected solve was within ``NEWTON_FROM`` of exact); else
        a fresh inverse. ``K``: the corrections to apply from now on (None: unchanged).
        ``live``: the solves' right-hand sides have only their first ``live`` columns, so
        where no correction is planned (which multiplies by all of X) a fresh inverse is
        only its first ``live`` rows: an LU and ``live`` triangular solves, the very rows
        ``inv`` gives, for 2/3 D^3 + 2 live D^2 flops instead of 2 D^3.

        A fresh inverse is computed in float64 and rounded to W's dtype. numpy's linalg does
        that for float32 by itself; CuPy's runs cuSOLVER in the input dtype, and a float32
        inverse is about cond(W) times less exact: on the emulator, which computes linalg in
        the input dtype as CuPy does, conv7's conv2 at 64 px (D = 216) then missed the
        bound with its rows-only inverse and fell back to a corrected full inverse
        (tests/test_device_emulation.py, the narrow right-hand sides test). The float64 LU
        costs a GPU little (2 D^3 flops, 0.06 TFLOP for the 3072-wide layer)."""
        xp = get_xp(W)
        if K is not None:
            self.K = K
        close = ((self.rho is not None and self.rho < 0.5)
                 or (self.eta0 is not None and self.eta0 < NEWTON_FROM))
        D = W.shape[-1]
        if newton and self.X is not None and close and self.X.shape == W.shape:
            T = -(W @ self.X)                                        # -W X
            diag = diagonal(T)
            diag += 2                                                # 2 I - W X
            self.X = self.X @ T
        elif live is not None and live < D and self.K == 0:
            E = xp.zeros(W.shape[:-2] + (D, live), dtype=xp.float64)  # the first live columns of I
            diagonal(E)[...] = 1
            self.X = _t(xp.linalg.solve(_t(W.astype(xp.float64)), E)).astype(W.dtype)   # X[:live] W = I[:live]
        else:
            self.X = xp.linalg.inv(W.astype(xp.float64, copy=False)).astype(W.dtype, copy=False)
        self.rho = None
        self.refreshes += 1
        if self.needed:
            self.last_cycle = self.needed
        self.age, self.spent, self.needed = 0, 0, []

    def operator(self, W, rows: int = 0, retry: bool = False, live: int | None = None) -> "_RefinedSolve":
        """The solver for this step's weights W. ``rows``: how many rows the step's solves
        have per matrix over all processes (the batch, times the output positions of a conv).
        Where that is at least D, X is a fresh inverse of W at every step, which costs less
        than the one correction a Newton-Schulz renewal would still need (see the module
        docstring), so the planned corrections are none (and X is only the rows that
        right-hand sides with ``live`` columns meet, see ``refresh``). ``retry``: the step's
        targets are being computed again after a miss (this layer's or another's), so X may
        have been made or renewed for these very weights already, and what this attempt
        measures is no guide to the next step (see ``check``)."""
        self.renewing, self.retry = rows >= W.shape[-1], retry
        self.cap = correction_cap(W.dtype, rows, W.shape[-1])
        self.krylov = (not self.renewing and W.dtype == np.float32
                       and self.cap > max_corrections(W.dtype))
        self.rows = rows
        if not retry:                 # on a retry, keep what the miss's fresh inverse set
            self.exact_now = False
        if self.X is None or self.X.shape[:-2] != W.shape[:-2] or self.X.shape[-1] != W.shape[-1]:
            self.refresh(W, K=1)
            self.exact_now = True
        elif self.renewing:
            self.refresh(W, live=live)
        elif self.X.shape != W.shape:                       # rows only, but no longer renewing
            self.refresh(W)
        return _RefinedSolve(self, W)

    def check(self, sq: list, bound: float, W, world: int = 1) -> bool:
        """``sq``: this step's solve's ``_RefinedSolve.sq`` as read (summed over ``world``
        processes); its backward errors after 0..K corrections are kept in ``self.etas``.
        True if the last met the bound (and the fewest corrections that met bound / 4 are
        planned for the next step); else the solver is strengthened: a kept inverse gets the
        corrections its contraction says reach bound / 4, if within ``correction_cap``, else a
        fresh inverse of W (the weights this step solves with); a fresh one gets one more
        correction, up to ``max_corrections(dtype)``, then another fresh inverse. Where the
        corrections are combined (``krylov``), etas[1:K] are the combination's predicted
        residuals and etas[K] the x's own, and each age's need is kept for the next cycle.
        SingularWeights if the solve proves W numerically singular in its dtype
        (``condition_lower_bound`` past 1 / eps): no solver can give a meaningful x."""
        self.etas = etas = backward_errors(sq, world)
        cond, eps = condition_lower_bound(sq, world), float(np.finfo(W.dtype).eps)
        if np.isfinite(cond) and cond * eps > 1:        # non-finite: a miss, retried below
            raise SingularWeights(f"the weights are numerically singular in {np.dtype(W.dtype).name}: "
                                  f"cond(W) >= {cond:.1e} > 1/eps = {1 / eps:.1e}")
        self.eta0 = etas[0]
        self.spent += len(etas) - 1
        self.corrections += len(etas) - 1
        self.combined += bool(self.krylov and len(etas) > 1)
        rate = None
        if len(etas) > 1 and etas[0] > 0:                             # how fast corrections contract
            if self.krylov:
                # the first correction's contraction measures I - X W (what decides a Newton-Schulz
                # renewal, see refresh); the last predicted one, how fast the combination converges
                # now (its steps accelerate, so the first would overstate a miss's need)
                self.rho = etas[1] / etas[0]
                rate = etas[-2] / etas[-3] if len(etas) > 2 and etas[-3] > 0 else self.rho
            else:
                self.rho = rate = max(b / a for a, b in zip(etas, etas[1:]) if a > 0)
        if etas[-1] <= bound:
            # the fewest corrections that reached bound / 4; none did: one more than now (the
            # kept inverse only grows staler, so a residual near the bound misses it next step)
            self._planned = _fewest_next_step(etas, bound / 4, 0)
            if self.krylov and not self.exact_now:
                self.needed += [0] * (self.age + 1 - len(self.needed))
                self.needed[self.age] = max(self.needed[self.age], self._planned)
                self._planned = _fewest_next_step(etas, bound / 4, self.age)
            # a layer whose cap passes max_corrections keeps its inverse for several steps, each
            # a step's drift staler: one correction of margin (a fraction of a renewal's cost)
            # against a miss, which recomputes the whole step's targets
            if self._cap(W.dtype) > max_corrections(W.dtype) and not self.exact_now:
                self._planned += 1
            # a retry's X may have been made or renewed for these very weights, fresher than
            # the next step's will be: plan at least the corrections the miss showed were needed
            if self.retry:
                self._planned = max(self._planned, self.K)
            if self.exact_now and not self.renewing:         # next step, X is a step's drift away
                self._planned = max(self._planned, self._after_renewal(W.dtype))
            # what the last cycle's inverse needed one step older (the drift after a renewal
            # grows fastest in its first steps, faster than one correction of margin covers)
            if self.krylov and self.age + 1 < len(self.last_cycle):
                self._planned = max(self._planned, self.last_cycle[self.age + 1])
            return True
        self._planned = None
        # a kept inverse: as many corrections as this solve's contraction says reach bound / 4
        # (one recomputation of the step, not one per added correction), or, beyond the cap,
        # a fresh inverse now
        needed = corrections_to_reach(etas, bound / 4, rate) if len(etas) > 1 else None
        if not self.exact_now and needed is not None and needed <= self._cap(W.dtype):
            self.K = max(needed, self.K + 1)
        elif (not self.exact_now and needed is not None) or self.K >= max_corrections(W.dtype):
            self.refresh(W, K=1)
            self.exact_now = True
        else:
            self.K += 1
        return False

    def _after_renewal(self, dtype) -> int:
        """The corrections planned for a one-step-old inverse (renewed or fresh for the last
        step's weights): ``max_corrections(dtype)``, and one more where the cap allows (conv7's
        3072-wide layer at 224 px, batch 32, float32: errors 3.4e-3, 1.5e-4, 7.4e-6 after 0, 1,
        2 corrections, at the bound of 7.6e-6 with two, so a miss about every other step)."""
        planned = max_corrections(dtype) + 1
        if self.krylov and len(self.last_cycle) > 1:
            planned = max(planned, self.last_cycle[1])
        return min(self._cap(dtype), planned)

    def _cap(self, dtype) -> int:
        """``correction_cap`` for the step's rows (set by ``operator``), ``MAX_KRYLOV`` where
        the corrections are combined (``krylov``); ``max_corrections`` for a solver checked
        without either."""
        if self.krylov:
            return MAX_KRYLOV
        return self.cap if self.cap is not None else max_corrections(dtype)

    def _renewal_pays(self, dtype) -> bool:
        """For a ``krylov`` layer, after ``self.age`` steps with X: whether renewing X now costs
        less over the next cycle than keeping it. A renewal costs about D / rows corrections
        (4 D^3 flops for Newton-Schulz against 4 rows D^2 a correction; a fresh inverse, 2 D^3
        at LAPACK's slower rate, about as much); the corrections a kept X needs grow with its
        age. Renewing when the next step's corrections exceed the cycle's mean cost so far,
        (corrections spent + renewal) / steps, keeps the mean cost per step near its minimum
        (the rule for replacing anything whose running cost grows). conv7's 3072-wide layer
        at 224 px, float32: batch 32, a renewal of 96 corrections against 1-8 corrections a
        step, renewed after about 40 steps; batch 256, 12 against 4-5, after about 13. The
        rows are those of all processes, as for the cap, so that any number of processes
        decides alike (each process pays the whole renewal and its share of the
        corrections, so with P processes the truly cheapest cycle is somewhat longer)."""
        if not self.krylov or self.rows <= 0:
            return False
        renewal = self.X.shape[-1] / self.rows
        return self.K > (self.spent + renewal) / max(1, self.age)

    def settle(self, W) -> None:
        """The step succeeded on every layer: use the planned number of corrections. Past the
        layer's ``correction_cap``, X is renewed instead (Newton-Schulz where it is close), from
        the weights W of this step for the next step's weights: one step's drift from exact
        again, which takes that many corrections, not one (a plan of one
        correction after a renewal missed the bound at the next step whenever the weights
        moved steadily, and every miss costs a recomputation of the step's targets)."""
        if self._planned is not None:
            self.K, self._planned = self._planned, None
            if self.K > self._cap(W.dtype) or self._renewal_pays(W.dtype):
                self.refresh(W, newton=True, K=None)
                self.K = self._after_renewal(W.dtype)
            self.age += 1                                   # the next step's weights are a step further

    def state_dict(self, prefix: str) -> dict:
        from .backend import to_numpy
        if self.X is None:
            return {}
        state = {f"{prefix}X": to_numpy(self.X), f"{prefix}K": np.array(self.K)}
        if self.v is not None:
            state[f"{prefix}v"] = to_numpy(self.v)
        if self.rho is not None:                     # what the next renewal reads (refresh)
            state[f"{prefix}rho"], state[f"{prefix}eta0"] = np.array(self.rho), np.array(self.eta0)
        if self.age or self.last_cycle:              # a kept inverse's cycle (krylov layers)
            state[f"{prefix}cycle"] = np.array([self.age, self.spent])
            for name in ("needed", "last_cycle"):    # empty lists are left out
                if getattr(self, name):
                    state[f"{prefix}{name}"] = np.array(getattr(self, name), dtype=np.int64)
        return state

    def load_state_dict(self, state: dict, prefix: str, xp) -> None:
        from .backend import to_device
        if f"{prefix}X" in state:
            self.X, self.K = to_device(state[f"{prefix}X"], xp), int(state[f"{prefix}K"])
        if f"{prefix}v" in state:                    # absent in checkpoints from before the bound used it
            self.v = to_device(state[f"{prefix}v"], xp)
        if f"{prefix}rho" in state:                  # absent before X was renewed at every step
            self.rho, self.eta0 = float(state[f"{prefix}rho"]), float(state[f"{prefix}eta0"])
        if f"{prefix}cycle" in state:                # absent before the corrections were combined
            self.age, self.spent = (int(v) for v in state[f"{prefix}cycle"])
            self.needed = [int(v) for v in state.get(f"{prefix}needed", [])]
            self.last_cycle = [int(v) for v in state.get(f"{prefix}last_cycle", [])]


class _RefinedSolve:
    """B -> B @ W^-1 by refinement from the layer's X; keeps what its backward errors are
    made of (``backward_errors``)."""

    def __init__(self, state: RefinedInverse, W):
        self.state, self.W, self.sq = state, W, []

    def right_solve(self, B):
        """B @ W^-1, refined. B : (.., M, D), or only its first c columns (.., M, c), the rest
        being zero (a square layer's auxiliary channels, ``gait_ref.live``): the first
        product then reads only c rows of X, c / D of its flops. ``self.sq`` becomes
        [||W||_2^2 (estimated), ||B||^2, ||x_K||^2, ||r_0||^2, .., ||r_K||^2], 0-d arrays on the
        device."""
        X, W = self.state.X, self.W
        if X.shape[-2] < X.shape[-1] and B.dtype == np.float32:     # only rows of W^-1 kept: K = 0
            return self._solve_by_rows(B)
        x = B @ X[..., :B.shape[-1], :]                              # (.., M, D)
        if self.state.K and self.state.krylov:
            return self._solve_by_krylov(B, x)
        r = _residual(B, x, W)
        r2 = [squared_norm(r)]
        for _ in range(self.state.K):
            x = x + r @ X
            r = _residual(B, x, W)
            r2.append(squared_norm(r))
        self.sq = [self.state.norm_squared(W), squared_norm(B), squared_norm(x)] + r2
        return x

    def _solve_by_krylov(self, B, x0):
        """x = x_0 + sum_j c_j z_j, the minimal-residual combination of the K corrections, for a
        kept inverse X of a layer that keeps it for many steps (``RefinedInverse.krylov``). The
        corrections are those of the refinement above, z_j = r_{j-1} X with
        r_j = r_{j-1} - z_j W = r_0 (I - X W)^j, so x_0 + span(z_1..z_K) is the right-preconditioned
        Krylov space GMRES searches; each row of x (its own linear system) takes the c_j that
        minimise ||r_0 - sum_j c_j y_j|| (y_j = z_j W) over it, from the row's Gram matrix of
        [y_1 .. y_K, r_0] in float64. The refinement's iterates take every c_j = 1, the best
        combination only while I - X W is uniformly small; a stale X has a few slow directions
        (the weights' drift since X was made), which GMRES removes in a few steps: conv7's
        3072-wide output layer at 224 px, batch 32, needed 9, 13 and 39 corrections at inverse
        ages 7, 10 and 15 steps, and 4, 5 and 6 combined (docs/BENCHMARKS.md; the same effect
        on a constructed drift: ``tests/test_linalg.py::
        test_the_combination_needs_far_fewer_corrections_than_refinement``).

        The Gram matrix G (.., M, K + 1, K + 1) is scaled to a unit diagonal and shifted by
        ``KRYLOV_SHIFT`` (the monomial basis y_j grows nearly dependent as the iteration
        converges; rounding leaves G's eigenvalues about 1e-15 from the truth), and factorised
        G = L L^T. The last row of L holds r_0's coordinates in the orthonormal basis of
        y_1 .. y_K, r_0, so the residual after k corrections is ||r_0||^2 sum_{i >= k} L_{K,i}^2
        (the history ``check`` plans the next step's corrections from) and the coefficients
        solve L_K^T c = L_{K, :K}. These are predictions: the solve's backward error, the one
        checked against the bound, is that of the x returned, B - x W computed anew (one GEMM
        more than the refinement's K corrections). ``self.sq``: [||W||_2^2, ||B||^2, ||x||^2,
        ||r_0||^2, the predicted residuals after 1 .. K - 1 corrections, ||B - x W||^2]."""
        X, W, K = self.state.X, self.W, self.state.K
        xp, dt = get_xp(B), B.dtype
        Z = xp.empty((K,) + x0.shape, dtype=dt)                     # z_j = r_{j-1} X
        A = xp.empty((K + 1,) + x0.shape, dtype=dt)                 # y_1 .. y_K, r_0
        r = r0 = _residual(B, x0, W, out=A[K])
        for j in range(K):
            xp.matmul(r, X, out=Z[j])
            xp.matmul(Z[j], W, out=A[j])
            if j + 1 < K:
                r = r - A[j]
        A64 = xp.moveaxis(A, 0, -2).astype(xp.float64)            # (.., M, K + 1, D)
        G = A64 @ _t(A64)                                            # (.., M, K + 1, K + 1)
        del A64
        d = diagonal(G)                                               # squared norms
        s = _INVERSE_NORMS(d)                                         # 1 / norm, 0 for a zero vector
        Gn = _SCALED_GRAM(G, s[..., :, None], s[..., None, :])       # non-finite -> 0
        diagonal(Gn)[...] = 1 + KRYLOV_SHIFT
        L = xp.linalg.cholesky(Gn)
        last = L[..., K, :]                                           # (.., M, K + 1)
        # sum over rows of ||r_0||^2 L_{K,i}^2, then its tail sums: the residual after 0 .. K corrections
        parts = _SQUARE_TIMES(last, d[..., K:]).reshape(-1, K + 1).sum(axis=0)
        history = xp.cumsum(parts[::-1])[::-1].astype(dt)
        c = xp.linalg.solve(_t(L[..., :K, :K]), last[..., :K, None])  # (.., M, K, 1)
        c = _UNSCALE(c, s[..., :K, None], s[..., K:, None])
        Z64 = xp.moveaxis(Z, 0, -2).astype(xp.float64)               # (.., M, K, D)
        x = _ADD_ROUNDED(x0, (_t(c) @ Z64)[..., 0, :])
        r = _residual(B, x, W)
        self.sq = ([self.state.norm_squared(W), squared_norm(B), squared_norm(x), squared_norm(r0)]
                   + [history[k] for k in range(1, K)] + [squared_norm(r)])
        return x

    def _solve_by_rows(self, B):
        """x = B_c X_c, where X_c holds the first c rows of a fresh W^-1 (``refresh`` with
        ``live``; no correction planned) and B_c the c live columns of B. Its backward error
        is bounded without the residual B - x W, a GEMM of rows x D x D that would cost D / c
        times the product (conv7's conv2 at batch 64: 1.53 against 0.17 GFLOP), from

            B - x W = B_c E - delta W,   E = I[:c] - X_c W,   delta = x - B_c X_c,

        with the product formed in float64 (by blocks of rows, so its temporaries stay
        small) and rounded to float32 once, so that
        ||delta||_F <= u ||x||_F + gamma_c ||B_c||_F ||X_c||_F (u = 2^-24 the rounding to
        float32, gamma_c = c 2^-53 / (1 - c 2^-53) the float64 product's error bound), and
        ||B_c E||_F^2 = sum(E * (B_c^T B_c) E): a Gram matrix of rows x c x c, and products of
        c x D x D, all in float64, where the float32 data multiply exactly. Dividing by
        ||W||_2 ||x||_F, the delta term loses ||W||_2, and the estimate w <= ||W||_2 only
        enlarges the first term, so

            eta <= ||B_c E||_F / (w ||x||_F) + ||delta||_F / ||x||_F,

        which ``self.sq`` carries as its residual entry (r = w ||x|| eta-bound): the check
        that follows tests this upper bound on the backward error against the same bound as
        every other solve (``test_the_row_inverse_solve_bounds_its_backward_error_from_above``).
        conv7 GP step at 64 px, batch 64: 260 -> 227 ms on the 2-core EPYC
        (``bench/ab_versions.py``). The float64 product runs at half the float32 rate on
        CPUs and on data-centre GPUs; on a GPU with a small float64 rate (consumer cards)
        it may cost more than the residual it replaces: not measured, no GPU was lent."""
        X, W = self.state.X, self.W
        xp, c = get_xp(B), B.shape[-1]
        M, D = B.shape[-2], W.shape[-1]
        X64 = X.astype(xp.float64)
        x = xp.empty(B.shape[:-1] + (D,), dtype=B.dtype)
        gram = xp.zeros(B.shape[:-2] + (c, c), dtype=xp.float64)
        block = ROWS_BLOCK if xp is np else DEVICE_ROWS_BLOCK
        rows = max(1, block // D)                 # float64 temporaries of at most that many entries
        for i in range(0, M, rows):
            b = B[..., i:i + rows, :].astype(xp.float64)
            x[..., i:i + rows, :] = b @ X64                             # rounded to float32 once
            gram += _t(b) @ b                                           # (.., c, c)
        E = -(X64 @ W.astype(xp.float64))                               # (.., c, D)
        diag = diagonal(E)
        diag += 1                                                       # I[:c] - X_c W
        w2, b2, x2 = self.state.norm_squared(W), squared_norm(B), squared_norm(x)
        u, g = 2.0 ** -24, c * 2.0 ** -53 / (1 - c * 2.0 ** -53)
        f64 = np.float64
        r2 = _ROWS_BOUND(_SUM_OF_PRODUCTS(E, gram @ E), _SUM_OF_PRODUCTS(X64, X64), w2, b2, x2, f64(u), f64(g),
                         f64(1 + 4 * u), f64(1))
        self.sq = [w2, b2, x2, r2.astype(B.dtype)]                        # the float32 rounding of r^2 covered
        return x


def _rows_bound(xp):
    """``_RefinedSolve._solve_by_rows``'s bound on r^2 from its sums, in float64 (``one`` =
    1.0 casts the float32 norms exactly):
    (||B_c E|| + w (u ||x|| + g ||B_c|| ||X_c||))^2 (1 + 4u)."""
    def rows_bound(sum_ege, sum_xx, w2, b2, x2, u, g, k, one):
        be = xp.sqrt(xp.maximum(sum_ege, 0))                                  # ||B_c E||_F
        delta = u * xp.sqrt(x2 * one) + g * xp.sqrt(b2 * one * sum_xx)
        r = be + xp.sqrt(w2 * one) * delta
        return r * r * k
    return rows_bound


_ROWS_BOUND = Kernel(_rows_bound)
# _solve_by_krylov's scaling of its Gram matrices, one fused kernel each on a GPU
_INVERSE_NORMS = Kernel(lambda xp: lambda d: xp.where(d > 0, 1 / xp.sqrt(xp.where(d > 0, d, 1)), 0),
                        name="inverse_norms")
_SCALED_GRAM = Kernel(lambda xp: lambda G, a, b: xp.where(xp.isfinite(G * a * b), G * a * b, 0), name="scaled_gram")
_SQUARE_TIMES = Kernel(lambda xp: lambda a, b: a * a * b, name="square_times")
_ADD_ROUNDED = Kernel(lambda xp: lambda x, u: (x + u).astype(x.dtype), name="add_rounded")
_UNSCALE = Kernel(lambda xp: lambda c, s, s_r: xp.where(s_r > 0, c * s / xp.where(s_r > 0, s_r, 1), 0),
                  name="unscale")
_SUM_OF_PRODUCTS = Kernel(lambda xp: lambda a, b: xp.sum(a * b), name="sum_of_products")
