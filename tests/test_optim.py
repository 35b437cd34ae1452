import math

import numpy as np
import pytest

from gait_ref.optim import SGD, Adam


def _adam_by_hand(p, grads, lr, b1, b2, eps, placement):
    """Three Adam steps on a scalar, written out independently of the implementation."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if placement == "hat":
            p = p - lr * (m / (1 - b1 ** t)) / (math.sqrt(v / (1 - b2 ** t)) + eps)
        else:
            p = p - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (math.sqrt(v) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("placement", ["hat", "tf"])
def test_adam_three_step_trajectory(xp, placement):
    grads = [0.5, -0.3, 0.8]
    expect = _adam_by_hand(1.0, grads, 0.1, 0.9, 0.99, 1e-1, placement)
    p = {"w": xp.asarray([1.0])}
    opt = Adam(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-1, eps_placement=placement)
    for g, e in zip(grads, expect):
        opt.step(p, {"w": xp.asarray([g])})
        assert abs(float(p["w"][0]) - e) < 1e-14
    # the two placements differ once eps matters
    other = _adam_by_hand(1.0, grads, 0.1, 0.9, 0.99, 1e-1, "tf" if placement == "hat" else "hat")
    assert abs(other[-1] - expect[-1]) > 1e-4


@pytest.mark.parametrize("placement", ["hat", "tf"])
def test_adam_blocked_update_is_the_whole_array_update(placement):
    """On the CPU a large parameter is updated in cache-sized blocks: every element must
    get exactly the arithmetic of the whole-array update (here written elementwise on the
    flat arrays, in float32 as the library does), with a gradient that is a transposed
    (non-contiguous) view, a parameter that is one, and a size that is not a multiple of
    the block."""
    from gait_ref import optim
    rng = np.random.default_rng(1)
    n = 2 * optim.CPU_BLOCK + 12345
    shape = (n // 5, 5)
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-6
    p0 = rng.standard_normal(shape).astype(np.float32)
    gs = [np.ascontiguousarray(rng.standard_normal(shape[::-1]).astype(np.float32)).T for _ in range(3)]
    params = {"w": p0.copy(), "wt": np.ascontiguousarray(p0.T).T}     # C- and F-ordered
    opt = Adam(lr=lr, beta1=b1, beta2=b2, eps=eps, eps_placement=placement)
    one = np.float32
    p, m, v = p0.copy(), np.zeros(shape, one), np.zeros(shape, one)
    for t, g in enumerate(gs, start=1):
        opt.step(params, {"w": g, "wt": g})
        m = m * one(b1) + g * one(1 - b1)
        v = v * one(b2) + g * g * one(1 - b2)
        if placement == "hat":
            p = p - m / (np.sqrt(v / one(1 - b2 ** t)) + one(eps)) * one(lr / (1 - b1 ** t))
        else:
            p = p - m / (np.sqrt(v) + one(eps)) * one(lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t))
        np.testing.assert_array_equal(params["w"], p)
        np.testing.assert_array_equal(params["wt"], p)
    assert not np.array_equal(p, p0)


def test_adam_state_roundtrip(xp):
    rng = np.random.default_rng(0)
    p1 = {"w": xp.asarray(rng.standard_normal((3, 4)))}
    p2 = {"w": p1["w"].copy()}
    a1, a2 = Adam(lr=0.01), Adam(lr=0.01)
    gs = [xp.asarray(rng.standard_normal((3, 4))) for _ in range(4)]
    for g in gs[:2]:
        a1.step(p1, {"w": g})
        a2.step(p2, {"w": g})
    a3 = Adam(lr=0.01)
    a3.load_state_dict(a2.state_dict(), xp)
    for g in gs[2:]:
        a1.step(p1, {"w": g})
        a3.step(p2, {"w": g})
    np.testing.assert_array_equal(np.asarray(p1["w"].tolist()), np.asarray(p2["w"].tolist()))


def test_sgd_momentum_weight_decay(xp):
    p = {"w": xp.asarray([2.0])}
    opt = SGD(lr=0.1, momentum=0.9, weight_decay=0.01)
    # step 1: g' = 1 + 0.02 = 1.02; u = 1.02; p = 2 - 0.102 = 1.898
    opt.step(p, {"w": xp.asarray([1.0])})
    assert abs(float(p["w"][0]) - 1.898) < 1e-14
    # step 2: g' = 1 + 0.01898; u = 0.9 * 1.02 + 1.01898 = 1.93698; p = 1.898 - 0.193698
    opt.step(p, {"w": xp.asarray([1.0])})
    assert abs(float(p["w"][0]) - (1.898 - 0.193698)) < 1e-12
    state = opt.state_dict()
    opt2 = SGD(lr=0.1, momentum=0.9, weight_decay=0.01)
    opt2.load_state_dict(state, xp)
    assert opt2.t == 2 and abs(float(opt2.u["w"][0]) - 1.93698) < 1e-12


def test_optimisers_refuse_a_state_with_missing_or_extra_keys():
    """A resumed optimiser must hold a moment for every parameter it steps, and nothing
    else: a state that does not fit is refused by name, not silently reset."""
    params = {"a.W": np.ones(3), "a.b": np.zeros(2)}
    grads = {k: np.full_like(v, 0.5) for k, v in params.items()}
    for make, key in ((lambda: Adam(lr=0.1), "m/a.W"), (lambda: SGD(lr=0.1, momentum=0.9), "u/a.W")):
        opt = make()
        opt.step(params, grads)
        state = opt.state_dict()
        make().load_state_dict(state, np, names=list(params))            # fits
        missing = {k: v for k, v in state.items() if k != key}
        with pytest.raises(ValueError, match=rf"missing \['{key}'\]"):
            make().load_state_dict(missing, np, names=list(params))
        with pytest.raises(ValueError, match=r"unexpected \['" + key[0] + "/c.W'\\]"):
            make().load_state_dict({**state, key[0] + "/c.W": np.ones(1)}, np, names=list(params))
    Adam().load_state_dict({"t": 0}, np, names=list(params))              # not stepped yet: no moments
    SGD(momentum=0.0).load_state_dict({"t": 4}, np, names=list(params))   # no momentum: nothing kept
