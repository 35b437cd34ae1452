"""2x2 max-pooling and unpooling with the forward indices, against naive loops."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gait_ref.layers import ConvPool2D
from gait_ref.pooling import max_pool, unpool

from .conftest import asnumpy
from .helpers import rand


def naive_pool(h):
    N, C, H, W = h.shape
    out = np.zeros((N, C, H // 2, W // 2))
    arg = np.zeros((N, C, H // 2, W // 2, 2), dtype=int)
    for n in range(N):
        for c in range(C):
            for i in range(H // 2):
                for j in range(W // 2):
                    win = h[n, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                    k = int(np.argmax(win))                      # first maximum, row-major
                    out[n, c, i, j] = win.flat[k]
                    arg[n, c, i, j] = (2 * i + k // 2, 2 * j + k % 2)
    return out, arg


def naive_unpool(u, arg, H, W):
    N, C, Hp, Wp = u.shape
    out = np.zeros((N, C, H, W))
    for n in range(N):
        for c in range(C):
            for i in range(Hp):
                for j in range(Wp):
                    out[n, c, arg[n, c, i, j, 0], arg[n, c, i, j, 1]] = u[n, c, i, j]
    return out


@given(H=st.integers(2, 7), W=st.integers(2, 7), seed=st.integers(0, 1000), ties=st.booleans())
def test_pool_and_unpool_match_naive_loops(xp, H, W, seed, ties):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((2, 3, H, W))
    if ties:                                                     # many exact ties: the first maximum wins
        h = np.round(h)
    pooled, mask = max_pool(xp.asarray(h))
    want, arg = naive_pool(h)
    np.testing.assert_array_equal(asnumpy(pooled), want)
    assert asnumpy(mask).sum(axis=-1).max() == 1 and asnumpy(mask).sum(axis=-1).min() == 1
    u = rng.standard_normal(want.shape)
    np.testing.assert_array_equal(asnumpy(unpool(xp.asarray(u), mask, (H, W))), naive_unpool(u, arg, H, W))


def test_unpool_is_the_adjoint_of_pooling_selection(xp):
    """For a fixed mask, <pool_sel(h), u> = <h, unpool(u)>: unpooling is BP's map through the pool."""
    rng = np.random.default_rng(0)
    h = rand(rng, (2, 3, 7, 6), xp)
    _, mask = max_pool(h)
    v = rand(rng, h.shape, xp)
    u = rand(rng, (2, 3, 3, 3), xp)
    sel = (mask * _windows_of(v, xp)).sum(axis=-1)               # v read at the forward maxima
    np.testing.assert_allclose(float((sel * u).sum()), float((v * unpool(u, mask, (7, 6))).sum()), rtol=1e-12)


def _windows_of(v, xp):
    N, C, H, W = v.shape
    w = v[:, :, :H // 2 * 2, :W // 2 * 2].reshape(N, C, H // 2, 2, W // 2, 2)
    return w.transpose(0, 1, 2, 4, 3, 5).reshape(N, C, H // 2, W // 2, 4)


def test_pooling_errors():
    with pytest.raises(ValueError, match="at least 2x2"):
        max_pool(np.zeros((1, 1, 1, 5)))
    with pytest.raises(ValueError, match="too small to max-pool"):
        ConvPool2D((1, 3, 3), 3, 1, n_out=2, padding="valid", name="tiny")
    layer = ConvPool2D((1, 4, 4), 3, 1, n_out=2, name="cp")
    assert layer.out_shape == (2, 2, 2) and not layer.square
    with pytest.raises(ValueError, match="no exact inverse"):
        layer.inverse_operator()
