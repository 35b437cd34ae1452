"""The exact-inverse solvers: fresh LU, and refinement from a kept inverse with the
backward-error bound as a hard guarantee."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gait_ref.backend import get_backend
from gait_ref.linalg import (RefinedInverse, SquareInverse, _RefinedSolve, backward_errors, condition_lower_bound, max_corrections,
                             residual_bound, solver_for)
from gait_ref.rules import make_rule

from .conftest import asnumpy
from .helpers import rand
from .test_rules import setup


def _eta64(B, x, W):
    """The normwise backward error ||B - x W||_F / (||W||_2 ||x||_F), in float64 with the
    exact 2-norm of the stored (rounded) W."""
    B, x, W = (asnumpy(a).astype(np.float64) for a in (B, x, W))
    norm2 = np.linalg.norm(W, 2, axis=(-2, -1)).max()
    return np.linalg.norm(B - x @ W) / (norm2 * np.linalg.norm(x))


def _rel64(B, x, W):
    B, x, W = (asnumpy(a).astype(np.float64) for a in (B, x, W))
    return np.linalg.norm(B - x @ W) / np.linalg.norm(B)


def refined_solve(state, W, B):
    """What the target rule does: solve, check every backward error, strengthen and retry."""
    bound = residual_bound(B.dtype)
    for attempt in range(3 + max_corrections(B.dtype)):
        op = state.operator(W, rows=B.shape[-2], retry=attempt > 0)
        x = op.right_solve(B)
        if state.check([float(v) for v in op.sq], bound, W):
            state.settle(W)
            return x
    raise ArithmeticError("no convergence")


def test_renewed_and_kept_inverses_resume_exactly(xp):
    """Solves with as many rows as columns (X a fresh inverse at every step) and with fewer
    (X kept, corrected, and renewed by Newton-Schulz or afresh): a state saved
    mid-way and loaded into a new solver continues bit for bit."""
    rng = np.random.default_rng(7)
    D = 24
    W0 = np.linalg.qr(rng.standard_normal((D, D)))[0]
    walk = [xp.asarray((W0 + 3e-3 * t * rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32))
            for t in range(8)]
    Bs = [rand(rng, (D, D), xp, np.float32) for _ in walk]

    def steps(state, ts, rows):
        out = []
        bound = residual_bound(np.float32)
        for t in ts:
            for attempt in range(4):
                op = state.operator(walk[t], rows, retry=attempt > 0)
                x = op.right_solve(Bs[t])
                if state.check([float(v) for v in op.sq], bound, walk[t]):
                    state.settle(walk[t])
                    break
            out.append(asnumpy(x))
        return out

    for rows in (D, D - 1, 2):                       # 2: D / (4 rows) = 3, corrections combined
        a, b = RefinedInverse(), RefinedInverse()
        whole = steps(a, range(8), rows)
        steps(b, range(4), rows)
        c = RefinedInverse()
        c.load_state_dict(b.state_dict("inverse/1/"), "inverse/1/", xp)
        for u, v in zip(whole[4:], steps(c, range(4, 8), rows)):
            np.testing.assert_array_equal(u, v)
        assert a.refreshes > (1 if rows == D else 0)


def _conditioned(rng, D, cond):
    """A D x D matrix with singular values spaced evenly in log from 1 down to 1 / cond."""
    U, V = (np.linalg.qr(rng.standard_normal((D, D)))[0] for _ in range(2))
    return (U * np.logspace(0, -np.log10(cond), D)) @ V.T


@given(D=st.integers(2, 40), M=st.integers(1, 30), drift=st.sampled_from([0.0, 1e-4, 1e-3, 1e-2, 0.05]),
       seed=st.integers(0, 10**6), dtype=st.sampled_from([np.float32, np.float64]))
def test_every_refined_solve_meets_the_bound(xp, D, M, drift, seed, dtype):
    """An inverse kept from earlier weights, the weights moved by ``drift``: the solve's
    backward error, recomputed in float64, is below the bound (near orthogonal W it is
    the relative residual ||B - x W|| / ||B||)."""
    rng = np.random.default_rng(seed)
    W0 = np.linalg.qr(rng.standard_normal((D, D)))[0] + 0.2 * rng.standard_normal((D, D)) / np.sqrt(D)
    state = RefinedInverse()
    state.refresh(xp.asarray(W0.astype(dtype)))                  # the inverse of the earlier weights
    W = xp.asarray((W0 + drift * rng.standard_normal((D, D)) / np.sqrt(D)).astype(dtype))
    for _ in range(3):                                            # reuse over several solves
        B = rand(rng, (M, D), xp, dtype)
        x = refined_solve(state, W, B)
        assert _eta64(B, x, W) <= residual_bound(dtype) * 1.01


@given(D=st.integers(8, 64), cond=st.sampled_from([30.0, 1e3, 1e4]), drift=st.sampled_from([0.0, 1e-4, 1e-3]),
       seed=st.integers(0, 10**6))
def test_ill_conditioned_float32_solves_are_backward_stable(xp, D, cond, drift, seed):
    """Condition numbers up to 1e4 in float32, where no solve reaches a relative residual of
    64 eps (it is about eps x cond): every refined solve is accepted, its backward error
    (float64, exact 2-norm) meets the bound, and so its error is within cond(W) x 64 eps
    of the exact solution of the stored system."""
    rng = np.random.default_rng(seed)
    W0 = _conditioned(rng, D, cond)
    state = RefinedInverse()
    state.refresh(xp.asarray(W0.astype(np.float32)))
    W = xp.asarray((W0 + drift * rng.standard_normal((D, D)) / np.sqrt(D) / cond).astype(np.float32))
    for _ in range(3):
        B = rand(rng, (16, D), xp, np.float32)
        x = refined_solve(state, W, B)
        assert _eta64(B, x, W) <= residual_bound(np.float32)
        W64 = asnumpy(W).astype(np.float64)
        exact = np.linalg.solve(W64.T, asnumpy(B).astype(np.float64).T).T
        err = np.linalg.norm(asnumpy(x) - exact) / np.linalg.norm(asnumpy(x))
        assert err <= np.linalg.cond(W64) * residual_bound(np.float32)    # (x - x*) W = -r


def test_the_relative_residual_would_have_refused_these_solves(xp):
    """Why the bound is on the backward error: at cond 1e4 the accepted float32 solve's
    relative residual is far above 64 eps, its backward error far below."""
    rng = np.random.default_rng(3)
    W = xp.asarray(_conditioned(rng, 256, 1e4).astype(np.float32))
    B = rand(rng, (64, 256), xp, np.float32)
    x = refined_solve(RefinedInverse(), W, B)
    assert _rel64(B, x, W) > 4 * residual_bound(np.float32) > 40 * _eta64(B, x, W)


def test_a_singular_layer_is_refused(xp):
    """Two equal columns: no solve exists, refinement cannot converge, and the result is
    refused, never used. (A nonsingular but nearly singular layer is solved backward-stably
    and accepted: conditioning is the model's, the same for the LU solver.)"""
    rng = np.random.default_rng(4)
    W = rng.standard_normal((32, 32))
    W[:, 1] = W[:, 0]
    with np.errstate(all="ignore"), pytest.raises(ArithmeticError):
        refined_solve(RefinedInverse(), xp.asarray(W.astype(np.float32)), rand(rng, (8, 32), xp, np.float32))


def test_the_rule_names_a_singular_layer(xp):
    """GAIT-prop in float32 through a layer with two equal columns: an ArithmeticError that
    names the layer, not an update."""
    from gait_ref.activations import Identity, LeakyReLU
    from gait_ref.layers import Dense
    from gait_ref.network import Network
    net = Network([Dense((12,), 12, name=f"l{i}") for i in range(3)], [LeakyReLU()] * 2 + [Identity()])
    tr, gy, _ = setup(net, xp, 2, dtype=np.float32)
    W = net.layers[1].params["W"]
    W[:, 1] = W[:, 0]
    with np.errstate(all="ignore"), pytest.raises(ArithmeticError, match="layer l1: (the weights are numerically singular|the exact inverse)"):
        make_rule("gait", net, inverse_solver="refine").compute(tr, gy)


@pytest.mark.parametrize("shape", [(40, 40), (3, 12, 12)])
def test_the_norm_estimate_is_a_lower_bound_that_converges(xp, shape):
    """The warm-started power iteration: never above ||W||_2^2 (so an inexact estimate only
    tightens the test), and within 2% of it after the warm-up and a few steps, on Gaussian
    matrices whose leading singular values are close (slow convergence)."""
    rng = np.random.default_rng(6)
    W64 = rng.standard_normal(shape)
    W = xp.asarray(W64)
    true = np.linalg.norm(W64, 2, axis=(-2, -1)).max() ** 2
    state = RefinedInverse()
    for _ in range(30):
        est = float(state.norm_squared(W))
        assert est <= true * (1 + 1e-12)
    assert est >= true * 0.98


def test_backward_errors_over_processes():
    """Two processes, each half the rows: summed norms give the whole batch's backward
    errors; the norm estimate, the same on both, is summed twice and divided back."""
    s2, b2, x2a, x2b, ra, rb = 4.0, 6.0, 3.0, 5.0, [1e-6, 1e-8], [2e-6, 3e-8]
    one = [s2, b2, x2a + x2b] + [a + b for a, b in zip(ra, rb)]
    two = [2 * s2, b2, x2a + x2b] + [a + b for a, b in zip(ra, rb)]
    assert backward_errors(one) == backward_errors(two, world=2)
    assert np.allclose(backward_errors(one), [np.sqrt(3e-6 / 32), np.sqrt(4e-8 / 32)])
    assert condition_lower_bound(one) == condition_lower_bound(two, world=2) == np.sqrt(32 / 6)
    assert backward_errors([1.0, 0.0, 0.0, 0.0]) == [0.0]                  # B = 0, x = 0: exact
    W = np.eye(2, dtype=np.float32)
    for bad in ([1.0, 1.0, np.nan, 1e-6], [1.0, 1.0, np.inf, np.inf], [np.nan, 1.0, 1.0, 1e-9]):
        assert not RefinedInverse().check(bad, 1e-5, W)                       # refused, never accepted
    with pytest.raises(ArithmeticError, match="numerically singular in float32: cond"):
        RefinedInverse().check([1.0, 1.0, 1e16, 0.0], 1e-5, W)   # exact backward error, but x is 1e8 x B
    assert RefinedInverse().check([1.0, 1.0, 1e12, 0.0], 1e-5, W)   # cond >= 1e6 < 1/eps: accepted


def test_a_stack_of_matrices_is_refined_like_one(xp):
    rng = np.random.default_rng(1)
    W = rand(rng, (5, 6, 6), xp) + xp.asarray(np.eye(6) * 3)
    B = rand(rng, (5, 7, 6), xp)
    x = refined_solve(RefinedInverse(), W, B)
    np.testing.assert_allclose(asnumpy(x), asnumpy(SquareInverse(W).right_solve(B)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_refine_and_lu_give_the_same_updates(xp, dtype):
    """GAIT-prop's updates with either solver, from the same forward pass: the same to the
    dtype's round-off (and both equal BP under orthogonal weights, test_rules)."""
    from gait_ref.activations import Identity, LeakyReLU
    from gait_ref.layers import Dense
    from gait_ref.network import Network
    net = Network([Dense((12,), 12, name=f"l{i}") for i in range(4)], [LeakyReLU()] * 3 + [Identity()])
    tr, gy, _ = setup(net, xp, 9, dtype=dtype)
    a = make_rule("gait", net, inverse_solver="refine").compute(tr, gy)[0]
    b = make_rule("gait", net, inverse_solver="lu").compute(tr, gy)[0]
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for ga, gb in zip(a, b):
        np.testing.assert_allclose(asnumpy(ga["W"]), asnumpy(gb["W"]), rtol=tol, atol=tol * np.abs(asnumpy(gb["W"])).max())


def test_training_keeps_every_solve_below_the_bound(tmp_path):
    """GAIT-prop in float32 on real Fashion-MNIST images with the deep MLP's regulariser:
    every step's solves' backward errors (logged with --angles-every 1) meet the bound, while the kept
    inverses go stale and are corrected, and refreshed when needed."""
    from gait_ref.config import Config
    from gait_ref.runfolder import read_records
    from gait_ref.train import Trainer
    t = Trainer(Config(task="fashion-mnist", arch="mlp-shallow", rule="gait", batch_size=64, max_steps=40,
                       angles_every=1, eval_subset=100, quiet=True, out=str(tmp_path)))
    t.run()
    recs = read_records(tmp_path)
    res = [r["solve_residual"] for r in recs if "solve_residual" in r]
    assert len(res) == 40 and max(max(r.values()) for r in res) <= residual_bound(np.float32)
    st_ = t.rule.stats
    assert st_["steps"] == 40 and st_["corrections"] > 0
    assert max(r["angles_deg"]["fc2"] for r in recs if "angles_deg" in r) < 5


def test_steady_drift_costs_no_recomputation():
    """The deep MLP (six 1024 x 1024 layers, batch 256 of real Fashion-MNIST images) in float32 with the scaling paper's
    regulariser and Adam, whose weights drift steadily: after the first steps, every step's
    solves meet the bound at the first attempt, so the targets are computed once per step
    (kept inverses are renewed for the next step's drift, with the corrections that drift
    needs; the policy before this one recomputed about one step in three here)."""
    from gait_ref.architectures import build
    from gait_ref.losses import SoftmaxCrossEntropy
    from gait_ref.optim import Adam
    from gait_ref.step import TrainStep
    from gait_ref.data.packaged import load_packaged
    (images, labels), _ = load_packaged("fashion-mnist", quiet=True)
    net = build("mlp-deep", images.shape[1:], 10, invertible=True)
    net.init(0, "orthogonal", np, np.float32)
    rule = make_rule("gait", net, inverse_solver="refine")
    step = TrainStep(net, SoftmaxCrossEntropy(10), rule, Adam(lr=1.9e-5, eps=1e-6, eps_placement="tf"),
                     ortho_lambda=100.0)
    x, y = images[:256].astype(np.float32) / 255, labels[:256]
    for t in range(1, 31):
        step(x, y, step=t, epoch=0)
        if t == 3:
            warm = dict(rule.stats)
    assert rule.stats["recursions"] - warm["recursions"] == rule.stats["steps"] - warm["steps"] == 27
    assert sum(r.refreshes for r in rule.refined) > 2 * 6           # the inverses were renewed


def test_a_renewing_layer_solves_with_a_fresh_inverse_and_no_correction(xp):
    """A layer whose solves have at least D rows takes a fresh inverse of each step's W and
    plans no correction, step after step, even after a step that needed one (the first, whose
    plan starts at one). Before, a layer whose corrections had once been measured renewed X by
    Newton-Schulz from then on, which in float32 leaves a backward error above the plan's
    bound / 4, so it kept one correction (two more GEMMs of rows x D x D) at every step."""
    rng = np.random.default_rng(11)
    D = 48
    W0 = np.linalg.qr(rng.standard_normal((D, D)))[0]
    bound = residual_bound(np.float32)
    state = RefinedInverse()
    plans = []
    for t in range(10):
        W = xp.asarray((W0 + 3e-3 * t * rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32))
        B = rand(rng, (2 * D, D), xp, np.float32)
        op = state.operator(W, rows=2 * D)
        x = op.right_solve(B)
        assert state.check([float(v) for v in op.sq], bound, W)       # met at the first attempt
        state.settle(W)
        plans.append(state.K)
        np.testing.assert_allclose(asnumpy(x @ W), asnumpy(B), atol=1e-4)
    assert plans[1:] == [0] * 9, plans


@pytest.mark.parametrize("stack", [(), (3,)])
def test_a_renewing_layer_with_narrow_right_hand_sides_inverts_only_their_rows(xp, stack):
    """Right-hand sides with only c live columns (a layer's auxiliary channels are zero) meet
    only the first c rows of X: a renewing layer with no correction planned computes just those
    (the rows inv gives), every solve still meets the bound and solves the zero-padded system;
    a miss, which plans a correction (all of X), makes the retry compute the whole inverse."""
    _narrow_rows_case(xp, stack)


@pytest.mark.parametrize("stack", [(), (3,)])
def test_the_partial_inverse_uses_only_cupys_api(stack):
    """The same on the emulated device (cupy's names and rules on the CPU): the training tests
    there run at sizes where no layer renews with narrow right-hand sides. Its operator and
    solve (the rows of W^-1, the float64 product and the bound) read nothing back to the
    host: the step's one read is the rule's, of every solve's norms at once."""
    from gait_ref import emulation as em
    _narrow_rows_case(get_backend("emulated"), stack, em)


def _narrow_rows_case(xp, stack, em=None):
    rng = np.random.default_rng(5)
    D, c = 40, 6
    W0 = np.linalg.qr(rng.standard_normal(stack + (D, D)))[0]
    bound = residual_bound(np.float32)
    state = RefinedInverse()
    for t in range(6):
        W = xp.asarray((W0 + 3e-3 * t * rng.standard_normal(W0.shape) / np.sqrt(D)).astype(np.float32))
        B = rand(rng, stack + (2 * D, c), xp, np.float32)
        if em is not None:
            em.reset_counters()
        op = state.operator(W, rows=2 * D, live=c)
        x = op.right_solve(B)
        if em is not None:
            counts = em.reset_counters()
            assert counts["d2h"] + counts["sync"] == 0, counts
        assert state.check([float(v) for v in op.sq], bound, W)
        state.settle(W)
        full = np.zeros(stack + (2 * D, D), np.float32)
        full[..., :c] = asnumpy(B)
        assert _eta64(full, x, W) <= bound
        if t > 0:                                     # the first step starts from a whole inverse
            assert state.X.shape == stack + (c, D) and state.K == 0 and type(state.X) is type(W)
            np.testing.assert_allclose(asnumpy(state.X), np.linalg.inv(asnumpy(W))[..., :c, :], rtol=0, atol=1e-5)
    miss = [float(v) for v in op.sq]
    miss[3] = 1e6 * miss[2]                           # a residual far above the bound
    assert not state.check(miss, bound, W) and state.K == 1
    state.operator(W, rows=2 * D, retry=True, live=c)
    assert state.X.shape == W.shape


@given(st.integers(0, 2**31 - 1), st.sampled_from([(), (2,)]), st.sampled_from([1.0, 30.0, 1e3]),
       st.sampled_from([0.0, 1e-6, 1e-4, 1e-2]), st.sampled_from([1e-3, 1.0, 1e3]), st.sampled_from([None, 7]))
def test_the_row_inverse_solve_bounds_its_backward_error_from_above(xp, monkeypatch, seed, stack, cond, stale, scale,
                                                                     block_rows):
    """A renewing layer that keeps only c rows X_c of W^-1 reports, in place of the residual's
    norm, an upper bound on it (``_RefinedSolve._solve_by_rows``): the backward error the check
    reads is never below the true one (float64, exact ||W||_2), for any conditioning, any
    staleness of X_c and any scale of B, and is close to it (within the norm estimate's ratio
    and a few u), so a stale X_c misses the bound as the full residual would. ``block_rows``:
    the float64 product in blocks of 7 rows (120 = 17 x 7 + 1), as it runs on large layers."""
    from gait_ref import linalg
    from gait_ref.linalg import _RefinedSolve
    rng = np.random.default_rng(seed)
    D, c, M = 48, 7, 120
    if block_rows is not None:
        monkeypatch.setattr(linalg, "ROWS_BLOCK", block_rows * D)
        monkeypatch.setattr(linalg, "DEVICE_ROWS_BLOCK", block_rows * D)
    U, V = (np.linalg.qr(rng.standard_normal(stack + (D, D)))[0] for _ in range(2))
    W64 = (U * np.geomspace(1.0, cond, D)) @ V
    W = W64.astype(np.float32)
    Xc = np.linalg.inv(W.astype(np.float64))[..., :c, :]
    Xc = (Xc * (1 + stale * rng.standard_normal(Xc.shape))).astype(np.float32)
    B = (scale * rng.standard_normal(stack + (M, c))).astype(np.float32)
    state = RefinedInverse()
    state.X, state.K = xp.asarray(Xc), 0
    op = _RefinedSolve(state, xp.asarray(W))
    x = op.right_solve(xp.asarray(B))
    assert x.dtype == np.float32 and x.shape == stack + (M, D)
    np.testing.assert_allclose(asnumpy(x), (B.astype(np.float64) @ Xc.astype(np.float64)), rtol=2.0 ** -23, atol=0)
    sq = [float(v) for v in op.sq]
    assert len(sq) == 4
    reported = backward_errors(sq)[0]
    full = np.zeros(stack + (M, D), np.float32)
    full[..., :c] = B
    true = _eta64(full, x, W)
    assert true <= reported
    ratio = np.linalg.norm(W.astype(np.float64), 2, axis=(-2, -1)).max() / np.sqrt(sq[0])
    assert reported <= 1.01 * ratio * true + 8 * 2.0 ** -24, (reported, true, ratio)
    if stale >= 1e-4:
        assert reported > residual_bound(np.float32)


def test_solver_choice():
    assert solver_for("auto", np.float32) == "refine" and solver_for("auto", np.float64) == "lu"
    with pytest.raises(ValueError, match="--inverse-solver must be one of"):
        solver_for("qr", np.float32)


def test_a_fresh_inverse_after_misses_plans_for_the_next_steps_drift(xp):
    """A kept inverse too stale for max_corrections: the solve misses up to that maximum, a
    fresh inverse of this step's W is made, and the retry succeeds with one correction. The
    plan for the next step is still the maximum (the next W is a step's drift away again),
    not the one correction that an inverse of these very weights needed; planning one made
    the next step miss, and recompute every layer's targets, whenever the weights drifted."""
    rng = np.random.default_rng(3)
    D = 32
    W_old = np.linalg.qr(rng.standard_normal((D, D)))[0]
    W = xp.asarray(W_old + 0.3 * rng.standard_normal((D, D)) / np.sqrt(D))     # far from W_old
    state = RefinedInverse()
    state.operator(xp.asarray(W_old), rows=8)                                   # X = W_old^-1
    x = refined_solve(state, W, rand(rng, (8, D), xp, np.float64))
    assert state.refreshes == 2 and state.K == max_corrections(np.float64)
    assert np.all(np.isfinite(asnumpy(x)))


@pytest.mark.parametrize("solver,dtype", [("lu", np.float64), ("lu", np.float32), ("refine", np.float64)])
def test_the_step_flags_a_nearly_singular_layer_by_name(xp, solver, dtype):
    """A layer with two (in float64, almost) equal columns: the solver returns a huge but finite
    x, which no finiteness check notices (the LU meets a tiny pivot, not a zero one; float64
    refinement converges, cond about 1e8 being well within 1/eps). The training step's checks
    bound cond(W) from below with each solve's norms and name the layer; the same step on the
    healthy network passes every check. (Refinement in float32 refuses such a layer at once:
    test_the_rule_names_a_singular_layer.)"""
    from gait_ref.activations import Identity, LeakyReLU
    from gait_ref.layers import Dense
    from gait_ref.losses import SoftmaxCrossEntropy
    from gait_ref.network import Network
    from gait_ref.optim import Adam
    from gait_ref.step import TrainStep
    rng = np.random.default_rng(5)
    net = Network([Dense((12,), 12, name=f"l{i}") for i in range(3)], [LeakyReLU()] * 2 + [Identity()])
    net.init(0, "orthogonal", xp, dtype)
    x = xp.asarray(rng.standard_normal((6, 12)).astype(dtype))
    y = xp.asarray(rng.integers(0, 12, 6))

    def step():
        rule = make_rule("gait", net, inverse_solver=solver)
        res = TrainStep(net, SoftmaxCrossEntropy(12), rule, Adam(lr=1e-4), cond_max=1e6)(x, y, step=1, epoch=0)
        return res, asnumpy(res.checks)
    res, failed = step()
    assert not failed.any(), res.first_failure(failed)
    W = net.layers[1].params["W"]
    W[:, 1] = W[:, 0] + (1e-8 if dtype == np.float64 else 0) * W[:, 1]      # cond about 1.4e8, or singular
    with np.errstate(all="ignore"):
        res, failed = step()
    assert res.first_failure(failed).startswith("layer l1's exact inverse amplifies by more than cond_max = 1e+06"), \
        res.first_failure(failed)


def test_a_singular_layer_stops_training_by_name_and_keeps_the_last_good_checkpoint(tmp_path):
    """Through the trainer, for the float32 default (refine, which refuses the solve at once)
    and the float64 default (lu, which the step's check stops): a layer made singular after
    step 2 ends the run with the layer named, and the checkpoint of step 2 stands."""
    from gait_ref.checkpoint import load_latest
    from gait_ref.config import Config
    from gait_ref.train import DivergenceError, Trainer
    for dtype in ("float32", "float64"):
        out = tmp_path / dtype
        t = Trainer(Config(task="synthetic", rule="gait", dtype=dtype, max_steps=6, checkpoint_every=1, quiet=True,
                           out=str(out)))

        def break_layer(step, logged):
            if step == 2:
                W = t.net.layers[1].params["W"]
                W[:, 1] = W[:, 0]
        with np.errstate(all="ignore"), pytest.raises(DivergenceError) as err:
            t.run(on_step=break_layer)
        msg = str(err.value)
        assert "step 3" in msg and f"layer {t.net.layers[1].name}" in msg and "singular" in msg, msg
        assert "the last good checkpoint is kept" in msg, msg
        assert load_latest(out / "last.h5")[2]["step"] == 2, dtype


def test_an_exactly_singular_layer_under_lu_is_named():
    """numpy's LU meets an exactly zero pivot (a zero column) and raises; the rule names the
    layer whose solve failed, l1, not the square layer above it that solved first."""
    from gait_ref.activations import Identity, LeakyReLU
    from gait_ref.layers import Dense
    from gait_ref.linalg import InverseFailure
    from gait_ref.network import Network
    net = Network([Dense((12,), 12, name=f"l{i}") for i in range(3)], [LeakyReLU()] * 2 + [Identity()])
    tr, gy, _ = setup(net, np, 2, dtype=np.float64)
    net.layers[1].params["W"][:, 1] = 0
    with pytest.raises(InverseFailure, match="^layer l1: "):
        make_rule("gait", net, inverse_solver="lu").compute(tr, gy)


def test_the_correction_cap_prices_corrections_against_renewals():
    from gait_ref.linalg import MAX_PLANNED, correction_cap
    assert correction_cap(np.float32, 32, 3072) == MAX_PLANNED                    # 96 corrections per renewal
    assert correction_cap(np.float32, 64, 1536) == 6                             # D / (4 rows)
    assert correction_cap(np.float32, 256, 1024) == max_corrections(np.float32)
    assert correction_cap(np.float32, 512, 216) == max_corrections(np.float32)   # never below the dtype's
    assert correction_cap(np.float64, 0, 3072) == max_corrections(np.float64)    # rows unknown


@given(st.floats(1e-4, 0.9), st.floats(1e-6, 1e-1), st.integers(0, 4))
def test_the_predicted_corrections_reach_the_target(rho, eta0, k):
    from gait_ref.linalg import corrections_to_reach
    etas = [eta0 * rho ** j for j in range(k + 1)]
    target = 1e-7
    K = corrections_to_reach(etas, target, rho)
    assert K >= k and eta0 * rho ** K <= target * (1 + 1e-9)
    assert K == k or eta0 * rho ** (K - 1) > target * (1 - 1e-9)              # the fewest
    assert corrections_to_reach(etas, target, 1.2) is None and corrections_to_reach(etas, target, None) is None


def test_a_wide_layer_with_few_rows_keeps_its_inverse_through_drifting_steps(monkeypatch):
    """D = 192, 8 rows, float32, weights drifting every step as Adam moves them: with the cap
    priced by D / (4 rows) (here 6) the layer renews far less often than with the
    dtype's two corrections, and misses (recomputations) no more; every accepted solve met
    the bound (check accepts nothing else)."""
    from gait_ref import linalg

    def run(max_planned):
        monkeypatch.setattr(linalg, "MAX_PLANNED", max_planned)
        rng = np.random.default_rng(7)
        D = 192
        W = np.linalg.qr(rng.standard_normal((D, D)))[0].astype(np.float32)
        state, misses = RefinedInverse(), 0
        for t in range(24):
            W = (W + 2e-3 * np.sign(rng.standard_normal((D, D)))).astype(np.float32)    # an Adam-sized step
            B = rng.standard_normal((8, D)).astype(np.float32)
            for attempt in range(3 + max_corrections(np.float32)):
                op = state.operator(W, rows=8, retry=attempt > 0)
                op.right_solve(B)
                if state.check([float(v) for v in op.sq], residual_bound(np.float32), W):
                    state.settle(W)
                    break
                misses += 1
            else:
                raise AssertionError("no convergence")
            assert state.etas[-1] <= residual_bound(np.float32)
        return state.refreshes, misses

    kept, kept_misses = run(8)
    capped, capped_misses = run(max_corrections(np.float32))
    assert kept < capped / 2, (kept, capped)
    assert kept_misses <= capped_misses, (kept_misses, capped_misses)


def _drifted(rng, D, age, rank=8, step=2e-3):
    """Orthogonal weights W0 and W0 after ``age`` Adam-like steps: each a sign pattern of a
    rank-``rank`` gradient (what Adam makes of a batch's outer products) plus small noise."""
    W0 = np.linalg.qr(rng.standard_normal((D, D)))[0]
    W = W0.copy()
    for _ in range(age):
        g = rng.standard_normal((D, rank)) @ rng.standard_normal((rank, D))
        W += step * (np.sign(g) + 0.1 * rng.standard_normal((D, D)))
    return W0.astype(np.float32), W.astype(np.float32)


def _kept_solve(W0, W, B, krylov, K):
    """One solve from the kept inverse of W0 with K corrections, combined or not."""
    state = RefinedInverse()
    state.refresh(W0)
    state.operator(W, rows=B.shape[-2])
    state.krylov, state.K = krylov, K
    op = _RefinedSolve(state, W)
    x = op.right_solve(B)
    return x, backward_errors([float(v) for v in op.sq])


@given(D=st.integers(48, 160), M=st.integers(1, 4), age=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_every_combined_solve_meets_the_bound(xp, D, M, age, seed):
    """A wide float32 layer with few rows (D / (4 rows) > 2: corrections combined by minimal
    residual, ``_solve_by_krylov``), its inverse kept from weights ``age`` Adam-like steps
    back: every accepted solve's backward error, recomputed in float64 with the exact 2-norm,
    meets the bound, and the kept inverse is still the one it started from (no renewal
    needed: the combination reaches the bound within its cap)."""
    rng = np.random.default_rng(seed)
    W0, W = _drifted(rng, D, age)
    state = RefinedInverse()
    state.refresh(xp.asarray(W0))
    W, X0 = xp.asarray(W), state.X
    for _ in range(3):
        B = rand(rng, (M, D), xp, np.float32)
        x = refined_solve(state, W, B)
        assert state.krylov
        assert _eta64(B, x, W) <= residual_bound(np.float32) * 1.01
    assert state.refreshes == 1 and state.X is X0


def test_the_combination_needs_far_fewer_corrections_than_refinement():
    """The same stale inverse and right-hand sides (D = 256, 4 rows): the weights moved by a
    small full-rank drift and along 4 directions by much more, so I - X W has four
    eigenvalues of 0.5-0.7 and the rest below 0.01 (what a kept inverse of conv7's 3072 layer showed: a
    first correction contracting by 0.1, later ones by 0.3 and more). The refinement's
    iterates contract only as fast as the slowest direction allows; the minimal-residual
    combination of the same corrections removes the few slow directions first."""
    rng = np.random.default_rng(0)
    D = 256
    W0 = np.linalg.qr(rng.standard_normal((D, D)))[0]
    slow = 5 * (rng.standard_normal((D, 4)) @ rng.standard_normal((4, D))) / D     # eigenvalues of I - X W to 0.7
    W = (W0 + slow + 1e-3 * rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    W0 = W0.astype(np.float32)
    B = rng.standard_normal((4, D)).astype(np.float32)
    target = residual_bound(np.float32) / 4

    def needed(krylov):
        for K in range(1, 40):
            x, etas = _kept_solve(W0, W, B, krylov, K)
            if etas[-1] <= target:
                assert _eta64(B, x, W) <= residual_bound(np.float32)
                return K
        return 40
    combined, refined = needed(True), needed(False)
    assert combined <= refined / 2, (combined, refined)


def test_the_combinations_predicted_residuals_are_least_squares_residuals():
    """``_solve_by_krylov``'s history (the residual after k < K corrections, from one
    Cholesky factor of the Gram matrices) against each row's least-squares problem over the
    first k corrections solved directly in float64."""
    rng = np.random.default_rng(1)
    D, M, K = 128, 3, 5
    W0, W = _drifted(rng, D, 8)
    B = rng.standard_normal((M, D)).astype(np.float32)
    x, etas = _kept_solve(W0, W, B, True, K)
    X = np.linalg.inv(W0.astype(np.float64)).astype(np.float32)
    x0 = B @ X
    r0 = B - x0 @ W
    r, Y = r0, []
    for _ in range(K):
        z = r @ X
        Y.append(z @ W)
        r = r - Y[-1]
    # residual norms relative to ||r_0||, which the norm estimate in sq does not change
    for k in range(1, K):
        res2 = 0.0
        for i in range(M):
            A = np.stack([y[i] for y in Y[:k]], 1).astype(np.float64)
            c = np.linalg.lstsq(A, r0[i].astype(np.float64), rcond=None)[0]
            res2 += np.sum((r0[i] - A @ c) ** 2)
        assert etas[k] / etas[0] == pytest.approx(np.sqrt(res2) / np.linalg.norm(r0.astype(np.float64)), rel=1e-2)
    # the x returned: its residual is computed anew (in float32, so at the dtype's rounding
    # level it differs from float64's), and both meet the bound
    assert etas[-1] <= residual_bound(np.float32) and _eta64(B, x, W) <= residual_bound(np.float32)


def test_a_kept_inverse_is_renewed_when_its_corrections_pass_the_cycles_mean_cost():
    """``_renewal_pays``: renew when the next step's corrections exceed (corrections spent +
    a renewal's D / rows) / steps of the cycle."""
    state = RefinedInverse()
    state.X, state.krylov, state.rows = np.zeros((3072, 3072), np.float32)[:1], True, 32   # D / rows = 96
    state.age, state.spent = 20, 100                     # mean (100 + 96) / 20 = 9.8
    state.K = 9
    assert not state._renewal_pays(np.float32)
    state.K = 10
    assert state._renewal_pays(np.float32)
    state.krylov = False                                 # refinement alone: renewed by the cap only
    assert not state._renewal_pays(np.float32)


def test_the_plan_allows_for_one_more_step_of_drift():
    """``_fewest_next_step``: the error after k corrections grows like the drift to the
    power k + 1 and the drift linearly with the inverse's age, so one step after a renewal
    (age 1 -> 2) eta_k is planned at 2^(k + 1) times its value; at age 20, (21/20)^(k + 1)."""
    from gait_ref.linalg import _fewest_next_step
    etas, target = [1e-3, 1e-6, 1e-9], 1.9e-6
    assert _fewest_next_step(etas, target, 0) == 1             # the errors as measured
    assert _fewest_next_step(etas, target, 1) == 2             # 1e-6 x 4 > target >= 1e-9 x 8
    assert _fewest_next_step(etas, target, 20) == 1            # 1e-6 x 1.1 <= target
    assert _fewest_next_step([1e-3, 1e-4], target, 3) == 2     # none reach it: one more
