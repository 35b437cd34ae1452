"""Learned feedback layers: gradients, Jacobian-vector products, the transpose structure,
and the Jacobian-matching metric, for dense, conv, conv-pool and locally connected layers."""
import numpy as np
import pytest

from gait_ref.activations import ELU, Identity, Tanh
from gait_ref.feedback import Feedback, jacobian_matching_error
from gait_ref.init import init_layer
from gait_ref.layers import Conv2D, ConvPool2D, Dense, LocallyConnected2D

from .conftest import asnumpy
from .helpers import rand

LAYERS = {
    "dense": lambda: Dense((2, 3, 3), 5, name="d"),
    "conv": lambda: Conv2D((2, 5, 5), 3, 2, n_out=3, name="c"),
    "conv-valid": lambda: Conv2D((2, 6, 5), 3, 1, n_out=2, padding="valid", name="cv"),
    "convpool": lambda: ConvPool2D((2, 5, 6), 3, 1, n_out=3, name="cp"),
    "local": lambda: LocallyConnected2D((2, 5, 5), 3, 2, n_out=3, name="lc"),
}
FORMS = {"bartunov": dict(s_out=Tanh()), "ernoult": dict(s_in=ELU()), "linear": {}}


def make(kind, form, xp, seed=0):
    rng = np.random.default_rng(seed)
    layer = LAYERS[kind]()
    init_layer(layer, rng, "glorot", xp, np.float64)
    layer.params["b"] = rand(rng, layer.params["b"].shape, xp) * 0.1
    fb = Feedback(layer, **FORMS[form])
    fb.init(rng, xp, np.float64)
    fb.params["c"] = rand(rng, fb.params["c"].shape, xp) * 0.1
    x = rand(rng, (4,) + layer.in_shape, xp)
    h, fcache = layer.forward(x)
    return rng, layer, fb, x, h, fcache


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", LAYERS)
def test_feedback_param_grads_and_jvp_against_finite_differences(xp, kind, form):
    rng, layer, fb, x, h, fcache = make(kind, form, xp)
    u = h + 0.3 * rand(rng, h.shape, xp)
    r, gcache = fb.forward(u, fcache)
    assert r.shape == x.shape
    g_r = rand(rng, r.shape, xp)
    loss = lambda: float((fb.forward(u, fcache)[0] * g_r).sum())
    grads = fb.param_grads(gcache, g_r)
    eps = 1e-6
    for k in ("V", "c"):
        p = fb.params[k]
        assert grads[k].shape == p.shape
        v = rand(rng, p.shape, xp)
        fb.params[k] = p + eps * v
        up = loss()
        fb.params[k] = p - eps * v
        down = loss()
        fb.params[k] = p
        an = float((grads[k] * v).sum())
        assert abs((up - down) / (2 * eps) - an) <= 1e-6 * (abs(an) + 1), (k, an, (up - down) / (2 * eps))
    du = rand(rng, u.shape, xp)
    fd = (fb.forward(u + eps * du, fcache)[0] - fb.forward(u - eps * du, fcache)[0]) / (2 * eps)
    np.testing.assert_allclose(asnumpy(fb.jvp(du, gcache, fcache)), asnumpy(fd), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", LAYERS)
def test_feedback_has_the_transpose_structure(xp, kind):
    """With V = W and no activations, g is the adjoint of the forward linear map (through
    the same pooling indices): <g(u) - c, dx> = <u, J_f dx> for all u, dx."""
    rng, layer, fb, x, h, fcache = make(kind, "linear", xp)
    fb.params["V"] = layer.params["W"].copy()
    fb.params["c"] = fb.params["c"] * 0
    u = rand(rng, h.shape, xp)
    dx = rand(rng, x.shape, xp)
    eps = 1e-6
    Jdx = (layer.forward(x + eps * dx)[0] - layer.forward(x - eps * dx)[0]) / (2 * eps)
    lhs = float((fb.forward(u, fcache)[0] * dx).sum())
    np.testing.assert_allclose(lhs, float((u * Jdx).sum()), rtol=1e-7)


def fd_jacobian(fn, a, eps=1e-6):
    """The (a.size, fn(a).size) matrix d fn / d a by central differences, row i for unit i."""
    rows = []
    for i in range(a.size):
        d = a.reshape(-1) * 0
        d[i] = eps
        d = d.reshape(a.shape)
        rows.append((asnumpy(fn(a + d)) - asnumpy(fn(a - d))).ravel() / (2 * eps))
    return np.stack(rows)


def explicit_jacobians(layer, f, fb, x1):
    """Dense J_f (n_in, n_out) and J_g (n_out, n_in) at one sample by central differences."""
    h, fcache = layer.forward(x1)
    Jf = fd_jacobian(lambda x_: f.f(layer.forward(x_)[0]), x1)
    Jg = fd_jacobian(lambda u: fb.forward(u, fcache)[0], f.f(h))
    return Jf, Jg


@pytest.mark.parametrize("kind", LAYERS)
def test_jacobian_matching_error_against_explicit_matrices(xp, kind):
    rng, layer, fb, x, h, fcache = make(kind, "bartunov", xp)
    f = Tanh()
    want = []
    for n in range(3):
        Jf, Jg = explicit_jacobians(layer, f, fb, x[n:n + 1])
        want.append(np.linalg.norm(Jg - Jf.T) / np.linalg.norm(Jf))
    got = jacobian_matching_error(layer, f, fb, x, n_samples=3)
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-6)
    # the Gaussian-probe estimate is unbiased: with many probes it is close to the exact value
    est = jacobian_matching_error(layer, f, fb, x, n_samples=3, max_exact=0, n_probes=4000)
    np.testing.assert_allclose(est, np.mean(want), rtol=0.1)


@pytest.mark.parametrize("kind", LAYERS)
def test_jacobian_matching_error_is_zero_at_the_transpose(xp, kind):
    """Identity activations and V = W: J_g = J_f^T exactly."""
    rng, layer, fb, x, h, fcache = make(kind, "linear", xp)
    fb.params["V"] = layer.params["W"].copy()
    assert jacobian_matching_error(layer, Identity(), fb, x) < 1e-12
    fb.params["V"] = layer.params["W"] * 1.5
    np.testing.assert_allclose(jacobian_matching_error(layer, Identity(), fb, x), 0.5, rtol=1e-10)


def test_feedback_rejects_layers_with_auxiliary_units():
    with pytest.raises(ValueError, match="reads only part of its input"):
        Feedback(Dense((6,), 4, n_read=4, name="aux"))
    with pytest.raises(ValueError, match="reads only part of its input"):
        Feedback(Conv2D((4, 5, 5), 3, 1, n_out=2, c_read=2, name="auxc"))
