import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gait_ref.activations import ELU, Identity, LeakyReLU, Tanh
from gait_ref.layers import Conv2D, Dense
from gait_ref.losses import MeanSquaredError, SoftmaxCrossEntropy
from gait_ref.network import Network

from .conftest import asnumpy
from .helpers import init_well_conditioned, rand


def conv_net(act, aux=True):
    c1 = Conv2D((2, 9, 9), 3, 2, n_out=4, name="c1")                      # not square
    c2 = Conv2D(c1.out_shape, 2, 1, name="c2")                             # square, D = 16
    c3 = Conv2D(c2.out_shape, 3, 2, c_read=4 if aux else None, name="c3")  # reads 4 of 16
    out = Dense(c3.out_shape, 30, n_read=30, name="out")
    return Network([c1, c2, c3, out], [act, act, act, Identity()])


def dense_net(act, widths=(7, 7, 7), n_in=9):
    layers, prev = [], (n_in,)
    for i, w in enumerate(widths):
        layers.append(Dense(prev, w, name=f"d{i}"))
        prev = (w,)
    return Network(layers, [act] * (len(widths) - 1) + [Identity()])


@pytest.mark.parametrize("loss_cls", [SoftmaxCrossEntropy, MeanSquaredError])
@pytest.mark.parametrize("make", [lambda: conv_net(Tanh()), lambda: dense_net(ELU())])
def test_backprop_against_finite_differences(xp, make, loss_cls):
    """Every parameter gradient of the explicit backward pass, along random directions."""
    rng = np.random.default_rng(0)
    net = make()
    for layer in net.layers:
        init_well_conditioned(layer, rng, xp)
    x = rand(rng, (3,) + net.in_shape, xp)
    labels = xp.asarray(rng.integers(0, 5, 3))
    loss = loss_cls(5)

    def L():
        return loss.value_and_grad(net.forward(x).output, labels)[0]

    tr = net.forward(x)
    _, gy = loss.value_and_grad(tr.output, labels)
    grads = net.backward(tr, gy)
    e = 1e-6
    for layer, g in zip(net.layers, grads):
        for name in ("W", "b"):
            p = layer.params[name]
            v = rand(rng, p.shape, xp)
            layer.params[name] = p + e * v
            up = L()
            layer.params[name] = p - e * v
            down = L()
            layer.params[name] = p
            an = float((g[name] * v).sum())
            assert abs((up - down) / (2 * e) - an) <= 1e-5 * (abs(an) + 1), (layer.name, name)


def test_losses_ignore_auxiliary_outputs(xp):
    rng = np.random.default_rng(2)
    y = rand(rng, (4, 12), xp)
    labels = xp.asarray([0, 3, 2, 1])
    for loss in (SoftmaxCrossEntropy(4), MeanSquaredError(4)):
        _, gy = loss.value_and_grad(y, labels)
        assert float(xp.abs(gy[:, 4:]).max()) == 0.0
    # cross-entropy value against a direct formula
    z = asnumpy(y)[:, :4]
    ref = -(z[np.arange(4), [0, 3, 2, 1]] - np.log(np.exp(z).sum(1))).sum()
    assert abs(SoftmaxCrossEntropy(4).value_and_grad(y, labels)[0] - ref) < 1e-12
    assert abs(SoftmaxCrossEntropy(4, "mean").value_and_grad(y, labels)[0] - ref / 4) < 1e-12


@given(depth=st.integers(1, 5), width=st.integers(2, 12), slope=st.floats(0.05, 1.0), seed=st.integers(0, 99))
def test_network_inverse_recovers_input(xp, depth, width, slope, seed):
    rng = np.random.default_rng(seed)
    net = dense_net(LeakyReLU(slope), widths=(width,) * depth, n_in=width + 3)
    net.layers[0] = Dense((width + 3,), width, n_read=width, name="d0")
    for layer in net.layers:
        init_well_conditioned(layer, rng, xp)
    x = rand(rng, (4, width + 3), xp)
    tr = net.forward(x)
    ops, y = net.inverse_operators(first=0), tr.output
    for l in reversed(range(depth)):             # every exact inverse, top down from the output
        y = net.invert_layer(l, y, tr, ops[l])
        np.testing.assert_allclose(asnumpy(y), asnumpy(tr.xs[l]), rtol=1e-9, atol=1e-9)


def test_network_shape_mismatch_message():
    with pytest.raises(ValueError, match="expects input"):
        Network([Dense((4,), 5, name="a"), Dense((6,), 2, name="b")], [Identity(), Identity()])


def test_nonsquare_layer_has_no_inverse(xp):
    net = dense_net(LeakyReLU(), widths=(7, 5))
    net.init(0, "orthogonal", xp, np.float64)
    with pytest.raises(ValueError, match="not square"):
        net.inverse_operators()
    from gait_ref.rules import make_rule
    with pytest.raises(ValueError, match=r"layer d1 \(W \(7, 5\)\) is not square"):
        make_rule("gait", net)
