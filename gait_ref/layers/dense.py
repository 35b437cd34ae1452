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

Output gradients and differences may hold only their first c units (``gait_ref.live``);
with ``read_only`` the backward maps return only the R units read, shaped as the leading
channels of the input (R must then be whole channels).
"""
from __future__ import annotations

import math

from ..backend import get_xp
from ..linalg import SquareInverse
from ..live import leading, widen


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
        """(N, R): the units read, from a whole input or from one holding only its leading
        channels (a forward pass of the channels read, ``Network.read_widths``)."""
        return x.reshape(x.shape[0], -1)[:, :self.n_read]          # (N, R)

    def _embed(self, x_read, fill):
        """Put (N, R) back into a full (N, *in_shape) array, unread units from ``fill``."""
        xp = get_xp(x_read)
        if self.n_read == self.n_in:
            return x_read.reshape((-1,) + self.in_shape)
        N = x_read.shape[0]
        rest = (xp.zeros((N, self.n_in - self.n_read), x_read.dtype) if fill is None
                else fill.reshape(N, self.n_in)[:, self.n_read:])
        return xp.concatenate([x_read, rest], axis=1).reshape((N,) + self.in_shape)

    def _read_part(self, x_read):
        """(N, R) -> the read units as the leading channels of the input: (N, R) for a flat
        input, (N, R / (H W), H, W) for a map (R must then be whole channels)."""
        per_channel = math.prod(self.in_shape[1:])
        if self.n_read % per_channel:
            raise ValueError(f"{self.name}: reads {self.n_read} units, not whole channels of {self.in_shape}")
        return x_read.reshape((x_read.shape[0], self.n_read // per_channel) + self.in_shape[1:])

    def _out(self, x_read, read_only):
        return self._read_part(x_read) if read_only else self._embed(x_read, None)

    # ---- forward and BP -------------------------------------------------------------
    def forward(self, x, width: int | None = None):
        """h = x[:, :R] W + b. x : (N, *in_shape) -> h : (N, O), cache; with ``width``, only
        the first ``width`` output units (the rest being read by nothing, ``gait_ref.live``)."""
        W, b = leading(self.params["W"], width), leading(self.params["b"], width)
        return self._read(x) @ W + b, {"x": x}

    def input_grad(self, gh, cache, W=None, read_only=False):
        """dL/dx = gh W^T (zeros on unread units); W may be a feedback matrix (FA). New array."""
        return self.linear_transpose(gh, self.params["W"] if W is None else W, read_only)

    def linear_transpose(self, a, V, read_only=False):
        """a V^T for any (R, O) matrix V, as a full (N, *in_shape) array (zero on unread units),
        or only the units read. ``a`` : (N, c), the first c of the O units (the rest zero)."""
        return self._out(a @ leading(V, a.shape[1]).T, read_only)

    def transpose_weight_grad(self, a, gx):
        """d<gx, linear_transpose(a, V)>/dV = gx_R^T a: (R, O)."""
        return self._read(gx).T @ a

    def param_grads(self, gh, cache):
        """{'W': x_R^T gh, 'b': sum_n gh}: new arrays. gh : (N, c), the first c of the O
        units (the rest zero, and so are their columns of the gradient)."""
        return {"W": widen(self._read(cache["x"]).T @ gh, self.n_out), "b": widen(gh.sum(axis=0), self.n_out)}

    # ---- exact inverse ----------------------------------------------------------------
    def inverse_operator(self):
        return SquareInverse(self.params["W"])

    def inverse(self, h, cache, op):
        """x = (h - b) W^-1, full width, auxiliary units from the forward input (eq. 5, 22)."""
        return self._embed(op.right_solve(h - self.params["b"]), cache["x"])

    def inverse_delta(self, dh, cache, op, read_only=False):
        """The linear part of the inverse: dx = dh W^-1, zero on auxiliary units (or only the
        units read). dh : (N, c), the first c of the O units (the rest zero)."""
        return self._out(op.right_solve(dh), read_only)
