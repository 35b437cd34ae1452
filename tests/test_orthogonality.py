import numpy as np
import pytest

from gait_ref.activations import LeakyReLU
from gait_ref.init import draw_weights, orthogonal_matrix
from gait_ref.layers import Conv2D, Dense
from gait_ref.network import Network
from gait_ref.orthogonality import add_ortho_grads, ortho_penalty, orthogonality_report

from .conftest import asnumpy


@pytest.mark.parametrize("form", ["full", "offdiag"])
def test_regulariser_gradient_finite_differences(xp, form):
    rng = np.random.default_rng(0)
    W = xp.asarray(rng.standard_normal((6, 6)))
    value, g = ortho_penalty(W, form)
    Wn = asnumpy(W)
    ref = Wn.T @ Wn if form == "offdiag" else Wn @ Wn.T - np.eye(6)
    if form == "offdiag":
        ref = ref * (1 - np.eye(6))
    assert abs(value - (ref ** 2).sum()) < 1e-9
    e = 1e-6
    for _ in range(3):
        V = xp.asarray(rng.standard_normal((6, 6)))
        fd = (ortho_penalty(W + e * V, form)[0] - ortho_penalty(W - e * V, form)[0]) / (2 * e)
        an = float((g * V).sum())
        assert abs(fd - an) <= 1e-6 * (abs(an) + 1)


def test_orthogonal_init_and_report(xp):
    rng = np.random.default_rng(1)
    Q = orthogonal_matrix(rng, 20, 20)
    np.testing.assert_allclose(Q.T @ Q, np.eye(20), atol=1e-12)
    semi = orthogonal_matrix(rng, 20, 7)
    np.testing.assert_allclose(semi.T @ semi, np.eye(7), atol=1e-12)
    conv = Conv2D((2, 5, 5), 3, 1, name="c")                              # D = 18, square
    net = Network([conv, Dense(conv.out_shape, 450, name="d")], [LeakyReLU(), LeakyReLU()])
    net.init(0, "orthogonal", xp, np.float64)
    rep = orthogonality_report(net)
    assert rep["c"]["ortho_error"] < 1e-12 and abs(rep["c"]["cond"] - 1) < 1e-10
    grads = [{"W": xp.zeros_like(l.params["W"]), "b": xp.zeros_like(l.params["b"])} for l in net.layers]
    add_ortho_grads(net, grads, 100.0)
    assert float(xp.abs(grads[0]["W"]).max()) < 1e-10                   # orthogonal: no pull
    conv.params["W"] = conv.params["W"] * 1.1
    assert orthogonality_report(net)["c"]["ortho_error"] > 0.1
    before = grads[0]["W"].copy()
    add_ortho_grads(net, grads, 2.5)
    value, g = ortho_penalty(conv.params["W"])
    assert float(value) > 0.1
    np.testing.assert_allclose(asnumpy(grads[0]["W"] - before), asnumpy(2.5 * g), rtol=1e-12, atol=1e-14)
    assert float(xp.abs(grads[0]["W"]).max()) > 0.1


def test_init_reproducible_and_glorot_bounds():
    a = draw_weights(np.random.default_rng(3), (50, 40), "glorot")
    b = draw_weights(np.random.default_rng(3), (50, 40), "glorot")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() <= np.sqrt(6 / 90)
    n = draw_weights(np.random.default_rng(3), (400, 300), "normal", scale=2.0)
    assert abs(n.std() - 2.0 / 20) < 0.005
    with pytest.raises(ValueError, match="unknown init scheme"):
        draw_weights(np.random.default_rng(0), (2, 2), "he")


def test_the_report_computes_on_the_device_and_reads_two_numbers_per_layer():
    """The report's SVD runs where the weights are: on the emulated device the weights are
    never copied to the host, and one read brings every layer's two numbers, equal to a
    float64 SVD on the host; a layer with non-finite weights is flagged, not an error."""
    from gait_ref import emulation as em
    from gait_ref.backend import get_backend
    xp = get_backend("emulated")
    layers = [Dense((12,), 12, name=f"d{i}") for i in range(3)]
    net = Network(layers, [LeakyReLU()] * 3)
    net.init(0, "orthogonal", xp, np.float64)
    rng = np.random.default_rng(2)
    for layer in layers:
        layer.params["W"] = layer.params["W"] + xp.asarray(0.2 * rng.standard_normal((12, 12)))
    em.reset_counters()
    rep = orthogonality_report(net)
    counts = em.reset_counters()
    assert counts["d2h"] == 1, counts
    for layer in layers[1:]:
        s = np.linalg.svd(asnumpy(layer.params["W"]), compute_uv=False)
        assert rep[layer.name]["cond"] == pytest.approx(s.max() / s.min(), rel=1e-12)
        assert rep[layer.name]["ortho_error"] == pytest.approx(np.sqrt(((s ** 2 - 1) ** 2).sum() / 12), rel=1e-12)
    layers[2].params["W"][3, 3] = np.inf
    bad = orthogonality_report(net)["d2"]
    assert bad["finite"] is False and bad["cond"] == np.inf
