"""Target propagation through exact inverses: TP, ITP and GAIT-prop (vanilla, normalized).

One recursion serves all three; they differ only in the incremental factor eps_l
used to step from layer l's output towards its target before inverting:

    t_{l-1} = g_l^-1((1 - eps_l) y_l + eps_l t_l)              (NeurIPS eq. 12, 17)
            = g_l^-1(y_l + eps_l d_l),    d_l = t_l - y_l

    TP          eps_l = 1                                      (eq. 5)
    ITP         eps_l = gamma_l                                (eq. 12)
    GAIT-prop   eps_l = gamma_l * f'(h_l)^2                    (eq. 16)

and every layer's update is the local delta rule on its own target,

    dW_l = y_{l-1}^T ((y_l - t_l) * f'(h_l)) * s_l             (eq. 4, 13, 18)

with s_l = 1 for TP and s_l = prod_{j>l} 1/gamma_j for ITP and GAIT-prop (eq. 21),
so that updates are on BP's scale (with orthogonal W and gamma -> 0, GAIT-prop's
update *is* BP's). The output target is t_L = y_L - dL/dy_L for any loss.

gamma: 'vanilla' uses a fixed gamma_l (default 1e-3). 'normalized' (scaling paper
eq. 5) recomputes it per layer and per sample from the target-activation distance,

    gamma_{l,n} = gamma0 * sqrt(D_l) / ||d_{l,n}||      (reference code: plain L2 norm)

so every layer's nudge has an RMS of about gamma0; the scale s then compounds per
sample. ``norm='squared'`` uses ||d||^2 as the paper's equation prints it, and
``sqrt_dim=False`` drops the sqrt(D_l). A sample with d = 0 contributes no update:
its gamma is set to 1 instead of dividing by zero.

Two target forms, mathematically identical:

* ``absolute`` (the papers' algorithm as written): carry t_l, form
  (1 - eps) y + eps t, invert it with g_l^-1(y) = (f^-1(y) - b) W^-1 (auxiliary units
  from the forward pass) and subtract y_{l-1} for the update. In float32 (1 - eps) y +
  eps t rounds to y once eps |d| < 2^-24 |y|, and the final t - y cancels: the angle
  to BP collapses.
* ``difference`` (its numerically exact implementation): carry d_l = t_l - y_l.
  Since g_l^-1(y_l) = y_{l-1} exactly (the forward input, auxiliary units included),

      d_{l-1} = g_l^-1(y_l + eps_l d_l) - g_l^-1(y_l)
              = [ (f^-1(y_l + eps_l d_l) - f^-1(y_l)) ] W_l^-1        (dense)
              = convT([ ... ], (W_l^-1)^T)                            (square conv)

  The bracket is ``activation.inverse_difference`` (exact piecewise for leaky ReLU:
  eps d / a where no sign change), the bias cancels, and the forward reconstruction
  (including the conv's (R - 1) x overlap term) is subtracted analytically: only the
  linear part ``layer.inverse_delta`` is applied. No two nearly equal numbers are
  ever subtracted, so float32 keeps the angle to BP.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_xp, read_scalars
from ..distributed import BatchSlice
from ..live import widen
from ..kernels import Kernel
from ..linalg import (InverseFailure, RefinedInverse, SingularWeights, SquareInverse, max_corrections, residual_bound,
                      solver_for)

MODES = ("tp", "itp", "gait")
FORMS = ("absolute", "difference")
GAMMAS = ("vanilla", "normalized")


def _per_sample(v, like):
    """(N,) -> (N, 1, ...) broadcastable against ``like``."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _squared_norms(d):
    """(N, ...) -> (N,): each sample's squared norm, read through strides (d is often the live
    channels of a layer's output, a view that ``reshape`` would copy)."""
    axes = "abcdefgh"[:d.ndim - 1]
    return get_xp(d).einsum(f"n{axes},n{axes}->n", d, d)


def _solve_rows(layer, W, n_total: int) -> int:
    """Rows per matrix of the solves through W over the whole batch of ``n_total`` samples:
    a sample's output units (all of them) over the D x D matrices' total width (positions of
    a conv, 1 for a dense layer or a stack of P matrices), times the batch (the same on every
    process)."""
    matrices = W.size // (W.shape[-1] * W.shape[-1])                   # P for a stack, else 1
    return math.prod(layer.out_shape) // (W.shape[-1] * matrices) * n_total


