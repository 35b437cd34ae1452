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
    """TrainStep narrows dL/dy to the loss's K classes for the rules that take it: a step's
    updated parameters (and BP's for the angle) equal those of a step that hands over the
    whole output, with zeros past K (float64)."""
    from gait_ref.optim import Adam
    from gait_ref.rules import BP, TargetRule
    from gait_ref.step import TrainStep
    K, params = 3, []
    rng0 = np.random.default_rng(2)
    x, labels = rand(rng0, (6, 2, 8, 8), xp), xp.asarray(rng0.integers(0, K, 6))
    for narrow in (True, False):
        if not narrow:
            monkeypatch.setattr(BP, "takes_narrow_output_grad", False)
            monkeypatch.setattr(TargetRule, "takes_narrow_output_grad", property(lambda self: False))
        net = _square_conv_net()
        rng = np.random.default_rng(1)
        for layer in net.layers:
            init_well_conditioned(layer, rng, xp, skew=0.1)
        step = TrainStep(net, SoftmaxCrossEntropy(K), make_rule(rule, net, seed=0), Adam(lr=1e-3))
        res = step(x, labels, step=1, epoch=0, measure=True)
        params.append(({k: asnumpy(v).copy() for k, v in net.parameters().items()}, res.measured))
    (a, ma), (b, mb) = params
    assert a.keys() == b.keys()
    for k in a:
        _close(a[k], b[k], 1e-9)
    assert ma["angles_deg"].keys() == mb["angles_deg"].keys() and len(ma["angles_deg"]) == 4
    for k in ma["angles_deg"]:          # the rule's updates against BP's, both given the narrow gradient
        assert abs(ma["angles_deg"][k] - mb["angles_deg"][k]) <= 1e-6, (k, ma["angles_deg"], mb["angles_deg"])
        assert abs(ma["norm_ratio"][k] - mb["norm_ratio"][k]) <= 1e-9 * max(1.0, abs(mb["norm_ratio"][k]))
