"""Arrays that hold only a layer's first c output channels: the rest are exactly zero.

A square layer's auxiliary channels (units) are never read by the layer above, so every
gradient and target difference on them is zero: BP's delta, GAIT-prop's d, and the
right-hand sides of the solves. The layers' backward maps accept such arrays with only
their first c channels along axis 1 (units for a dense layer) and run their GEMMs on
those c columns: on conv7 at 64 px, 24 of conv2's 216 channels are read, 48 of conv3's
600, 96 of conv5's 432. Their results are the same as with the zeros written out, up to
the order in which a GEMM adds its terms.

Nothing reads the auxiliary channels' forward values either, except the absolute form's
inverse (``Network.invert_layer``): the rules that read only live channels
(``takes_narrow_output_grad``) get a forward pass that computes only those
(``Network.read_widths``): on conv7 at 64 px, 1.6 of the full forward's 6.9 GFLOP
(batch 64), on the deep MLP 3.1 of 3.6.
"""
from __future__ import annotations

from .backend import get_xp
from .kernels import RawKernel


def leading(V, c: int | None):
    """The columns (last axis) of a (.., D, O) weight matrix (or an (.., O) bias) that meet
    c live channels (None: all of them)."""
    return V if c is None or c == V.shape[-1] else V[..., :c]


def widen(g, n: int):
    """(.., c) -> (.., n): g in the first c entries of the last axis, zeros after (g itself
    when c = n)."""
    c = g.shape[-1]
    if c == n:
        return g
    if c > n:
        raise ValueError(f"an array with {c} channels for a layer with {n}")
    out = get_xp(g).empty(g.shape[:-1] + (n,), dtype=g.dtype)
    if g.flags.c_contiguous:
        return _WIDEN(g, c, n, out)                      # one kernel on a GPU (a memset and a copy before)
    return _widen_host(g, c, n, out)


def _widen_host(g, c, n, out):
    out[..., c:] = 0
    out[..., :c] = g
    return out


_WIDEN = RawKernel("raw T g, int64 c, int64 n", "T out",
                   "long long col = i % n; out = col < c ? g[(i / n) * c + col] : (T)0;", "gait_ref_widen", _widen_host)
