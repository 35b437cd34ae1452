"""2x2 max-pooling with stride 2, and its inverse map: unpooling with the forward indices.

Legend: N batch, C channels, H, W the map before pooling, Hp = H // 2, Wp = W // 2.
As in PyTorch's ``MaxPool2d(2, 2)`` (floor mode), a last odd row or column is dropped.

The indices are kept explicitly, as a one-hot mask over each 2x2 window (the first
maximum wins a tie), and travel in the layer's cache. ``unpool`` puts each pooled value
back at its window's maximum and zeros elsewhere. It is the adjoint of the selection
that max-pooling applies for a fixed mask, which makes it two things at once: BP's
backward pass through the pool, and the feedback path's inverse of the pool (Ernoult et
al. 2022). Neither depends on the backend: no scatter, only a mask product.
"""
from __future__ import annotations

from .backend import get_xp


def _windows(h):
    """(N, C, H, W) -> (N, C, Hp, Wp, 4): each 2x2 window's values (row-major)."""
    N, C, H, W = h.shape
    Hp, Wp = H // 2, W // 2
    v = h[:, :, :2 * Hp, :2 * Wp].reshape(N, C, Hp, 2, Wp, 2)
    return v.transpose(0, 1, 2, 4, 3, 5).reshape(N, C, Hp, Wp, 4)


def max_pool(h):
    """h : (N, C, H, W) -> (pooled (N, C, Hp, Wp), mask (N, C, Hp, Wp, 4) bool one-hot)."""
    xp = get_xp(h)
    if h.shape[2] < 2 or h.shape[3] < 2:
        raise ValueError(f"2x2 max-pooling needs a map of at least 2x2, got {h.shape[2]}x{h.shape[3]}")
    win = _windows(h)
    idx = win.argmax(axis=-1)                                        # (N, C, Hp, Wp)
    mask = idx[..., None] == xp.arange(4)
    return xp.take_along_axis(win, idx[..., None], axis=-1)[..., 0], mask


def unpool(u, mask, size):
    """u : (N, C, Hp, Wp) -> (N, C, H, W) with u at each window's forward maximum, zero
    elsewhere (and on a dropped odd row or column). ``size`` = (H, W) before pooling."""
    xp = get_xp(u)
    N, C, Hp, Wp = u.shape
    H, W = size
    v = (mask * u[..., None]).reshape(N, C, Hp, Wp, 2, 2).transpose(0, 1, 2, 4, 3, 5)
    v = v.reshape(N, C, 2 * Hp, 2 * Wp)
    if (H, W) == (2 * Hp, 2 * Wp):
        return v
    out = xp.zeros((N, C, H, W), dtype=u.dtype)
    out[:, :, :2 * Hp, :2 * Wp] = v
    return out
