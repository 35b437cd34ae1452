"""The exact-inverse solvers: fresh LU, and refinement from a kept inverse with the
residual bound as a hard guarantee."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gait_ref.linalg import MAX_CORRECTIONS, RefinedInverse, SquareInverse, residual_bound, solver_for
from gait_ref.rules import make_rule

from .conftest import asnumpy
from .helpers import rand
from .test_rules import setup


def _rel64(B, x, W):
    B, x, W = (asnumpy(a).astype(np.float64) for a in (B, x, W))
    return np.linalg.norm(B - x @ W) / np.linalg.norm(B)


def refined_solve(state, W, B):
    """What the target rule does: solve, check every residual, strengthen and retry."""
    bound = residual_bound(B.dtype)
    for _ in range(2 + MAX_CORRECTIONS):
        op = state.operator(W)
        x = op.right_solve(B)
        b2, *r2 = [float(v) for v in op.sq]
        if state.check([np.sqrt(v / b2) for v in r2], bound, W):
            state.settle(W)
            return x
    raise AssertionError("no convergence")


@given(D=st.integers(2, 40), M=st.integers(1, 30), drift=st.sampled_from([0.0, 1e-4, 1e-3, 1e-2, 0.05]),
       seed=st.integers(0, 10**6), dtype=st.sampled_from([np.float32, np.float64]))
def test_every_refined_solve_meets_the_bound(xp, D, M, drift, seed, dtype):
    """An inverse kept from earlier weights, the weights moved by ``drift``: the solve's
    relative residual, recomputed in float64, is below the bound."""
    rng = np.random.default_rng(seed)
    W0 = np.linalg.qr(rng.standard_normal((D, D)))[0] + 0.2 * rng.standard_normal((D, D)) / np.sqrt(D)
    state = RefinedInverse()
    state.refresh(xp.asarray(W0.astype(dtype)))                  # the inverse of the earlier weights
    W = xp.asarray((W0 + drift * rng.standard_normal((D, D)) / np.sqrt(D)).astype(dtype))
    for _ in range(3):                                            # reuse over several solves
        B = rand(rng, (M, D), xp, dtype)
        x = refined_solve(state, W, B)
        assert _rel64(B, x, W) <= residual_bound(dtype) * 1.01


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
    every step's solves (logged with --angles-every 1) meet the bound, while the kept
    inverses go stale and are corrected, and refreshed when needed."""
    import json

    from gait_ref.config import Config
    from gait_ref.train import Trainer
    t = Trainer(Config(task="fashion-mnist", arch="mlp-shallow", rule="gait", batch_size=64, max_steps=40,
                       angles_every=1, eval_subset=100, quiet=True, out=str(tmp_path)))
    t.run()
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    res = [r["solve_residual"] for r in recs if "solve_residual" in r]
    assert len(res) == 40 and max(max(r.values()) for r in res) <= residual_bound(np.float32)
    st_ = t.rule.stats
    assert st_["steps"] == 40 and st_["corrections"] > 0
    assert max(r["angles_deg"]["fc2"] for r in recs if "angles_deg" in r) < 5


def test_solver_choice():
    assert solver_for("auto", np.float32) == "refine" and solver_for("auto", np.float64) == "lu"
    with pytest.raises(ValueError, match="--inverse-solver must be one of"):
        solver_for("qr", np.float32)
