"""DTP, SDTP and L-DRL: feedback gradients, the exact-inverse limit, L-DRL's fixed point,
on dense, conv, conv-pool and locally connected networks."""
import numpy as np
import pytest

from gait_ref.activations import ELU, Identity, Tanh
from gait_ref.backend import random_generator, to_device
from gait_ref.layers import Conv2D, ConvPool2D, Dense, LocallyConnected2D
from gait_ref.losses import SoftmaxCrossEntropy
from gait_ref.network import Network
from gait_ref.rules import make_rule
from gait_ref.rules.dtp import per_layer

from .conftest import asnumpy


def dense_net(xp, act=None, widths=(6, 5, 5, 4), n_in=7, seed=0):
    act = act or Tanh()
    layers, prev = [], (n_in,)
    for i, w in enumerate(widths):
        layers.append(Dense(prev, w, name=f"l{i}"))
        prev = (w,)
    net = Network(layers, [act] * (len(widths) - 1) + [Identity()])
    net.init(seed, "glorot", xp, np.float64)
    return net


def conv_net(xp, kind, seed=0):
    """Small image nets: conv / locally connected (tanh) or conv-pool blocks (ELU)."""
    if kind == "convpool":
        a = ConvPool2D((2, 8, 8), 3, 1, n_out=3, name="b1")
        b = ConvPool2D(a.out_shape, 3, 1, n_out=4, name="b2")
        layers, act = [a, b], ELU()
    else:
        cls = Conv2D if kind == "conv" else LocallyConnected2D
        a = cls((2, 6, 6), 3, 2, n_out=3, name="c1")
        b = cls(a.out_shape, 3, 1, n_out=4, name="c2")
        c = cls(b.out_shape, 2, 1, n_out=3, padding="valid", name="c3")
        layers, act = [a, b, c], Tanh()
    layers.append(Dense(layers[-1].out_shape, 4, name="out"))
    net = Network(layers, [act] * (len(layers) - 1) + [Identity()])
    net.init(seed, "glorot", xp, np.float64)
    return net


def make_net(xp, kind):
    return dense_net(xp) if kind == "dense" else conv_net(xp, kind)


def batch(net, xp, n=8, seed=1):
    rng = np.random.default_rng(seed)
    x = to_device(rng.standard_normal((n,) + net.in_shape), xp)
    y = to_device(rng.integers(0, 4, n), xp)
    tr = net.forward(x)
    _, gy = SoftmaxCrossEntropy(4, "mean").value_and_grad(tr.output, y)
    return tr, gy, y


def noise_like(rng, a, xp, scale=0.1):
    return to_device(rng.standard_normal(a.shape) * scale, xp)


@pytest.mark.parametrize("form", ["bartunov", "ernoult"])
@pytest.mark.parametrize("kind", ["dense", "conv", "local", "convpool"])
@pytest.mark.parametrize("rule,loss", [("dtp", "denoising"), ("dtp", "noise-preserving"),
                                       ("sdtp", "denoising"), ("ldrl", None)])
def test_feedback_loss_gradients_against_finite_differences(xp, rule, loss, kind, form):
    net = make_net(xp, kind)
    tr, _, _ = batch(net, xp)
    r = make_rule(rule, net, n_classes=4, dtp_options={"inverse_loss": loss or "denoising", "feedback_form": form})
    rng = np.random.default_rng(3)
    assert r.layers_with_feedback == list(range(1, len(net) - (1 if rule == "dtp" else 0)))
    for l in r.layers_with_feedback:
        fb, x = r.fb[l], tr.xs[l]
        e, eta = noise_like(rng, x, xp), noise_like(rng, tr.ys[l], xp)
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
            assert abs(float(up - down) / 2e-6 - an) <= 1e-6 * (abs(an) + 1), (rule, fb.name, k)