# The recursion's elementwise steps, one fused kernel each on a GPU (gait_ref.kernels).
# eq. 18 with eq. 21's scale: (y_l - t_l) f'(h_l) s_l = (-d) f' s
_SCALED_DELTA = Kernel(lambda xp: lambda d, fp, s: (-d) * fp * s, name="scaled_delta")
# eps_l d_l for GAIT-prop (eq. 16: gamma f'(h_l)^2) and ITP (eq. 12: gamma), per sample
_GAIT_EPS_D = Kernel(lambda xp: lambda g, fp, d: g * fp * fp * d, name="gait_eps_d")
_ITP_EPS_D = Kernel(lambda xp: lambda g, d: g * d, name="itp_eps_d")


def _normalized_gamma(xp, squared: bool):
    """Scaling paper eq. 5: gamma_l = num / ||d_l|| (or / ||d_l||^2), 1 where d_l = 0, from
    the squared norms; and the next scale s_{l-1} = s_l / gamma_l (eq. 21)."""
    def normalized_gamma(sq_norms, s, num, one):
        dist = xp.sqrt(sq_norms)
        denom = dist * dist if squared else dist
        safe = xp.where(denom > 0, denom, one)
        gamma = xp.where(denom > 0, num / safe, one)
        return gamma, s / gamma
    normalized_gamma.__name__ = "normalized_gamma_squared" if squared else "normalized_gamma"
    return normalized_gamma


# the mean target distance, mean_n ||d_{l,n}||, from the squared norms
_MEAN_NORM = Kernel(lambda xp: lambda sq_norms, n: xp.sum(xp.sqrt(sq_norms)) / n, name="mean_norm")


_NORMALIZED_GAMMA = {sq: Kernel(lambda xp, sq=sq: _normalized_gamma(xp, sq), name=f"normalized_gamma_{int(sq)}")
                     for sq in (False, True)}


