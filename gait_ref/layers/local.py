"""Locally connected 2-D layer (Bartunov et al. 2018): a convolution with untied weights.

Legend: as in ``gait_ref.layers.conv``, plus P = Ho * Wo output positions.
Weights W : (P, D, O), one (D, O) matrix per output position; biases b : (P, O).
Square when O = D: each position's matrix is then inverted on its own and the same
overlap correction as the square convolution makes the inverse exact. Output gradients
may hold only their first c channels, as for ``Conv2D``.
"""
from __future__ import annotations

from ..backend import get_xp
from ..im2col import col2im, im2col
from ..linalg import SquareInverse
from .conv import _Windowed
from ..live import leading, widen


class LocallyConnected2D(_Windowed):
    kind = "local"

    def __init__(self, in_shape, K: int, S: int, n_out: int | None = None,
                 c_read: int | None = None, padding: str = "same", name: str = "local"):
        self._setup(in_shape, c_read, K, S, padding, name)
        g = self.geom
        self.P = g.Ho * g.Wo
        self.n_out = g.D if n_out is None else int(n_out)
        self.out_shape = (self.n_out, g.Ho, g.Wo)
        self.params = {}  # 'W' : (P, D, O), 'b' : (P, O)

    @property
    def weight_shape(self):
        return (self.P, self.geom.D, self.n_out)

    @property
    def square(self) -> bool:
        return self.geom.D == self.n_out

    def _to_positions(self, rows, N):
        """(N * P, X) -> (P, N, X)."""
        return rows.reshape(N, self.P, -1).transpose(1, 0, 2)

    def _from_positions(self, hp):
        """(P, N, O) -> (N, O, Ho, Wo)."""
        xp = get_xp(hp)
        P, N, O = hp.shape
        return xp.ascontiguousarray(hp.transpose(1, 2, 0)).reshape(N, O, self.geom.Ho, self.geom.Wo)

    def _gh_positions(self, gh):
        """(N, O, Ho, Wo) -> (P, N, O)."""
        N, O = gh.shape[:2]
        return gh.reshape(N, O, self.P).transpose(2, 0, 1)

    def _positions_to_cols(self, cp):
        """(P, N, D) -> (N * P, D) im2col rows."""
        xp = get_xp(cp)
        P, N, D = cp.shape
        return xp.ascontiguousarray(cp.transpose(1, 0, 2)).reshape(N * P, D)

    def forward(self, x, width: int | None = None):
        """h[n, :, p] = patch_p(x_n) W[p] + b[p]. x : (N, C, H, W) -> (N, O, Ho, Wo); with
        ``width``, only the first ``width`` output channels (``gait_ref.live``)."""
        N = x.shape[0]
        cols = im2col(self._read(x), self.geom)                      # (N*P, D)
        hp = self._to_positions(cols, N) @ leading(self.params["W"], width)   # (P, N, O)
        hp += leading(self.params["b"], width)[:, None, :]
        return self._from_positions(hp), {"x": x, "cols": cols}

    def input_grad(self, gh, cache, W=None, read_only=False):
        return self.linear_transpose(gh, self.params["W"] if W is None else W, read_only)

    def linear_transpose(self, a, V, read_only=False):
        """The transposed locally connected map for any (P, D, O) weights V: each position's
        a_p V_p^T, summed back onto the input by col2im. (N, c, Ho, Wo), the first c of the O
        channels -> (N, C, H, W) (or only the Cr channels read)."""
        gcp = self._gh_positions(a) @ leading(V, a.shape[1]).transpose(0, 2, 1)   # (P, N, D)
        return self._out(col2im(self._positions_to_cols(gcp), self.geom, a.shape[0]), read_only)

    def transpose_weight_grad(self, a, gx):
        """d<gx, linear_transpose(a, V)>/dV, per position cols_p(gx)^T a_p: (P, D, O)."""
        cp = self._to_positions(im2col(self._read(gx), self.geom), gx.shape[0])   # (P, N, D)
        return cp.transpose(0, 2, 1) @ self._gh_positions(a)

    def param_grads(self, gh, cache):
        N = gh.shape[0]
        ghp = self._gh_positions(gh)                                 # (P, N, O)
        cp = self._to_positions(cache["cols"], N)                    # (P, N, D)
        return {"W": widen(cp.transpose(0, 2, 1) @ ghp, self.n_out), "b": widen(ghp.sum(axis=1), self.n_out)}

    def inverse_operator(self):
        return SquareInverse(self.params["W"])

    def inverse(self, h, cache, op):
        """Per-position patch inverse, col2im, minus (R - 1) x_forward (as Conv2D.inverse)."""
        x_read = self._read(cache["x"])
        hp = self._gh_positions(h) - self.params["b"][:, None, :]    # (P, N, O)
        cols = self._positions_to_cols(op.right_solve(hp))           # (N*P, D)
        x_rec = col2im(cols, self.geom, h.shape[0]) - self._overlap_correction(x_read)
        return self._embed(x_rec, cache["x"])

    def inverse_delta(self, dh, cache, op, read_only=False):
        cols = self._positions_to_cols(op.right_solve(self._gh_positions(dh)))
        return self._out(col2im(cols, self.geom, dh.shape[0]), read_only)