def test_ldrl_loss_is_the_papers_formula(xp):
    """The L-DRL loss, recomputed from its definition with explicit forward/feedback calls."""
    net = conv_net(xp, "convpool")
    tr, _, _ = batch(net, xp)
    r = make_rule("ldrl", net, n_classes=4, dtp_options={"feedback_form": "ernoult"})
    rng = np.random.default_rng(0)
    l, fb = 1, r.fb[1]
    x, e, eta = tr.xs[l], noise_like(rng, tr.xs[l], xp), noise_like(rng, tr.ys[l], xp)
    F = lambda x_: net.layers[l].forward(x_)
    h0, c0 = F(x)
    h1, c1 = F(x + e)
    act = net.activations[l]
    r0 = fb.forward(act.f(h0), c0)[0]
    dr = fb.forward(act.f(h1), c1)[0] - r0
    dr_y = fb.forward(act.f(h0) + eta, c0)[0] - r0
    want = float((-2 * (e * dr).reshape(8, -1).sum(1) + (dr_y ** 2).reshape(8, -1).sum(1)).mean())
    np.testing.assert_allclose(float(r.ldrl_loss_grads(l, x, e, eta)[0]), want, rtol=1e-12)


def exact_inverse_feedback(r, net, xp):
    """Feedback set to the exact inverse of each square linear layer: V = W^-T (per position
    for locally connected layers), so T_V(dh) is the inverse's linear part."""
    for l in r.layers_with_feedback:
        W = asnumpy(net.layers[l].params["W"])
        Winv_T = np.swapaxes(np.linalg.inv(W), -1, -2)
        r.fb[l].params["V"] = to_device(Winv_T, xp)


