"""Output losses on the first K output units; auxiliary output units get zero error.

Each loss returns the loss value and dL/dy_L. Any loss becomes an output *target*
t_L = y_L - dL/dy_L (GAIT-prop NeurIPS sec. 5): the local loss 0.5 ||y_L - t_L||^2
then has exactly the gradient dL/dy_L. (The scaling code writes t_L = y_L - 0.5 dL/dy_L
with a local loss ||y_L - t_L||^2; it is the same target scale.)
Reduction is a sum over the batch, as in both reference codes, or the mean. The loss
value is a 0-d array on the batch's device (reading it is the caller's choice), and the
mean divides by ``n_total``, the global batch size when a batch is split over processes
(default: the rows given).
"""
from __future__ import annotations

from .backend import get_xp
from .kernels import Kernel
from .live import widen


def _scale(reduction: str, n: int) -> float:
    if reduction == "sum":
        return 1.0
    if reduction == "mean":
        return 1.0 / n
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


class SoftmaxCrossEntropy:
    name = "cross_entropy"

    def __init__(self, n_classes: int, reduction: str = "sum"):
        self.n_classes, self.reduction = int(n_classes), reduction
        self._index_cache = {}

    def logits(self, y):
        return y[:, :self.n_classes]                                # (N, K)

    def value_and_grad(self, y, labels, n_total=None):
        """y : (N, O >= K), labels : (N,) int -> (loss : 0-d array, dL/dy : (N, O)).
        With m the rows' maxima and lse = log sum exp(z - m), log p = (z - m) - lse; the
        loss is -sum log p at the labels, the gradient softmax - onehot: five kernels on a
        GPU (``_LOG_SUM_EXP``, ``_NLL``, ``_SOFTMAX_MINUS_ONEHOT`` and the max and the gather)."""
        xp = get_xp(y, labels)
        N, K = y.shape[0], self.n_classes
        z = self.logits(y)
        m = z.max(axis=1, keepdims=True)
        lse = _LOG_SUM_EXP(z, m)[:, None]                                   # (N, 1)
        s = _scale(self.reduction, N if n_total is None else n_total)
        rows, cols = self._indices(xp, N, K)
        loss = _NLL(z[rows, labels][:, None], m, lse, y.dtype.type(s))
        p = _SOFTMAX_MINUS_ONEHOT(z, m, lse, cols, labels[:, None], y.dtype.type(s))    # (N, K)
        return loss, widen(p, y.shape[1])

    def _indices(self, xp, N: int, K: int):
        """arange(N) and arange(K) on ``xp``, made once per shape (a launch each)."""
        key = (xp.__name__, N, K)
        if key not in self._index_cache:
            self._index_cache = {key: (xp.arange(N), xp.arange(K)[None, :])}     # the last shape only
        return self._index_cache[key]


# The cross-entropy's chains, one fused kernel each on a GPU (gait_ref.kernels).
_LOG_SUM_EXP = Kernel(lambda xp: lambda z, m: xp.log(xp.sum(xp.exp(z - m), axis=1)), name="log_sum_exp")
_NLL = Kernel(lambda xp: lambda z_label, m, lse, s: -xp.sum(z_label - m - lse) * s, name="nll")


def _softmax_minus_onehot(xp):
    def softmax_minus_onehot(z, m, lse, cols, labels, s):
        return (xp.exp(z - m - lse) - (cols == labels)) * s
    return softmax_minus_onehot


_SOFTMAX_MINUS_ONEHOT = Kernel(_softmax_minus_onehot)


class MeanSquaredError:
    """0.5 * sum_k (y_k - onehot_k)^2 over the first K units (the NeurIPS code's loss)."""

    name = "mse"

    def __init__(self, n_classes: int, reduction: str = "sum"):
        self.n_classes, self.reduction = int(n_classes), reduction

    def logits(self, y):
        return y[:, :self.n_classes]

    def value_and_grad(self, y, labels, n_total=None):
        xp = get_xp(y, labels)
        N, K = y.shape[0], self.n_classes
        s = _scale(self.reduction, N if n_total is None else n_total)
        diff = y[:, :K].copy()
        diff[xp.arange(N), labels] -= 1
        gy = xp.zeros_like(y)
        gy[:, :K] = diff * y.dtype.type(s)
        return (diff * diff).sum() * (0.5 * s), gy


LOSSES = {"cross_entropy": SoftmaxCrossEntropy, "mse": MeanSquaredError}


def make_loss(name: str, n_classes: int, reduction: str = "sum"):
    try:
        return LOSSES[name](n_classes, reduction)
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
