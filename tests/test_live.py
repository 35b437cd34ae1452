"""Backward maps on a layer's live channels only (gait_ref.live): the same results as with
the auxiliary channels' zeros written out, and the rules really pass the narrow arrays."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gait_ref.activations import Identity, LeakyReLU
from gait_ref.layers import Conv2D, Dense, LocallyConnected2D
from gait_ref.linalg import RefinedInverse
from gait_ref.live import widen
from gait_ref.losses import SoftmaxCrossEntropy
from gait_ref.network import Network
from gait_ref.rules import make_rule

from .conftest import asnumpy
from .helpers import init_well_conditioned, rand


def _close(a, b, tol=1e-12):
    a, b = asnumpy(a), asnumpy(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(np.abs(b).max(), 1e-300))


@st.composite
def square_layers(draw):
    """A square dense, conv or locally connected layer (with auxiliary input channels), and
    how many of its output channels are live."""
    kind = draw(st.sampled_from(["dense", "conv", "local"]))
    if kind == "dense":
        n = draw(st.integers(2, 12))
        layer = Dense((n + draw(st.integers(0, 3)),), n, n_read=n)
    else:
        C, K, S = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
        H = draw(st.integers(K, 6))
        cls = Conv2D if kind == "conv" else LocallyConnected2D
        layer = cls((C + draw(st.integers(0, 2)), H, H), K, S, c_read=C)
    return layer, draw(st.integers(1, layer.out_shape[0]))


@given(case=square_layers(), seed=st.integers(0, 1000))
def test_narrow_backward_maps_equal_the_zero_padded_ones(xp, case, seed):
    """param_grads, input_grad (whole or read_only) and inverse_delta (LU and refined, with
    corrections) on the first c channels give what the full arrays with zeros give."""
    layer, c = case
    rng = np.random.default_rng(seed)
    init_well_conditioned(layer, rng, xp)
    x = rand(rng, (3,) + layer.in_shape, xp)
    _, cache = layer.forward(x)
    g = rand(rng, (3, c) + layer.out_shape[1:], xp)
    full = xp.zeros((3,) + layer.out_shape, dtype=g.dtype)
    full[:, :c] = g
    for name, v in layer.param_grads(g, cache).items():
        _close(v, layer.param_grads(full, cache)[name])
    whole = layer.input_grad(full, cache)
    _close(layer.input_grad(g, cache), whole)
    read = layer.c_read if layer.kind != "dense" else layer.n_read
    _close(layer.input_grad(g, cache, read_only=True), whole[:, :read])
    _close(layer.inverse_delta(g, cache, layer.inverse_operator()), layer.inverse_delta(full, cache, layer.inverse_operator()))
    W = layer.params["W"]
    X = xp.linalg.inv(W + 1e-3 * rand(rng, W.shape, xp))        # stale, so the corrections do work
    narrow, wide = (kept.operator(W) for kept in (RefinedInverse(), RefinedInverse()))
    for op in (narrow, wide):
        op.state.X, op.state.K = X, 2
    _close(layer.inverse_delta(g, cache, narrow), layer.inverse_delta(full, cache, wide), 1e-10)
    # the same norms, so the same backward errors: a residual's rounding differs with the order of
    # the first product's terms, so residuals agree to rounding of the right-hand side's norm
    B = np.sqrt(float(wide.sq[1]))
    for a, b in zip(narrow.sq, wide.sq):
        assert abs(np.sqrt(float(a)) - np.sqrt(float(b))) <= 1e-9 * np.sqrt(float(b)) + 1e-14 * B


def test_widen_refuses_more_channels_than_the_layer_has():
    with pytest.raises(ValueError, match="5 channels for a layer with 4"):
        widen(np.zeros((2, 5)), 4)


def _square_conv_net():
    """conv1 (not square) -> conv2 (square, 16 channels, 4 read by conv3) -> conv3 (square,
    36 channels) -> a square dense output reading 2 whole channels of conv3's map."""
    c1 = Conv2D((2, 8, 8), 3, 2, n_out=4, name="conv1")
    c2 = Conv2D(c1.out_shape, 2, 1, name="conv2")
    c3 = Conv2D(c2.out_shape, 3, 2, c_read=4, name="conv3")
    per = c3.out_shape[1] * c3.out_shape[2]
    out = Dense(c3.out_shape, 2 * per, n_read=2 * per, name="out")
    return Network([c1, c2, c3, out], [LeakyReLU(0.2)] * 3 + [Identity()])


