"""2-D convolution by im2col: forward, transposed conv, gradients, exact inverse.

Legend (see also ``gait_ref.im2col``)
    N  batch        C  input channels (all)      Cr  channels read (the first Cr of C)
    H, W  input     Ho, Wo  output                K  kernel     S  stride
    D  = K * K * Cr, patch length       O  output channels     M  = N * Ho * Wo

The kernel is stored as the (D, O) matrix that multiplies im2col rows; rows run over
(ky, kx, c), TensorFlow's kernel order. A *square* conv has O = D: the patch-to-output
map is then an invertible D x D matrix (scaling paper sec. 2.2.2). Only the first
``filters`` of those D channels feed the next layer; the rest are auxiliary channels,
and the next layer says so by reading only its first ``c_read`` input channels.

Output gradients and differences may hold only their first c channels, the rest being
zero (``gait_ref.live``): the GEMMs then run on those c columns. With ``read_only``
the backward maps return only the Cr channels the layer reads.
"""
from __future__ import annotations

from ..backend import get_xp, to_device
from ..im2col import ConvGeometry, col2im, im2col, nchw_to_rows, rows_to_nchw
from ..linalg import SquareInverse
from ..pooling import max_pool, unpool
from ..live import leading, widen


class _Windowed:
    """Channel reading and the overlap bookkeeping shared by conv and locally connected."""

    def _setup(self, in_shape, c_read, K, S, padding, name):
        self.in_shape = tuple(in_shape)
        C, H, W = self.in_shape
        self.c_read = C if c_read is None else int(c_read)
        if not 0 < self.c_read <= C:
            raise ValueError(f"{name}: reads {self.c_read} of {C} input channels")
        self.geom = ConvGeometry(self.c_read, H, W, int(K), int(S), padding)
        self.name = name
        self._overlap = self.geom.window_count() - 1                 # (H, W) numpy: R - 1
        self._overlap_on = {}                                        # backend -> array

    def _read(self, x):
        return x[:, :self.c_read]                                    # (N, Cr, H, W)

    def _embed(self, x_read, fill):
        """Full (N, C, H, W) from the read channels; unread channels from ``fill`` (or 0).
        Built channels-last, like every activation (see ``gait_ref.im2col``)."""
        xp = get_xp(x_read)
        C = self.in_shape[0]
        if self.c_read == C:
            return x_read
        N, Cr, H, W = x_read.shape
        out = xp.empty((N, H, W, C), dtype=x_read.dtype)                # (N, H, W, C)
        out[..., :Cr] = x_read.transpose(0, 2, 3, 1)
        if fill is None:
            out[..., Cr:] = 0
        else:
            out[..., Cr:] = fill[:, Cr:].transpose(0, 2, 3, 1)
        return out.transpose(0, 3, 1, 2)                                 # (N, C, H, W) view

    def _out(self, x_read, read_only):
        """A backward map's result: the Cr channels read, or all C (zero on unread ones)."""
        return x_read if read_only else self._embed(x_read, None)

    def _overlap_correction(self, x_read):
        """(R - 1) * x: the forward input reconstructed once too often by col2im."""
        xp = get_xp(x_read)
        key = (xp.__name__, x_read.dtype.str)
        if key not in self._overlap_on:
            self._overlap_on[key] = to_device(self._overlap.astype(x_read.dtype), xp)
        return self._overlap_on[key] * x_read                        # (N, Cr, H, W)