class TargetRule:
    needs_square = True

    def __init__(self, net, mode: str = "gait", gamma: float = 1e-3, gamma_mode: str = "vanilla",
                 form: str = "difference", norm: str = "l2", sqrt_dim: bool = True, solver: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"unknown target mode {mode!r}; choose one of {MODES}")
        if form not in FORMS:
            raise ValueError(f"unknown target form {form!r}; choose one of {FORMS}")
        if gamma_mode not in GAMMAS:
            raise ValueError(f"unknown gamma mode {gamma_mode!r}; choose one of {GAMMAS}")
        if norm not in ("l2", "squared"):
            raise ValueError(f"norm must be 'l2' or 'squared', got {norm!r}")
        if mode != "tp" and not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        net.check_invertible(first=1)
        self.net, self.mode, self.gamma, self.gamma_mode = net, mode, float(gamma), gamma_mode
        self.form, self.norm, self.sqrt_dim = form, norm, sqrt_dim
        self.name = mode
        solver_for(solver, np.float32)                              # a clear error for an unknown name
        self.solver = solver
        self.refined = [RefinedInverse() for _ in net.layers]       # used by the refine solver
        self.stats = {"steps": 0, "recursions": 0, "solves": 0, "corrections": 0}   # refine, for benchmarks

    # ---- the incremental factor ------------------------------------------------------------
    def _gamma(self, d, sq_norms, size: int, s):
        """(gamma_l, s_l / gamma_l): gamma_l a float (vanilla) or an (N,) array (normalized,
        scaling paper eq. 5); ``sq_norms`` is (N,) ||d_{l,n}||^2, ``size`` is D_l, all units
        of the layer (auxiliary ones included); ``s`` the scale s_l (eq. 21, unchanged for TP)."""
        if self.gamma_mode == "vanilla":
            return self.gamma, (s if self.mode == "tp" else s / self.gamma)
        num = self.gamma * (math.sqrt(size) if self.sqrt_dim else 1.0)
        one = d.dtype.type(1)
        gamma, scaled = _NORMALIZED_GAMMA[self.norm == "squared"](sq_norms, s, d.dtype.type(num), one)   # d = 0: 1
        return gamma, (s if self.mode == "tp" else scaled)

    def _eps(self, gamma, fp):
        """eps_l: 1 (TP), gamma (ITP, eq. 12) or gamma f'(h_l)^2 (GAIT-prop, eq. 16)."""
        if self.mode == "tp":
            return 1
        g = gamma if isinstance(gamma, float) else _per_sample(gamma, fp)
        return g * fp * fp if self.mode == "gait" else g

    def _eps_times(self, gamma, fp, d):
        """eps_l d_l (``_eps``) in one kernel."""
        if self.mode == "tp":
            return d
        g = d.dtype.type(gamma) if isinstance(gamma, float) else _per_sample(gamma, fp)
        return _GAIT_EPS_D(g, fp, d) if self.mode == "gait" else _ITP_EPS_D(g, d)

    # ---- the recursion -----------------------------------------------------------------------
    def compute(self, tr, gy, labels=None, batch: BatchSlice | None = None):
        """Per-layer updates on BP's scale, and info (mean target distance per layer, as 0-d
        device arrays).

        ``lu`` solver: each square layer is factorised when the recursion reaches it, so one
        factorisation is alive at a time, and nothing is read from the device. ``refine``:
        every solve's backward error is checked against ``residual_bound`` with one read
        for the whole recursion (summed over processes, so every process decides alike); if a
        layer missed it, that layer's solver is strengthened and the recursion runs again.
        Both leave ``info["inverse_norms"]``: per square layer, the device scalars that bound
        cond(W) from below (``linalg.solve_amplifies_past``), which the training step checks
        with its finiteness checks (a nearly singular W makes a huge but finite x). A layer
        whose inverse cannot be computed raises ``InverseFailure`` naming it."""
        if solver_for(self.solver, gy.dtype) == "lu":
            ops = {}

            def fresh_op(l, W, live):
                ops[l] = SquareInverse(W)
                return ops[l]
            try:
                grads, info = self._recursion(tr, gy, fresh_op)
            except np.linalg.LinAlgError as e:         # numpy's LU met an exactly zero pivot
                # the recursion runs top down: the solve that failed is the lowest layer reached
                raise InverseFailure(f"layer {self.net.layers[min(ops)].name}: {e}; the weights are singular"
                                     ) from None
            info["inverse_norms"] = {self.net.layers[l].name: ops[l].sq for l in sorted(ops)}
            return grads, info
        batch = BatchSlice.whole(gy.shape[0]) if batch is None else batch
        bound = residual_bound(gy.dtype)
        # a miss adds the corrections predicted, then fresh inverses and one correction at a time
        for attempt in range(3 + max_corrections(gy.dtype)):
            ops = {}

            def make_op(l, W, live):
                rows = _solve_rows(self.net.layers[l], W, batch.n_total)
                ops[l] = self.refined[l].operator(W, rows, retry=attempt > 0, live=live)
                return ops[l]
            grads, info = self._recursion(tr, gy, make_op)
            layers = sorted(ops)
            sq = read_scalars(batch.comm.allreduce_sum([v for l in layers for v in ops[l].sq]))   # one read
            etas, ok, pos = {}, [], 0
            for l in layers:
                n = len(ops[l].sq)
                try:
                    ok.append(self.refined[l].check(sq[pos:pos + n], bound, self.net.layers[l].params["W"],
                                                    batch.comm.size))
                except SingularWeights as e:
                    hint = " (try --dtype float64)" if np.dtype(gy.dtype) == np.float32 else ""
                    raise InverseFailure(f"layer {self.net.layers[l].name}: {e}; the exact inverse does not "
                                         f"exist in this dtype{hint}") from None
                etas[l] = self.refined[l].etas
                pos += n
            self.stats["recursions"] += 1
            self.stats["solves"] += len(layers)
            self.stats["corrections"] += sum(len(etas[l]) - 1 for l in layers)
            if all(ok):
                self.stats["steps"] += 1
                for l in layers:
                    self.refined[l].settle(self.net.layers[l].params["W"])
                info["solve_residual"] = {self.net.layers[l].name: etas[l][-1] for l in layers}
                info["inverse_norms"] = {self.net.layers[l].name: ops[l].sq[:3] for l in layers}
                return grads, info
        last = {l: e[-1] for l, e in etas.items()}
        worst = max(last, key=last.get)
        raise InverseFailure(f"layer {self.net.layers[worst].name}: the exact inverse reaches a backward error "
                              f"of {last[worst]:.2e}, not the {bound:.1e} required, even from a fresh inverse (the "
                              "layer is too ill-conditioned for this dtype, about 1/eps; try --dtype float64)")

    # ---- checkpoints: the refinement state, so that a resumed run solves exactly as before -------
    def state_dict(self) -> dict:
        state = {}
        for l, r in enumerate(self.refined):
            state.update(r.state_dict(f"inverse/{l}/"))
        return state

    def load_state_dict(self, state: dict, xp) -> None:
        self.refined = [RefinedInverse() for _ in self.net.layers]     # nothing kept from before the load
        for l, r in enumerate(self.refined):
            r.load_state_dict(state, f"inverse/{l}/", xp)

    @property
    def takes_narrow_output_grad(self) -> bool:
        """Whether ``compute`` takes dL/dy_L holding only the output units the loss reads,
        and a forward pass of only the channels read (``TrainStep``): the difference form,
        whose d and every array made from it hold only those, and which reads only those of
        the forward values; the absolute form inverts whole outputs."""
        return self.form == "difference"

    def _live_channels(self, gy) -> list:
        """Per layer, the leading output channels that carry d in the difference form: those
        read above (``Network.read_widths``), at a dense top the units gy holds; the absolute
        form carries whole targets (None: all)."""
        if self.form != "difference":
            return [None] * len(self.net)
        return self.net.read_widths(top=gy.shape[1])

    def _recursion(self, tr, gy, make_op):
        """The target recursion (see the module docstring); ``make_op(l, W, live)`` gives
        layer l's solver for this step, whose right-hand sides hold ``live`` columns (None:
        all)."""
        net = self.net
        xp = get_xp(gy)
        L = len(net)
        grads, dist = [None] * L, [None] * L
        yL = tr.ys[-1]
        # difference form: d_l holds only the channels the layer above reads (its auxiliary
        # units' targets are their forward values, d = 0 there), and so does every array
        # made from it; the layers' GEMMs run on those channels (gait_ref.live). d_L holds
        # the output units gy holds: those the loss reads, where TrainStep narrows it.
        live = self._live_channels(gy)
        if self.form == "absolute" and gy.shape[1] < yL.shape[1]:
            gy = widen(gy, yL.shape[1])                   # whole targets: the loss's zeros written out
        d = -gy                                   # d_L = t_L - y_L = -dL/dy_L
        t = yL - gy if self.form == "absolute" else None
        s = xp.ones(yL.shape[0], dtype=yL.dtype)  # the per-sample scale s_l
        for l in range(L - 1, -1, -1):
            layer, f, c = net.layers[l], net.activations[l], live[l]
            y, h = (tr.ys[l], tr.hs[l]) if c is None else (tr.ys[l][:, :c], tr.hs[l][:, :c])
            fp = f.deriv(h)
            # eq. 18: dW_l = y_{l-1}^T ((y_l - t_l) * f'(h_l)), times s_l (eq. 21)
            grads[l] = layer.param_grads(_SCALED_DELTA(d, fp, _per_sample(s, d)), tr.caches[l])
            sq_norms = _squared_norms(d)                                     # (N,) ||d_{l,n}||^2
            dist[l] = _MEAN_NORM(sq_norms, d.dtype.type(d.shape[0]))         # 0-d, on the device
            if l == 0:
                break
            # s_{l-1} = s_l / gamma_l (eq. 21), made with gamma, used from the next layer down
            gamma, s_next = self._gamma(d, sq_norms, math.prod(layer.out_shape), s)
            op = make_op(l, layer.params["W"], c)
            if self.form == "difference":
                # d_{l-1} = (f^-1(y + eps d) - f^-1(y)) W^-1, exactly
                d = layer.inverse_delta(f.inverse_difference(y, self._eps_times(gamma, fp, d)), tr.caches[l], op,
                                        read_only=live[l - 1] is not None)
            else:
                # t_{l-1} = g_l^-1((1 - eps) y + eps t), eq. 17
                eps = self._eps(gamma, fp)
                t = net.invert_layer(l, (1 - eps) * y + eps * t, tr, op)
                d = t - tr.ys[l - 1]
            s = s_next
        return grads, {"target_distance": dist}
