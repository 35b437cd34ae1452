"""DTP, SDTP and L-DRL: feedback gradients, the exact-inverse limit, L-DRL's fixed point."""
import numpy as np
import pytest

from gait_ref.activations import Identity, Tanh
from gait_ref.backend import to_device
from gait_ref.layers import Dense
from gait_ref.losses import SoftmaxCrossEntropy
from gait_ref.network import Network
from gait_ref.rules import make_rule

from .conftest import asnumpy


def small_net(xp, act=None, widths=(6, 5, 5, 4), n_in=7, seed=0):
    act = act or Tanh()
    layers, prev = [], (n_in,)
    for i, w in enumerate(widths):
        layers.append(Dense(prev, w, name=f"l{i}"))
        prev = (w,)
    net = Network(layers, [act] * (len(widths) - 1) + [Identity()])
    net.init(seed, "glorot", xp, np.float64)
    return net


def batch(net, xp, n=8, seed=1):
    rng = np.random.default_rng(seed)
    x = to_device(rng.standard_normal((n,) + net.in_shape), xp)
    y = to_device(rng.integers(0, 4, n), xp)
    tr = net.forward(x)
    _, gy = SoftmaxCrossEntropy(4).value_and_grad(tr.output, y)
    return tr, gy, y


@pytest.mark.parametrize("rule,loss", [("dtp", "denoising"), ("dtp", "noise-preserving"),
                                       ("sdtp", "denoising"), ("ldrl", None)])
def test_feedback_gradients_against_finite_differences(xp, rule, loss):
    net = small_net(xp)
    tr, _, _ = batch(net, xp)
    r = make_rule(rule, net, n_classes=4, dtp_options={"inverse_loss": loss or "denoising"})
    rng = np.random.default_rng(3)
    for l, fb in enumerate(r.fb):
        if fb is None:
            continue
        x = tr.xs[l]
        e = to_device(rng.standard_normal((x.shape[0], fb.n_read)) * 0.1, xp)
        eta = to_device(rng.standard_normal((x.shape[0], fb.n_out)) * 0.1, xp)
        f = (lambda: r.ldrl_loss_grads(l, x, e, eta)) if rule == "ldrl" else (lambda: r.inverse_loss_grads(l, x, e))
        _, g = f()
        for k in ("V", "c"):
            p = fb.params[k]
            v = to_device(rng.standard_normal(p.shape), xp)
            fb.params[k] = p + 1e-6 * v
            up = f()[0]
            fb.params[k] = p - 1e-6 * v
            down = f()[0]
            fb.params[k] = p
            an = float((g[k] * v).sum())
            assert abs((up - down) / 2e-6 - an) <= 1e-6 * (abs(an) + 1), (rule, fb.name, k)


def test_dtp_with_exact_inverse_feedback_gives_tp_targets(xp):
    """Linear square layers, g_l(u) = u W_l^-1 - b_l W_l^-1 (the exact inverse, in g's form):
    the difference correction y_{l-1} - g(y_l) + g(t_l) is then g(t_l), TP's target."""
    net = small_net(xp, act=Identity(), widths=(5, 5, 5, 5), n_in=5)
    tr, gy, y = batch(net, xp)
    r = make_rule("dtp", net, n_classes=4)
    for l in range(1, len(net) - 1):
        W, b = asnumpy(net.layers[l].params["W"]), asnumpy(net.layers[l].params["b"])
        Winv = np.linalg.inv(W)
        r.fb[l].params = {"V": to_device(Winv, xp), "c": to_device(-b @ Winv, xp)}
    t = r.targets(tr, gy, y)
    ops = net.inverse_operators(first=1)
    for l in range(len(net) - 2, 0, -1):
        tp = net.invert_layer(l, t[l], tr, ops[l])                    # TP: t_{l-1} = g_l^-1(t_l)
        np.testing.assert_allclose(asnumpy(t[l - 1]), asnumpy(tp), rtol=1e-10, atol=1e-12)


def test_ldrl_gradient_vanishes_in_expectation_at_the_transpose(xp):
    """Linear F(x) = x W + b and G(u) = u V + c with V = W^T (J_g = J_f^T): the L-DRL loss
    gradient with respect to V is zero in expectation. Over n = 4000 noise draws (20 batch
    means of 200), every component's mean must lie within 5 standard errors (estimated from
    the same draws) of zero; at a V away from W^T the same statistic is far outside."""
    rng = np.random.default_rng(0)
    net = small_net(xp, act=Identity(), widths=(6, 5, 4), n_in=6)
    r = make_rule("ldrl", net, n_classes=4)
    l, fb = 1, r.fb[1]
    W = net.layers[l].params["W"]
    x = to_device(rng.standard_normal((1, 6)), xp)                  # layer 1: 6 -> 5
    n = 4000

    def stat(V):
        fb.params["V"] = V
        samples = []
        for _ in range(n // 200):
            xb = xp.repeat(x, 200, axis=0)
            e = to_device(rng.standard_normal((200, 6)) * 0.1, xp)
            eta = to_device(rng.standard_normal((200, 5)) * 0.1, xp)
            samples.append(asnumpy(r.ldrl_loss_grads(l, xb, e, eta)[1]["V"]))
        s = np.stack(samples)                                         # (n / 200, O, R) batch means
        mean, se = s.mean(0), s.std(0, ddof=1) / np.sqrt(len(s))
        return np.abs(mean / se).max(), np.abs(mean).max()

    z0, _ = stat(W.T.copy())
    assert z0 < 5.0                                                    # |mean| < 5 standard errors
    z1, m1 = stat(W.T + 0.3)
    assert z1 > 10.0 and m1 > 1e-3                                      # clearly outside the band


def test_ldrl_training_reduces_jacobian_matching_error(xp):
    net = small_net(xp, widths=(8, 6, 4))
    tr, gy, y = batch(net, xp, n=64)
    r = make_rule("ldrl", net, n_classes=4, dtp_options={"feedback_lr": 0.2, "ldrl_iters": 50, "sigma": 0.05})
    before = r.jacobian_errors(tr)
    rng = np.random.default_rng(0)
    for _ in range(10):
        r.feedback_step(tr, rng)
    after = r.jacobian_errors(tr)
    for k in before:
        assert after[k] < 0.5 * before[k], (k, before[k], after[k])


def test_dtp_needs_dense_layers():
    from gait_ref.layers import Conv2D
    c = Conv2D((1, 6, 6), 3, 2, n_out=2, name="c")
    net = Network([c, Dense(c.out_shape, 4, name="d")], [Tanh(), Identity()])
    net.init(0, "glorot", np, np.float64)
    with pytest.raises(ValueError, match="dense layers only so far"):
        make_rule("dtp", net)