class Conv2D(_Windowed):
    kind = "conv"

    def __init__(self, in_shape, K: int, S: int, n_out: int | None = None,
                 c_read: int | None = None, padding: str = "same", name: str = "conv"):
        self._setup(in_shape, c_read, K, S, padding, name)
        g = self.geom
        self.n_out = g.D if n_out is None else int(n_out)           # default: square
        self.out_shape = (self.n_out, g.Ho, g.Wo)
        self.params = {}  # 'W' : (D, O), 'b' : (O,)

    @property
    def weight_shape(self):
        return (self.geom.D, self.n_out)

    @property
    def square(self) -> bool:
        return self.geom.D == self.n_out

    def forward(self, x, width: int | None = None):
        """x : (N, C, H, W) -> h : (N, O, Ho, Wo), cache with the im2col columns; with
        ``width``, only the first ``width`` output channels (``gait_ref.live``)."""
        g = self.geom
        cols = im2col(self._read(x), g)                              # (M, D)
        hm = cols @ leading(self.params["W"], width) + leading(self.params["b"], width)   # (M, O)
        return rows_to_nchw(hm, x.shape[0], g.Ho, g.Wo), {"x": x, "cols": cols}

    def input_grad(self, gh, cache, W=None, read_only=False):
        """dL/dx: the transposed convolution of gh; W may be a feedback kernel (FA). New array."""
        return self.linear_transpose(gh, self.params["W"] if W is None else W, read_only)

    def linear_transpose(self, a, V, read_only=False):
        """The transposed convolution col2im(a V^T) for any (D, O) kernel V: the structure
        of W^T with V's values. a : (N, c, Ho, Wo), the first c of the O channels (the rest
        zero) -> (N, C, H, W), zero on unread channels (or only the Cr read)."""
        gcols = nchw_to_rows(a) @ leading(V, a.shape[1]).T          # (M, D)
        return self._out(col2im(gcols, self.geom, a.shape[0]), read_only)

    def transpose_weight_grad(self, a, gx):
        """d<gx, linear_transpose(a, V)>/dV = im2col(gx)^T a: (D, O)."""
        return im2col(self._read(gx), self.geom).T @ nchw_to_rows(a)

    def param_grads(self, gh, cache):
        """{'W': cols^T gh, 'b': gh summed}: gh : (N, c, Ho, Wo), the first c of the O
        channels (the rest zero, and so are their columns of the gradient)."""
        ghm = nchw_to_rows(gh)                                       # (M, c)
        return {"W": widen(cache["cols"].T @ ghm, self.n_out), "b": widen(ghm.sum(axis=0), self.n_out)}

    def inverse_operator(self):
        return SquareInverse(self.params["W"])

    def inverse(self, h, cache, op):
        """The exact inverse of a square convolution (scaling paper sec. 2.2.2, App. C).

        Every window's patch is recovered exactly, p = (h - b) W^-1; col2im then sums
        each pixel R times (R = number of windows covering it), so the forward input
        is subtracted R - 1 times:

            x = convT(h - b, (W^-1)^T) - (R - 1) * x_forward

        For h = conv(x_fwd) + b + delta this is x_fwd + convT(delta, (W^-1)^T): the
        error from every overlapping window is kept. Pixels covered by no window
        (R = 0) come back as x_forward. Unread channels come from the forward input.
        """
        x_read = self._read(cache["x"])
        patches = op.right_solve(nchw_to_rows(h) - self.params["b"])  # (M, D)
        x_rec = col2im(patches, self.geom, h.shape[0]) - self._overlap_correction(x_read)
        return self._embed(x_rec, cache["x"])

    def inverse_delta(self, dh, cache, op, read_only=False):
        """The linear part of the inverse: convT(dh, (W^-1)^T), zero on unread channels (or
        only the Cr read). dh : (N, c, Ho, Wo), the first c channels (the rest zero)."""
        patches = op.right_solve(nchw_to_rows(dh))                    # (M, D) from (M, c)
        return self._out(col2im(patches, self.geom, dh.shape[0]), read_only)


class ConvPool2D(Conv2D):
    """A convolution followed by 2x2 max-pooling (stride 2): h = maxpool(conv(x) + b).

    With a non-decreasing activation f, maxpool(f(h)) = f(maxpool(h)) with the same
    indices, so this layer with activation f is exactly the conv -> f -> maxpool block of
    Ernoult et al.'s SimpleVGG. The pooling mask goes in the cache; every backward map
    (BP, FA, the learned feedback) first unpools with it (``gait_ref.pooling``). Not
    square, so it has no exact inverse.
    """

    kind = "convpool"

    def __init__(self, in_shape, K: int, S: int, n_out: int, padding: str = "same", name: str = "convpool"):
        super().__init__(in_shape, K, S, n_out=n_out, padding=padding, name=name)
        g = self.geom
        if g.Ho < 2 or g.Wo < 2:
            raise ValueError(f"{name}: a {g.Ho}x{g.Wo} conv output is too small to max-pool 2x2")
        self.conv_hw = (g.Ho, g.Wo)
        self.out_shape = (self.n_out, g.Ho // 2, g.Wo // 2)

    @property
    def square(self) -> bool:
        return False

    def forward(self, x, width: int | None = None):
        hc, cache = super().forward(x, width)
        h, cache["pool_mask"] = max_pool(hc)
        return h, cache

    def unpool(self, u, cache):
        """(N, c, Ho/2, Wo/2) -> (N, c, Ho, Wo): u at the forward maxima, zero elsewhere
        (c: the first c of the O channels)."""
        return unpool(u, cache["pool_mask"][:, :u.shape[1]], self.conv_hw)

    def input_grad(self, gh, cache, W=None, read_only=False):
        return super().input_grad(self.unpool(gh, cache), cache, W, read_only)

    def param_grads(self, gh, cache):
        return super().param_grads(self.unpool(gh, cache), cache)

    def inverse_operator(self):
        raise ValueError(f"layer {self.name} max-pools, so it has no exact inverse")