def test_live_channels_are_the_whole_channels_read_above():
    net = _square_conv_net()
    assert [net.live_channels(l) for l in range(len(net))] == [None, 4, 2, None]
    odd = Network([Dense((6,), 6), Dense((6,), 4, n_read=5)], [Identity(), Identity()])
    assert odd.live_channels(0) == 5
    part = Network([Conv2D((1, 4, 4), 2, 2), Dense((4, 2, 2), 3, n_read=6)], [Identity(), Identity()])
    assert part.live_channels(0) is None                       # 6 units: one and a half channels


@pytest.mark.parametrize("rule", ["bp", "gait", "fa"])
def test_rules_hand_each_layer_only_its_live_channels(xp, rule, monkeypatch):
    """The narrow arrays are what the rules compute with (not sliced afterwards): every
    param_grads and every solve gets the channels the layer above reads; and the updates equal
    those of the same recursion on zero-padded arrays (float64)."""
    net = _square_conv_net()
    rng = np.random.default_rng(0)
    for layer in net.layers:
        init_well_conditioned(layer, rng, xp, skew=0.1)
    x = rand(rng, (5,) + net.in_shape, xp)
    labels = xp.asarray(rng.integers(0, 8, 5))
    tr = net.forward(x)
    _, gy = SoftmaxCrossEntropy(8).value_and_grad(tr.output, labels)
    r = make_rule(rule, net, seed=0, **({"inverse_solver": "refine"} if rule == "gait" else {}))
    seen = []
    for layer in net.layers:
        for name in ("param_grads", "inverse_delta"):
            f = getattr(layer, name)
            monkeypatch.setattr(layer, name, lambda a, *rest, f=f, n=layer.name, k=name, **kw:
                                seen.append((n, k, a.shape[1])) or f(a, *rest, **kw))
    narrow = r.compute(tr, gy)[0]
    expect = {("conv2", "param_grads"): 4, ("conv3", "param_grads"): 2, ("out", "param_grads"): 8,
              ("conv1", "param_grads"): 4}
    if rule == "gait":
        expect.update({("conv2", "inverse_delta"): 4, ("conv3", "inverse_delta"): 2, ("out", "inverse_delta"): 8})
    assert {(n, k): c for n, k, c in seen} == expect
    monkeypatch.setattr(net, "live_channels", lambda l: None)         # every array zero-padded
    wide = make_rule(rule, net, seed=0, **({"inverse_solver": "refine"} if rule == "gait" else {})).compute(tr, gy)[0]
    for a, b in zip(narrow, wide):
        for k in a:
            _close(a[k], b[k], 1e-9)


RULE_FORMS = [("bp", "difference"), ("fa", "difference"), ("gait", "difference"), ("gait", "absolute"),
              ("itp", "difference")]


