"""Convolution geometry, im2col and its exact adjoint col2im.

Legend
    N  batch          C  input channels        H, W   input height, width
    K  kernel size    S  stride                Ho, Wo output height, width
    D  = K * K * C, the length of one patch (one row of the column matrix)

Column layout: ``cols[n * Ho * Wo + oy * Wo + ox, (ky * K + kx) * C + c]`` is
``x_padded[n, c, oy * S + ky, ox * S + kx]``. A kernel is therefore a (D, C_out)
matrix whose rows run over (ky, kx, c), TensorFlow's [K, K, C_in, C_out] order.

im2col copies one strided window view of the padded input; col2im, its adjoint, is
written as K*K ``+=`` over strided slices, each clipped to the image (Chainer's
``utils/conv.py`` pattern, without its padded buffer): no ``add.at``, deterministic, and
identical on numpy and cupy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import get_xp
from .kernels import RawKernel


def same_padding(size: int, k: int, s: int) -> tuple[int, int, int]:
    """TensorFlow 'SAME': out = ceil(size / s); the odd extra pad goes after.

    Returns (out, pad_before, pad_after).
    """
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2, total - total // 2


def valid_padding(size: int, k: int, s: int) -> tuple[int, int, int]:
    if size < k:
        raise ValueError(f"VALID convolution needs input size >= kernel size, got {size} < {k}")
    return (size - k) // s + 1, 0, 0


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a 2-D window layout that does not depend on the data."""

    C: int
    H: int
    W: int
    K: int
    S: int
    padding: str = "same"

    def __post_init__(self):
        if self.padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {self.padding!r}")
        if min(self.C, self.H, self.W, self.K, self.S) < 1:
            raise ValueError(f"invalid conv geometry {self}")

    def _axis(self, size):
        return (same_padding if self.padding == "same" else valid_padding)(size, self.K, self.S)

    @property
    def Ho(self) -> int:
        return self._axis(self.H)[0]

    @property
    def Wo(self) -> int:
        return self._axis(self.W)[0]

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right)."""
        _, t, b = self._axis(self.H)
        _, l, r = self._axis(self.W)
        return t, b, l, r

    @property
    def D(self) -> int:
        return self.K * self.K * self.C

    def window_count(self) -> np.ndarray:
        """R[y, x]: how many windows cover input pixel (y, x), as a (H, W) numpy int array.

        Per axis, window o covers input rows [o*S - pad_before, o*S - pad_before + K - 1];
        R is the outer product of the two per-axis counts. Computed from the geometry
        alone (scaling paper sec. 2.2.2 obtains it numerically; here it is exact).
        """
        t, _, l, _ = self.pads

        def count(size, n_out, pad_before):
            i = np.arange(size)[:, None]                      # (size, 1)
            start = np.arange(n_out)[None, :] * self.S - pad_before  # (1, n_out)
            return ((i >= start) & (i < start + self.K)).sum(axis=1)  # (size,)

        return np.outer(count(self.H, self.Ho, t), count(self.W, self.Wo, l))


def _padded_channels_last(x, g: ConvGeometry):
    """x : (N, C, H, W) -> (N, H + t + b, W + l + r, C): channels last, zero borders, one copy
    (none without padding where x already has channels-last memory). Two launches on a GPU
    (a memset and the copy; zeroing the four borders apart was four more), and on the host
    ``zeros`` is a calloc whose pages the copy touches anyway."""
    xp = get_xp(x)
    t, b, l, r = g.pads
    if not (t or b or l or r):
        return xp.ascontiguousarray(x.transpose(0, 2, 3, 1))
    N = x.shape[0]
    xt = xp.zeros((N, g.H + t + b, g.W + l + r, g.C), dtype=x.dtype)
    xt[:, t:t + g.H, l:l + g.W] = x.transpose(0, 2, 3, 1)
    return xt


def windows(x, g: ConvGeometry):
    """x : (N, C, H, W) -> its (N, Ho, Wo, K, K, C) windows: a strided view (no copy) of the
    padded input, channels last. Copied, this is the column matrix."""
    xt = _padded_channels_last(x, g)                               # (N, H+t+b, W+l+r, C)
    sN, sH, sW, sC = xt.strides
    return get_xp(x).lib.stride_tricks.as_strided(
        xt, shape=(x.shape[0], g.Ho, g.Wo, g.K, g.K, g.C), strides=(sN, g.S * sH, g.S * sW, sH, sW, sC))


def im2col(x, g: ConvGeometry):
    """x : (N, C, H, W) -> cols : (N * Ho * Wo, D). A new array.

    The windows view is copied once into the column matrix: one pass over memory instead
    of K * K slice copies (which for C = 3 move 3 floats at a time).
    """
    return get_xp(x).ascontiguousarray(windows(x, g)).reshape(x.shape[0] * g.Ho * g.Wo, g.D)   # (N*Ho*Wo, D)


def _reach(k: int, size: int, n_out: int, S: int, pad: int) -> tuple[int, int, int]:
    """Along one axis, the output positions o whose kernel tap k reads an input pixel (not
    padding): 0 <= o S + k - pad < size. Returns (first o, how many, the first one's pixel)."""
    first = max(0, -((k - pad) // S))                               # ceil((pad - k) / S)
    last = min(n_out - 1, (size - 1 + pad - k) // S)
    return first, last - first + 1, first * S + k - pad


def col2im(cols, g: ConvGeometry, N: int):
    """The exact adjoint of im2col: cols : (N * Ho * Wo, D) -> x : (N, C, H, W).

    Each patch entry is summed back onto the pixel it was read from; entries read from the
    padding are dropped. A new array, NCHW-shaped with channels-last memory (as
    ``rows_to_nchw``), so the next GEMM reads it without a copy. One kernel on a GPU
    (``_COL2IM``: each pixel gathers its taps), K * K slice additions on the host
    (``_col2im_taps``); both add a pixel's taps in the same order, from zero.
    """
    xp = get_xp(cols)
    t, _, l, _ = g.pads
    xt = xp.empty((N, g.H, g.W, g.C), dtype=cols.dtype)
    _COL2IM(cols, g.H, g.W, g.C, g.Ho, g.Wo, g.K, g.S, t, l, xt)
    return xt.transpose(0, 3, 1, 2)                                # (N, C, H, W), channels-last memory


def _col2im_taps(cols, H, W, C, Ho, Wo, K, S, t, l, xt):
    """col2im on the host, into ``xt`` (N, H, W, C): for each tap (ky, kx) in order, the
    slice of output positions whose tap reads an image pixel is added onto those pixels
    (each tap's slice is clipped to the image, so there is no padded buffer to crop)."""
    N = xt.shape[0]
    c6 = cols.reshape(N, Ho, Wo, K, K, C)
    xt[...] = 0
    along_y = [_reach(k, H, Ho, S, t) for k in range(K)]
    along_x = [_reach(k, W, Wo, S, l) for k in range(K)]
    for ky, (oy, ny, y0) in enumerate(along_y):
        for kx, (ox, nx, x0) in enumerate(along_x):
            if ny > 0 and nx > 0:
                xt[:, y0:y0 + (ny - 1) * S + 1:S, x0:x0 + (nx - 1) * S + 1:S] += c6[:, oy:oy + ny, ox:ox + nx, ky, kx]
    return xt


# The gather form of col2im: output pixel (n, y, x, c) adds, for each tap (ky, kx) in order,
# the column entry of the output position (oy, ox) = ((y + t - ky) / S, (x + l - kx) / S)
# that read it, where that division is exact and the position exists.
_COL2IM = RawKernel(
    "raw T cols, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 K, int32 S, int32 t, int32 l", "T xt",
    """
    long long c = i % C, r = i / C;
    long long x = r % W;  r /= W;
    long long y = r % H, n = r / H;
    T acc = 0;
    for (int ky = 0; ky < K; ky++) {
        long long yy = y + t - ky;
        if (yy < 0 || yy % S != 0 || yy / S >= Ho) continue;
        for (int kx = 0; kx < K; kx++) {
            long long xx = x + l - kx;
            if (xx < 0 || xx % S != 0 || xx / S >= Wo) continue;
            acc += cols[(((n * Ho + yy / S) * Wo + xx / S) * K + ky) * K * C + kx * C + c];
        }
    }
    xt = acc;
    """, "gait_ref_col2im", _col2im_taps)


def rows_to_nchw(m, N: int, Ho: int, Wo: int):
    """(N * Ho * Wo, C) GEMM output -> (N, C, Ho, Wo), as a transposed view (no copy).

    The result is NCHW-shaped with channels-last memory; elementwise operations keep
    that memory order, so the next layer's im2col and nchw_to_rows find it contiguous
    and copy nothing."""
    return m.reshape(N, Ho, Wo, -1).transpose(0, 3, 1, 2)


def nchw_to_rows(h):
    """(N, C, Ho, Wo) -> (N * Ho * Wo, C), the GEMM layout (a copy only when needed)."""
    xp = get_xp(h)
    N, C, Ho, Wo = h.shape
    return xp.ascontiguousarray(h.transpose(0, 2, 3, 1)).reshape(N * Ho * Wo, C)