@pytest.mark.parametrize("kind", ["dense", "conv", "local"])
def test_dtp_with_exact_inverse_feedback_gives_tp_targets(xp, kind):
    """Identity activations, square layers, g_l's linear part the exact inverse of layer l:
    the difference correction y_{l-1} - g(y_l) + g(t_l) equals TP's target g_l^-1(t_l)
    (for convolutions including the overlap correction of the exact inverse)."""
    if kind == "dense":
        net = dense_net(xp, act=Identity(), widths=(5, 5, 5, 4), n_in=5)
    else:
        cls = Conv2D if kind == "conv" else LocallyConnected2D
        a = Conv2D((2, 6, 6), 3, 1, n_out=3, name="c0")                   # 3 x 6 x 6
        b = cls(a.out_shape, 2, 2, name="sq1")                             # square, D = 12 -> 12 x 3 x 3
        c = cls(b.out_shape, 3, 1, name="sq2")                             # square, D = 108, overlapping
        layers = [a, b, c, Dense(c.out_shape, 4, name="out")]
        net = Network(layers, [Identity()] * 4)
        net.init(0, "orthogonal", xp, np.float64)
    tr, gy, y = batch(net, xp)
    r = make_rule("dtp", net, n_classes=4)
    exact_inverse_feedback(r, net, xp)
    t = r.targets(tr, gy, y)
    for l in range(len(net) - 2, 0, -1):
        tp = net.invert_layer(l, t[l], tr, net.layers[l].inverse_operator())                          # TP: t_{l-1} = g_l^-1(t_l)
        np.testing.assert_allclose(asnumpy(t[l - 1]), asnumpy(tp), rtol=1e-9, atol=1e-11)
        assert float(abs(asnumpy(t[l - 1] - tr.ys[l - 1])).max()) > 1e-6     # the targets did move


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_ldrl_gradient_vanishes_in_expectation_at_the_transpose(xp, kind):
    """Linear F(x) = layer(x) and G(u) = T_V(u) + c with V = W (J_g = J_f^T): the L-DRL loss
    gradient with respect to V is zero in expectation. Over n = 4000 noise draws (20 batch
    means of 200), every component's mean must lie within 5 standard errors (estimated from
    the same draws) of zero; at a V away from W the same statistic is far outside."""
    rng = np.random.default_rng(0)
    if kind == "dense":
        net = dense_net(xp, act=Identity(), widths=(6, 5, 4), n_in=6)
    else:
        a = Conv2D((1, 5, 5), 3, 2, n_out=2, name="c0")
        b = Conv2D(a.out_shape, 2, 1, n_out=3, name="c1")
        net = Network([a, b, Dense(b.out_shape, 4, name="out")], [Identity()] * 3)
        net.init(0, "glorot", xp, np.float64)
    r = make_rule("ldrl", net, n_classes=4)
    l, fb = 1, r.fb[1]
    W = net.layers[l].params["W"]
    x = to_device(rng.standard_normal((1,) + net.layers[l].in_shape), xp)
    y_shape = (200,) + net.layers[l].out_shape
    n = 4000

    def stat(V):
        fb.params["V"] = V
        samples = []
        for _ in range(n // 200):
            xb = xp.repeat(x, 200, axis=0)
            e = to_device(rng.standard_normal(xb.shape) * 0.1, xp)
            eta = to_device(rng.standard_normal(y_shape) * 0.1, xp)
            samples.append(asnumpy(r.ldrl_loss_grads(l, xb, e, eta)[1]["V"]))
        s = np.stack(samples)                                         # (n / 200, *V.shape) batch means
        mean, se = s.mean(0), s.std(0, ddof=1) / np.sqrt(len(s))
        return np.abs(mean / se).max(), np.abs(mean).max()

    z0, _ = stat(W.copy())
    assert z0 < 5.0                                                    # |mean| < 5 standard errors
    z1, m1 = stat(W + 0.3)
    assert z1 > 10.0 and m1 > 1e-3                                      # clearly outside the band


@pytest.mark.parametrize("kind,opts", [("dense", {"feedback_lr": 0.2, "ldrl_iters": 50, "sigma": 0.05}),
                                       ("conv", {"feedback_lr": 0.05, "ldrl_iters": 50, "sigma": 0.05}),
                                       ("local", {"feedback_lr": 0.1, "ldrl_iters": 50, "sigma": 0.05})])
def test_ldrl_training_reduces_jacobian_matching_error(xp, kind, opts):
    net = dense_net(xp, widths=(8, 6, 4)) if kind == "dense" else conv_net(xp, kind)
    tr, gy, y = batch(net, xp, n=32)
    r = make_rule("ldrl", net, n_classes=4, dtp_options=opts)
    before = r.jacobian_errors(tr)
    rng = random_generator(xp, [0])                    # device noise, as the trainer draws it
    for _ in range(10):
        r.feedback_step(tr, rng)
    after = r.jacobian_errors(tr)
    for k in before:
        assert after[k] < 0.5 * before[k], (k, before[k], after[k])


def test_per_layer_options():
    assert per_layer(0.1, 3, "--x") == [0.1] * 3
    assert per_layer([0.2], 2, "--x") == [0.2, 0.2]
    assert per_layer([1, 2, 3], 3, "--x", int) == [1, 2, 3]
    with pytest.raises(ValueError, match="--feedback-lr has 2 values, but the network has 3 feedback layers"):
        per_layer([1, 2], 3, "--feedback-lr")


def test_learned_feedback_errors():
    net = Network([Dense((6,), 5, name="a"), Dense((5,), 4, n_read=3, name="b"), Dense((4,), 4, name="c")],
                  [Tanh(), Tanh(), Identity()])
    net.init(0, "glorot", np, np.float64)
    with pytest.raises(ValueError, match="layer b reads only part of its input"):
        make_rule("dtp", net)
    with pytest.raises(ValueError, match="--ldrl-iters has 2 values"):
        make_rule("ldrl", dense_net(np), dtp_options={"ldrl_iters": [3, 4]})
    with pytest.raises(ValueError, match="sdtp: the output layer must have exactly 10 units"):
        make_rule("sdtp", dense_net(np), n_classes=10)
    with pytest.raises(ValueError, match="--feedback-form"):
        make_rule("dtp", dense_net(np), dtp_options={"feedback_form": "mirror"})


def test_sdtp_step_is_a_partial_step_toward_the_label(xp):
    """--sdtp-step s: the penultimate target y - g(p) + g(p + s (onehot - p)); s = 1 is
    Bartunov et al.'s label target g(onehot), and as s -> 0 the nudge divided by s tends to
    the learned inverse's Jacobian at p applied to (onehot - p) (central differences)."""
    from gait_ref.rules.dtp import softmax
    net = dense_net(xp)
    tr, gy, y = batch(net, xp)
    L = len(net)
    rules = {s: make_rule("sdtp", net, n_classes=4, dtp_options={"sdtp_step": s}) for s in (1.0, 0.25, 1e-6)}
    g = lambda u: asnumpy(rules[1.0].fb[L - 1].forward(to_device(u, xp), tr.caches[L - 1])[0])   # same seed: same g
    p = asnumpy(softmax(tr.ys[-1]))
    onehot = np.eye(4)[asnumpy(y)]
    h = asnumpy(tr.ys[L - 2])
    t = {s: [asnumpy(v) for v in r.targets(tr, gy, y)] for s, r in rules.items()}
    np.testing.assert_allclose(t[1.0][L - 2], h - g(p) + g(onehot), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(t[0.25][L - 2], h - g(p) + g(p + 0.25 * (onehot - p)), rtol=1e-12, atol=1e-14)
    d, eps = onehot - p, 1e-5
    jvp = (g(p + eps * d) - g(p - eps * d)) / (2 * eps)
    np.testing.assert_allclose((t[1e-6][L - 2] - h) / 1e-6, jvp, rtol=1e-4, atol=1e-8)
    assert not np.allclose(t[0.25][0], t[1.0][0])          # the lower targets follow from it
    with pytest.raises(ValueError, match=r"--sdtp-step must be in \(0, 1\], got 1.5"):
        make_rule("sdtp", net, n_classes=4, dtp_options={"sdtp_step": 1.5})


def test_a_linear_top_inverse_makes_sdtps_top_updates_independent_of_the_step(xp):
    """--linear-top-inverse (a control): with g_L(u) = u V^T + c the penultimate target moves
    by s (onehot - p) V^T, and its update, divided by s, is the same at every step s: the
    top hidden and output layers' updates do not depend on the step. With Bartunov's
    nonlinear top inverse they do. The lower layers' targets still follow the step."""
    net = dense_net(xp)
    tr, gy, y = batch(net, xp)
    L = len(net)

    def updates(linear, s):
        rule = make_rule("sdtp", net, n_classes=4, dtp_options={"sdtp_step": s, "linear_top": linear})
        return [{k: asnumpy(v) for k, v in g.items()} for g in rule.compute(tr, gy, y)[0]]
    for linear in (True, False):
        a, b = updates(linear, 1.0), updates(linear, 0.1)
        same = [all(np.allclose(a[l][k], b[l][k], rtol=1e-9, atol=1e-12) for k in a[l]) for l in range(L)]
        assert same[L - 1]                                            # the output layer: the task loss
        assert same[L - 2] == linear, linear
        assert not same[0]
    rule = make_rule("sdtp", net, n_classes=4, dtp_options={"linear_top": True})
    top = rule.fb[L - 1]
    u = tr.ys[-1]
    np.testing.assert_allclose(asnumpy(top.forward(u)[0]), asnumpy(u @ top.params["V"].T + top.params["c"]), rtol=1e-12)


def test_target_jumps_are_split_by_correct_and_wrong_samples_over_every_process():
    """The measuring step's medians of ||t_l - y_l|| over the global batch (both processes'
    samples), apart for correctly and wrongly classified ones; None where there are none."""
    from gait_ref.distributed import BatchSlice
    from gait_ref.step import target_jumps

    class TwoRanks:
        def allgather_object(self, mine):
            return [mine, {"fc1": np.array([5.0, 7.0]), "correct": np.array([False, False])}]
    jump = {"fc1": np.array([1.0, 2.0, 9.0]), "correct": np.array([True, True, False])}
    got = target_jumps(jump, BatchSlice(5, 0, TwoRanks()))
    assert got == {"fc1": {"correct": 1.5, "wrong": 7.0}}
    assert target_jumps({"fc1": np.array([1.0]), "correct": np.array([True])}, BatchSlice(1)) == \
        {"fc1": {"correct": 1.0, "wrong": None}}