@pytest.mark.parametrize("rule,form", RULE_FORMS)
def test_rules_take_the_output_gradient_on_the_units_the_loss_reads(xp, rule, form, monkeypatch):
    """A square output layer wider than the K classes: the loss's gradient is zero past K, and
    handed only its first K columns, BP, FA and the target rules give the updates they give with
    the zeros written out (the absolute form writes them out itself); those that take it narrow
    run the output layer's weight gradient on K columns."""
    net = _square_conv_net()
    rng = np.random.default_rng(1)
    for layer in net.layers:
        init_well_conditioned(layer, rng, xp, skew=0.1)
    K = 3
    assert net.layers[-1].n_out > K
    x = rand(rng, (5,) + net.in_shape, xp)
    tr = net.forward(x)
    _, gy = SoftmaxCrossEntropy(K).value_and_grad(tr.output, xp.asarray(rng.integers(0, K, 5)))
    kw = {"inverse_solver": "refine", "form": form} if rule in ("gait", "itp") else {}
    wide = make_rule(rule, net, seed=0, **kw).compute(tr, gy)[0]
    r = make_rule(rule, net, seed=0, **kw)
    assert getattr(r, "takes_narrow_output_grad", False) == (form == "difference")
    out = net.layers[-1]
    seen = []
    f = out.param_grads
    monkeypatch.setattr(out, "param_grads", lambda a, *rest, **k: seen.append(a.shape[1]) or f(a, *rest, **k))
    narrow = r.compute(tr, gy[:, :K])[0]
    assert seen == [K if form == "difference" else out.n_out]
    for a, b in zip(narrow, wide):
        for k in a:
            _close(a[k], b[k], 1e-9)


@pytest.mark.parametrize("rule", ["bp", "gait"])
def test_the_training_step_hands_the_rules_the_units_the_loss_reads(xp, rule, monkeypatch):
    """TrainStep runs the forward pass on the channels read and the loss's K classes, and
    narrows dL/dy to those K, for the rules that take them: a step's updated parameters (and
    BP's for the angle) equal those of a step with the whole forward pass and the whole
    output, zeros past K (float64). Normalized GAIT-prop's gamma counts every unit of a layer
    (auxiliary ones too) either way."""
    from gait_ref.optim import Adam
    from gait_ref.rules import BP, TargetRule
    from gait_ref.step import TrainStep
    K, params, seen = 3, [], []
    gamma, operator = TargetRule._gamma, RefinedInverse.operator
    monkeypatch.setattr(TargetRule, "_gamma", lambda self, d, sq_norms, size, s: seen.append(("size", size))
                        or gamma(self, d, sq_norms, size, s))
    monkeypatch.setattr(RefinedInverse, "operator", lambda self, W, rows=0, **kw: seen.append(("rows", rows))
                        or operator(self, W, rows, **kw))
    rng0 = np.random.default_rng(2)
    x, labels = rand(rng0, (6, 2, 8, 8), xp), xp.asarray(rng0.integers(0, K, 6))
    for narrow in (True, False):
        if not narrow:                  # the whole output: a full forward pass and dL/dy with its zeros
            monkeypatch.setattr(BP, "takes_narrow_output_grad", False)
            monkeypatch.setattr(TargetRule, "takes_narrow_output_grad", property(lambda self: False))
        net = _square_conv_net()
        rng = np.random.default_rng(1)
        for layer in net.layers:
            init_well_conditioned(layer, rng, xp, skew=0.1)
        r = make_rule(rule, net, seed=0, **({"inverse_solver": "refine"} if rule == "gait" else {}))
        step = TrainStep(net, SoftmaxCrossEntropy(K), r, Adam(lr=1e-3))
        assert step.widths == ([None, 4, 2, K] if narrow else None)
        res = step(x, labels, step=1, epoch=0, measure=True)
        params.append(({k: asnumpy(v).copy() for k, v in net.parameters().items()}, res.measured, seen[:]))
        seen.clear()
    (a, ma, sa), (b, mb, sb) = params
    assert sa == sb and len(sa) == (6 if rule == "gait" else 0)   # gamma's D_l and the solves' rows alike
    assert a.keys() == b.keys()
    for k in a:
        _close(a[k], b[k], 1e-9)
    assert ma["angles_deg"].keys() == mb["angles_deg"].keys() and len(ma["angles_deg"]) == 4
    for k in ma["angles_deg"]:          # the rule's updates against BP's, both given the narrow gradient
        assert abs(ma["angles_deg"][k] - mb["angles_deg"][k]) <= 1e-6, (k, ma["angles_deg"], mb["angles_deg"])
        assert abs(ma["norm_ratio"][k] - mb["norm_ratio"][k]) <= 1e-9 * max(1.0, abs(mb["norm_ratio"][k]))


