"""Every layer: finite-difference gradients, exact inversion, the overlap identity."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gait_ref.backend import to_device
from gait_ref.init import init_layer
from gait_ref.layers import Conv2D, ConvPool2D, Dense, LocallyConnected2D

from .conftest import asnumpy
from .helpers import init_well_conditioned, rand


def _fd_check(layer, xp, rng, N=3):
    """Central differences along random directions for input, W and b (float64)."""
    init_well_conditioned(layer, rng, xp)
    x = rand(rng, (N,) + layer.in_shape, xp)
    h, cache = layer.forward(x)
    R = rand(rng, h.shape, xp)                       # loss = <h, R>, so dL/dh = R

    def loss(x_, params=None):
        saved = dict(layer.params)
        if params:
            layer.params.update(params)
        out = float((layer.forward(x_)[0] * R).sum())
        layer.params = saved
        return out

    e = 1e-6
    v = rand(rng, x.shape, xp)
    fd = (loss(x + e * v) - loss(x - e * v)) / (2 * e)
    an = float((layer.input_grad(R, cache) * v).sum())
    assert abs(fd - an) <= 1e-6 * (abs(an) + 1)
    grads = layer.param_grads(R, cache)
    for name in ("W", "b"):
        p = layer.params[name]
        v = rand(rng, p.shape, xp)
        fd = (loss(x, {name: p + e * v}) - loss(x, {name: p - e * v})) / (2 * e)
        an = float((grads[name] * v).sum())
        assert abs(fd - an) <= 1e-6 * (abs(an) + 1), name


@st.composite
def square_convs(draw, local=False):
    """Square windowed layers: overlapping or not, both paddings, strides 1-4, aux channels."""
    K = draw(st.integers(1, 4))
    S = draw(st.integers(1, 4))
    padding = draw(st.sampled_from(["same", "valid"]))
    C = draw(st.integers(1, 3))
    aux = draw(st.integers(0, 2))
    lo = K if padding == "valid" else 1
    H = draw(st.integers(lo, 9 if not local else 7))
    W = draw(st.integers(lo, 9 if not local else 7))
    cls = LocallyConnected2D if local else Conv2D
    return cls((C + aux, H, W), K, S, c_read=C, padding=padding)


@given(layer=st.one_of(square_convs(), square_convs(local=True),
                       st.builds(lambda n, a: Dense((n + a,), n, n_read=n), st.integers(1, 12), st.integers(0, 4))),
       seed=st.integers(0, 1000))
def test_finite_difference_gradients(xp, layer, seed):
    _fd_check(layer, xp, np.random.default_rng(seed))


def test_finite_difference_nonsquare_layers(xp):
    rng = np.random.default_rng(5)
    for layer in (Dense((3, 4, 4), 7), Conv2D((3, 10, 9), 5, 3, n_out=4), LocallyConnected2D((2, 6, 6), 3, 2, n_out=3),
                  ConvPool2D((2, 7, 6), 3, 1, n_out=3), ConvPool2D((3, 9, 9), 3, 2, n_out=2, padding="valid")):
        _fd_check(layer, xp, rng)


def _rel(a, b):
    return float(np.abs(asnumpy(a) - asnumpy(b)).max() / max(np.abs(asnumpy(b)).max(), 1e-300))


@given(layer=st.one_of(square_convs(), square_convs(local=True),
                       st.builds(lambda n, a: Dense((n + a,), n, n_read=n), st.integers(1, 40), st.integers(0, 5))),
       seed=st.integers(0, 1000))
def test_exact_inversion(xp, layer, seed):
    """inverse(forward(x)) == x to float64 rounding: relative error < 1e-10."""
    rng = np.random.default_rng(seed)
    init_well_conditioned(layer, rng, xp)
    x = rand(rng, (3,) + layer.in_shape, xp)
    h, cache = layer.forward(x)
    x_rec = layer.inverse(h, cache, layer.inverse_operator())
    assert x_rec.shape == x.shape
    assert _rel(x_rec, x) < 1e-10


@given(layer=st.one_of(square_convs(), square_convs(local=True)), seed=st.integers(0, 1000))
def test_overlap_corrected_inverse_identity(xp, layer, seed):
    """inverse(forward(x) + delta) == x + convT(delta, (W^-1)^T): the scaling paper's identity.

    The oracle inverts W with numpy.linalg.inv and runs the ordinary transposed
    convolution with it, independent of the layer's factorisation and correction."""
    rng = np.random.default_rng(seed)
    init_well_conditioned(layer, rng, xp)
    x = rand(rng, (2,) + layer.in_shape, xp)
    h, cache = layer.forward(x)
    delta = rand(rng, h.shape, xp)
    op = layer.inverse_operator()
    got = layer.inverse(h + delta, cache, op)
    W_inv_T = to_device(np.swapaxes(np.linalg.inv(asnumpy(layer.params["W"])), -1, -2), xp)
    expect = x + layer.input_grad(delta, cache, W=W_inv_T)
    assert _rel(got, expect) < 1e-10
    # and the difference form's linear part is exactly that transposed convolution
    assert _rel(layer.inverse_delta(delta, cache, op), expect - x) < 1e-10


def test_uncovered_pixels_keep_forward_value(xp):
    """Stride > kernel leaves pixels in no window: their reconstruction is the forward value."""
    rng = np.random.default_rng(0)
    layer = Conv2D((2, 9, 9), 2, 4, padding="valid")
    assert (layer.geom.window_count() == 0).any()
    init_well_conditioned(layer, rng, xp)
    x = rand(rng, (2, 2, 9, 9), xp)
    h, cache = layer.forward(x)
    x_rec = layer.inverse(h + rand(rng, h.shape, xp), cache, layer.inverse_operator())
    mask = layer.geom.window_count() == 0
    np.testing.assert_array_equal(asnumpy(x_rec)[:, :, mask], asnumpy(x)[:, :, mask])


def test_inverse_is_not_a_transpose(xp):
    """With non-orthogonal W, the transpose does not invert; the inverse does."""
    rng = np.random.default_rng(1)
    layer = Dense((8,), 8)
    init_well_conditioned(layer, rng, xp, skew=0.5)
    x = rand(rng, (4, 8), xp)
    h, cache = layer.forward(x)
    assert _rel(layer.inverse(h, cache, layer.inverse_operator()), x) < 1e-12
    assert _rel((h - layer.params["b"]) @ layer.params["W"].T, x) > 1e-2


def test_square_requirements_and_errors():
    with pytest.raises(ValueError, match="reads 9 of 8"):
        Dense((8,), 8, n_read=9)
    with pytest.raises(ValueError, match="square"):
        init = Dense((8,), 4)
        init_layer(init, np.random.default_rng(0), "orthogonal", np, np.float64)
        init.inverse_operator()
    with pytest.raises(ValueError, match="VALID convolution needs"):
        Conv2D((1, 2, 2), 3, 1, padding="valid").out_shape
