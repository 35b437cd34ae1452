import numpy as np
import scipy.signal
from hypothesis import given
from hypothesis import strategies as st

from gait_ref.backend import to_device
from gait_ref.im2col import ConvGeometry, col2im, im2col, same_padding
from gait_ref.init import init_layer
from gait_ref.layers import Conv2D

from .conftest import asnumpy


@st.composite
def geometries(draw):
    K = draw(st.integers(1, 5))
    S = draw(st.integers(1, 4))
    padding = draw(st.sampled_from(["same", "valid"]))
    lo = K if padding == "valid" else 1
    H = draw(st.integers(lo, 11))
    W = draw(st.integers(lo, 11))
    C = draw(st.integers(1, 3))
    return ConvGeometry(C, H, W, K, S, padding)


def test_same_padding_matches_tensorflow():
    # TF: out = ceil(n / s), pad_total = max((out - 1) s + k - n, 0), extra after
    assert same_padding(7, 3, 2) == (4, 1, 1)
    assert same_padding(8, 3, 2) == (4, 0, 1)
    assert same_padding(224, 9, 4) == (56, 2, 3)
    assert same_padding(5, 1, 3) == (2, 0, 0)


@given(g=geometries(), N=st.integers(1, 3), seed=st.integers(0, 1000))
def test_im2col_col2im_adjoint(xp, g, N, seed):
    """<im2col(x), c> == <x, col2im(c)> for any geometry."""
    rng = np.random.default_rng(seed)
    x = xp.asarray(rng.standard_normal((N, g.C, g.H, g.W)))
    c = xp.asarray(rng.standard_normal((N * g.Ho * g.Wo, g.D)))
    lhs = float((im2col(x, g) * c).sum())
    rhs = float((x * col2im(c, g, N)).sum())
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + float(xp.abs(c).sum()) + 1)


@given(g=geometries())
def test_window_count_matches_col2im_of_ones(g):
    """R (analytic) == col2im(ones): the number of windows covering each pixel."""
    ones = np.ones((g.Ho * g.Wo, g.D))
    np.testing.assert_array_equal(g.window_count(), col2im(ones, g, 1)[0, 0])


def _naive_conv(x, Wk, b, g):
    """Direct loops. x : (N, C, H, W), Wk : (K, K, C, O)."""
    t, bo, l, r = g.pads
    xp_ = np.pad(x, ((0, 0), (0, 0), (t, bo), (l, r)))
    N, O = x.shape[0], Wk.shape[-1]
    out = np.zeros((N, O, g.Ho, g.Wo))
    for n in range(N):
        for o in range(O):
            for i in range(g.Ho):
                for j in range(g.Wo):
                    patch = xp_[n, :, i * g.S:i * g.S + g.K, j * g.S:j * g.S + g.K]  # (C, K, K)
                    out[n, o, i, j] = (patch * Wk[:, :, :, o].transpose(2, 0, 1)).sum() + b[o]
    return out


@given(g=geometries(), O=st.integers(1, 4), seed=st.integers(0, 1000))
def test_conv_forward_equals_naive_loop_and_scipy(xp, g, O, seed):
    rng = np.random.default_rng(seed)
    layer = Conv2D((g.C, g.H, g.W), g.K, g.S, n_out=O, padding=g.padding)
    init_layer(layer, rng, "normal", xp, np.float64)
    layer.params["b"] = xp.asarray(rng.standard_normal(O))
    x = rng.standard_normal((2, g.C, g.H, g.W))
    h, _ = layer.forward(to_device(x, xp))
    h = asnumpy(h)
    Wk = asnumpy(layer.params["W"]).reshape(g.K, g.K, g.C, O)
    b = asnumpy(layer.params["b"])
    np.testing.assert_allclose(h, _naive_conv(x, Wk, b, g), rtol=1e-12, atol=1e-12)
    # scipy: cross-correlation of the padded input, 'valid', subsampled by the stride
    t, bo, l, r = g.pads
    xpad = np.pad(x, ((0, 0), (0, 0), (t, bo), (l, r)))
    for n in range(2):
        for o in range(O):
            full = sum(scipy.signal.correlate(xpad[n, c], Wk[:, :, c, o], mode="valid") for c in range(g.C))
            np.testing.assert_allclose(h[n, o], full[::g.S, ::g.S][:g.Ho, :g.Wo] + b[o], rtol=1e-12, atol=1e-12)


def _naive_conv_transpose(gh, Wk, g):
    """The adjoint of _naive_conv's linear part, by scattering each output back."""
    t, bo, l, r = g.pads
    N = gh.shape[0]
    gx = np.zeros((N, g.C, g.H + t + bo, g.W + l + r))
    for n in range(N):
        for i in range(g.Ho):
            for j in range(g.Wo):
                for o in range(Wk.shape[-1]):
                    gx[n, :, i * g.S:i * g.S + g.K, j * g.S:j * g.S + g.K] += \
                        gh[n, o, i, j] * Wk[:, :, :, o].transpose(2, 0, 1)
    return gx[:, :, t:t + g.H, l:l + g.W]


@given(g=geometries(), O=st.integers(1, 3), seed=st.integers(0, 1000))
def test_transposed_conv_equals_naive_adjoint(xp, g, O, seed):
    rng = np.random.default_rng(seed)
    layer = Conv2D((g.C, g.H, g.W), g.K, g.S, n_out=O, padding=g.padding)
    init_layer(layer, rng, "normal", xp, np.float64)
    x = to_device(rng.standard_normal((2, g.C, g.H, g.W)), xp)
    _, cache = layer.forward(x)
    gh = rng.standard_normal((2, O, g.Ho, g.Wo))
    gx = asnumpy(layer.input_grad(to_device(gh, xp), cache))
    Wk = asnumpy(layer.params["W"]).reshape(g.K, g.K, g.C, O)
    np.testing.assert_allclose(gx, _naive_conv_transpose(gh, Wk, g), rtol=1e-12, atol=1e-12)