@st.composite
def any_layers(draw):
    """A square layer (as ``square_layers``) or an ordinary conv, conv-pool or dense one, and a
    width: how many leading output channels a forward pass computes."""
    kind = draw(st.sampled_from(["square", "conv", "convpool", "dense"]))
    if kind == "square":
        layer, _ = draw(square_layers())
    elif kind == "dense":
        layer = Dense((draw(st.integers(1, 9)),), draw(st.integers(1, 9)))
    else:
        from gait_ref.layers import ConvPool2D
        C, K, S = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
        H = draw(st.integers(max(K, 4), 8))
        cls = Conv2D if kind == "conv" else ConvPool2D
        layer = cls((C, H, H), K, S, n_out=draw(st.integers(1, 5)))
    return layer, draw(st.integers(1, layer.out_shape[0]))


@given(case=any_layers(), seed=st.integers(0, 1000))
def test_a_narrow_forward_pass_gives_the_leading_channels_of_the_whole_one(xp, case, seed):
    """layer.forward(x, c) computes only the first c output channels, and they are those of the
    whole forward pass (to the rounding of a GEMM's column blocking), with the same cache."""
    layer, c = case
    rng = np.random.default_rng(seed)
    init_well_conditioned(layer, rng, xp)
    x = rand(rng, (3,) + layer.in_shape, xp)
    h, cache = layer.forward(x)
    hc, cache_c = layer.forward(x, c)
    assert hc.shape == (3, c) + layer.out_shape[1:]
    _close(hc, h[:, :c])
    assert cache.keys() == cache_c.keys()
    if "pool_mask" in cache:
        assert (asnumpy(cache_c["pool_mask"]) == asnumpy(cache["pool_mask"])[:, :c]).all()


def test_read_widths_are_the_channels_read_and_the_classes_at_the_top():
    net = _square_conv_net()
    assert net.read_widths() == [None, 4, 2, None]
    assert net.read_widths(top=3) == [None, 4, 2, 3]
    assert net.read_widths(top=net.layers[-1].n_out) == [None, 4, 2, None]   # the loss reads every unit
    convs = Network([Conv2D((1, 4, 4), 2, 2, n_out=3)], [Identity()])
    assert convs.read_widths(top=2) == [None]                  # a conv map's units are not its channels


def test_the_narrow_forward_pass_of_a_network_reads_only_channels_computed(xp):
    """Every layer's output in a forward pass of ``read_widths`` is the leading channels of the
    whole pass's, and each layer above reads its input from them alone: the square dense output
    reads two whole channels of conv3's map, channel-major, from a map of two channels."""
    net = _square_conv_net()
    rng = np.random.default_rng(3)
    for layer in net.layers:
        init_well_conditioned(layer, rng, xp, skew=0.1)
    x = rand(rng, (4,) + net.in_shape, xp)
    whole, narrow = net.forward(x), net.forward(x, net.read_widths(top=3))
    for l, w in enumerate(net.read_widths(top=3)):
        width = net.layers[l].out_shape[0] if w is None else w
        assert narrow.ys[l].shape[1] == narrow.hs[l].shape[1] == width
        _close(narrow.hs[l], whole.hs[l][:, :width])
        _close(narrow.ys[l], whole.ys[l][:, :width])


@pytest.mark.parametrize("rule,kw,narrow", [("bp", {}, True), ("fa", {}, True), ("gait", {}, True),
                                            ("itp", {}, True), ("gait", {"form": "absolute"}, False),
                                            ("dfa", {}, False)])
def test_only_the_rules_that_read_live_channels_get_a_narrow_forward_pass(rule, kw, narrow):
    """The absolute form inverts whole outputs (auxiliary units from the forward pass) and DFA
    projects the error onto every unit: they get the whole forward pass."""
    from gait_ref.step import forward_widths
    net = _square_conv_net()
    net.init(0, "orthogonal", np, np.float64)
    r = make_rule(rule, net, seed=0, **kw)
    assert forward_widths(net, SoftmaxCrossEntropy(3), r) == ([None, 4, 2, 3] if narrow else None)
