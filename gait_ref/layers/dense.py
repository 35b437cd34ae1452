"""Dense (fully connected) layer: forward, exact inverse, gradients.

Legend
    N  batch    I  input units (all of them)    R  units read (the first R of I)
    O  output units

The layer reads only the first R input units; the other I - R are *auxiliary*
(GAIT-prop NeurIPS sec. 5): ignored going up, and carried through the inverse
unchanged from the forward pass. The input may be any shape (N, *in_shape); it is
flattened in C order, so a dense layer on a conv map reads channel-major.

The layer is the affine map h = x[:, :R] W + b only; its nonlinearity belongs to the
network (``gait_ref.network``), which keeps y = f(h).
"""
from __future__ import annotations

import math

from ..backend import get_xp
from ..linalg import SquareInverse


class Dense:
    kind = "dense"

    def __init__(self, in_shape, n_out: int, n_read: int | None = None, name: str = "dense"):
        self.in_shape = tuple(in_shape)
        self.n_in = math.prod(self.in_shape)
        self.n_read = self.n_in if n_read is None else int(n_read)
        if not 0 < self.n_read <= self.n_in:
            raise ValueError(f"{name}: reads {self.n_read} of {self.n_in} input units")
        self.n_out = int(n_out)
        self.out_shape = (self.n_out,)
        self.name = name
        self.params = {}  # 'W' : (R, O), 'b' : (O,), set by gait_ref.init

    @property
    def weight_shape(self):
        return (self.n_read, self.n_out)

    @property
    def square(self) -> bool:
        return self.n_read == self.n_out

    def _read(self, x):
        return x.reshape(x.shape[0], self.n_in)[:, :self.n_read]   # (N, R)

    def _embed(self, x_read, fill):
        """Put (N, R) back into a full (N, *in_shape) array, unread units from ``fill``."""
        xp = get_xp(x_read)
        if self.n_read == self.n_in:
            return x_read.reshape((-1,) + self.in_shape)
        N = x_read.shape[0]
        rest = (xp.zeros((N, self.n_in - self.n_read), x_read.dtype) if fill is None
                else fill.reshape(N, self.n_in)[:, self.n_read:])
        return xp.concatenate([x_read, rest], axis=1).reshape((N,) + self.in_shape)

    # ---- forward and BP -------------------------------------------------------------
    def forward(self, x):
        """h = x[:, :R] W + b. x : (N, *in_shape) -> h : (N, O), cache."""
        W, b = self.params["W"], self.params["b"]
        return self._read(x) @ W + b, {"x": x}

    def input_grad(self, gh, cache, W=None):
        """dL/dx = gh W^T (zeros on unread units); W may be a feedback matrix (FA). New array."""
        return self.linear_transpose(gh, self.params["W"] if W is None else W)

    def linear_transpose(self, a, V):
        """a V^T for any (R, O) matrix V, as a full (N, *in_shape) array (zero on unread units)."""
        return self._embed(a @ V.T, None)

    def transpose_weight_grad(self, a, gx):
        """d<gx, linear_transpose(a, V)>/dV = gx_R^T a: (R, O)."""
        return self._read(gx).T @ a

    def param_grads(self, gh, cache):
        """{'W': x_R^T gh, 'b': sum_n gh}: new arrays."""
        return {"W": self._read(cache["x"]).T @ gh, "b": gh.sum(axis=0)}

    # ---- exact inverse ----------------------------------------------------------------
    def inverse_operator(self):
        return SquareInverse(self.params["W"])

    def inverse(self, h, cache, op):
        """x = (h - b) W^-1, full width, auxiliary units from the forward input (eq. 5, 22)."""
        return self._embed(op.right_solve(h - self.params["b"]), cache["x"])

    def inverse_delta(self, dh, cache, op):
        """The linear part of the inverse: dx = dh W^-1, zero on auxiliary units."""
        return self._embed(op.right_solve(dh), None)
