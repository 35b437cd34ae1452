"""One training step, on the device: forward pass -> loss and dL/dy_L -> the rule's updates
(on BP's scale) -> summed over processes -> plus the orthogonality regulariser's gradient
(every step, or every K steps with weight K lambda) -> checks -> the optimiser.

The step reads nothing from the device. It returns device scalars (the batch's summed
loss and correct count) and one device vector of checks (finiteness, and with
``cond_max`` that no exact inverse shows its layer's cond(W) past it), which the training
loop reads when it chooses (one read per step, a step late, so the host never waits for
the device in the middle of a step). On measuring steps (``measure=True``) it also
compares the rule's updates with BP's on the same forward pass; those are read at once
(a measuring step is a logging step).

Data parallelism is one call: every array the step sums over processes (the updates,
the loss and correct counts, per layer a flag for a non-finite output, the norms of
every exact inverse's right-hand sides and solutions, and on
measuring steps BP's updates and the target distances) goes through one
``comm.allreduce_sum``; with one process it is the identity. The regulariser depends
only on the (replicated) weights, so it is added after the sum, once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backend import get_xp, random_generator, read_scalars, to_numpy
from .checkpoint import restore_params
from .distributed import LOCAL, BatchSlice
from .kernels import Kernel
from .linalg import solve_amplifies_past
from .metrics import compare_updates
from .orthogonality import add_ortho_grads
from .rules.bp import BP

NOISE_STREAM = 5      # random_generator key [seed, NOISE_STREAM, step]: learned-feedback noise


def topk_correct(logits, labels, k: int):
    """How many rows have their label among the k largest logits (a 0-d device array): the
    label's rank, the number of logits above the label's, is below k (ties count for the
    label). Elementwise work and reductions only: CuPy's argpartition ends in
    unravel_index, which reads the device twice to check its indices (host syncs)."""
    xp = get_xp(logits, labels)
    own = xp.take_along_axis(logits, labels[:, None].astype(xp.int64), axis=1)      # (N, 1)
    return ((logits > own).sum(axis=1) < k).sum()


def target_jumps(jump: dict, batch: BatchSlice) -> dict:
    """Per layer, the median jump ||t_l - y_l|| over the global batch's correctly classified
    samples and over the others (None where there are none), from the rule's per-sample
    ``target_jump`` (``correct``: the samples' mask). Measuring steps only: it reads the
    samples' values and gathers them from every process."""
    mine = {k: to_numpy(v) for k, v in jump.items()}
    gathered = batch.comm.allgather_object(mine)
    every = {k: np.concatenate([part[k] for part in gathered]) for k in mine}
    correct = every.pop("correct").astype(bool)

    def median(v):
        return float(np.median(v)) if len(v) else None
    return {name: {"correct": median(v[correct]), "wrong": median(v[~correct])} for name, v in every.items()}


@dataclass
class StepResult:
    """What one step leaves for the loop (device arrays unless said otherwise)."""

    loss_sum: object          # sum over the global batch of the per-sample losses, 0-d
    correct: object           # top-1 correct over the global batch, 0-d
    n: int                    # global batch size (host)
    checks: object            # (K,) in the step's dtype: nonzero where a check failed
    check_names: list         # what each check's failure means, as a phrase (host)
    feedback_loss: dict = field(default_factory=dict)   # learned feedback: {layer: 0-d}
    measured: dict = field(default_factory=dict)        # measuring steps: host values

    def first_failure(self, failed) -> str | None:
        """The first failed check's name, given the host copy of ``checks``."""
        bad = [name for name, f in zip(self.check_names, failed) if f != 0]
        return bad[0] if bad else None


# One fused kernel each (gait_ref.kernels): 1.0 (in the dtype of ``zero``) where ``a`` holds a
# non-finite entry, else 0.0; 1.0 where a solve shows its weights (nearly) singular.
NONFINITE = Kernel(lambda xp: lambda a, zero: xp.any(~xp.isfinite(a)) + zero, name="nonfinite")
AMPLIFIES = Kernel(lambda xp: lambda w2, b2, x2, cond_max, zero: solve_amplifies_past([w2, b2, x2], cond_max) + zero,
                   name="amplifies")


def output_grad_read(loss, gy):
    """dL/dy on the output units the loss reads. A square output layer has auxiliary units:
    the losses read only the first K = ``loss.n_classes`` outputs, so dL/dy is zero on the
    rest, and the rules that take it narrow (``takes_narrow_output_grad``: BP, FA, the target
    rules' difference form) run the output layer's backward GEMMs on those K columns. gy
    itself for a loss without ``n_classes`` (it may read every output)."""
    K = getattr(loss, "n_classes", None)
    return gy[:, :K] if K is not None and gy.ndim == 2 and K < gy.shape[1] else gy


def forward_widths(net, loss, rule):
    """The forward pass ``rule`` needs (``Network.forward``'s widths): for the rules that
    take dL/dy narrow (``takes_narrow_output_grad``: BP, FA, the target rules' difference
    form), which read only the channels read above them, those channels and the loss's K
    classes at the top (``Network.read_widths``); for the others, every channel (None)."""
    if not getattr(rule, "takes_narrow_output_grad", False):
        return None
    return net.read_widths(top=getattr(loss, "n_classes", None))


class TrainStep:
    def __init__(self, net, loss, rule, opt, *, ortho_lambda: float = 0.0, ortho_form: str = "full",
                 ortho_every: int = 1, schedule: str = "parallel", seed: int = 0, comm=LOCAL,
                 cond_max: float | None = None):
        self.net, self.loss, self.rule, self.opt, self.comm = net, loss, rule, opt, comm
        self.cond_max = cond_max       # exact inverses: stop where a solve shows cond(W) past it (None: no check)
        self.ortho_lambda, self.ortho_form, self.schedule, self.seed = ortho_lambda, ortho_form, schedule, seed
        self.ortho_every = int(ortho_every)
        self.bp = BP(net)
        self.widths = forward_widths(net, loss, rule)
        self.learned_feedback = hasattr(rule, "feedback_step")

    def phases(self, epoch: int):
        """(train the forward weights, train the feedback weights) in ``epoch``: both every
        batch, or (alternating schedule) feedback in even epochs, forward in odd ones."""
        if not self.learned_feedback:
            return True, False
        alternating = self.schedule == "alternating"
        return not alternating or epoch % 2 == 1, not alternating or epoch % 2 == 0

    def parameters(self) -> dict:
        """Every trained array: the network's, then the learned feedback layers'."""
        return {**self.net.parameters(), **(self.rule.parameters() if self.learned_feedback else {})}

    def state(self) -> tuple[dict, dict]:
        """(the network's parameters, the optimiser's state with the rule's under ``rule/``:
        learned feedback layers and their optimisers, kept inverses), as a checkpoint holds them."""
        state = self.opt.state_dict()
        if hasattr(self.rule, "state_dict"):
            state.update({f"rule/{k}": v for k, v in self.rule.state_dict().items()})
        return self.net.parameters(), state

    def load(self, params: dict, state: dict, xp) -> None:
        """Continue from ``state()``'s two dicts (as numpy arrays, from a checkpoint)."""
        restore_params(self.net, params, xp)
        self.opt.load_state_dict({k: v for k, v in state.items() if not k.startswith("rule/")}, xp,
                                 names=list(self.net.parameters()))
        if hasattr(self.rule, "load_state_dict"):
            self.rule.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("rule/")}, xp)

    def __call__(self, x, y, *, step: int, epoch: int, n_total: int | None = None, start: int = 0,
                 measure: bool = False) -> StepResult:
        """Train on this process's rows [start, start + len(x)) of a global batch of
        ``n_total`` rows (default: x is the whole batch)."""
        net, xp = self.net, get_xp(x)
        n_total = x.shape[0] if n_total is None else int(n_total)
        batch = BatchSlice(n_total, start, self.comm)
        tr = net.forward(x, self.widths)
        loss, gy = self.loss.value_and_grad(tr.output, y, n_total)
        gy_read = output_grad_read(self.loss, gy)
        if getattr(self.rule, "takes_narrow_output_grad", False):
            gy = gy_read
        train_forward, train_feedback = self.phases(epoch)
        grads, info, fb_loss = None, {}, {}
        if self.learned_feedback:
            rng = random_generator(xp, [self.seed, NOISE_STREAM, step])
            if train_feedback and self.rule.feedback_first:        # L-DRL: feedback first, forward frozen
                fb_loss = self.rule.feedback_step(tr, rng, batch)
            if train_forward or measure:                            # not needed in a feedback-only epoch
                grads, info = self.rule.compute(tr, gy, labels=y, batch=batch)
            if train_feedback and not self.rule.feedback_first:    # DTP/SDTP: targets, then inverses
                fb_loss = self.rule.feedback_step(tr, rng, batch)
        else:
            grads, info = self.rule.compute(tr, gy, labels=y, batch=batch)

        # ---- one sum over processes ---------------------------------------------------------------
        dtype = tr.output.dtype
        per_sample = n_total if self.loss.reduction == "mean" else 1
        stats = [(loss * per_sample).astype(dtype), topk_correct(self.loss.logits(tr.output), y, 1).astype(dtype)]
        # per layer, 1 where its output holds a non-finite entry (summed: the processes where it
        # does); ``any`` rather than counting the entries, a third of the time on conv7's outputs
        zero = dtype.type(0)
        stats += [NONFINITE(v, zero) for v in tr.ys]
        # exact inverses: ||B||^2 and ||x||^2 of every solve, summed over processes like the rows
        inverse = info.get("inverse_norms", {}) if self.cond_max else {}
        stats += [v.astype(dtype, copy=False) for sq in inverse.values() for v in sq[1:3]]
        keys = [(l, k) for l, g in enumerate(grads) for k in sorted(g)] if grads is not None else []
        arrays = [grads[l][k] for l, k in keys] + stats
        if measure:
            bp_grads, _ = self.bp.compute(tr, gy_read)
            dist = info.get("target_distance", [])
            arrays += [bp_grads[l][k] for l, k in keys] + [xp.full((), d, dtype=dtype) if isinstance(d, float)
                                                           else d.astype(dtype) for d in dist]
        summed = self.comm.allreduce_sum(arrays)
        for (l, k), g in zip(keys, summed):
            grads[l][k] = g
        loss_sum, correct, *rest = summed[len(keys):len(keys) + len(stats)]
        y_bad, solved = rest[:len(tr.ys)], rest[len(tr.ys):]

        # the first layer whose output went non-finite names the cause of a non-finite loss
        checks = list(y_bad) + [NONFINITE(loss_sum, zero)]
        names = [f"the output of layer {layer.name} is not finite" for layer in net.layers] + ["the loss is not finite"]
        # a (nearly) singular square layer: its solve is finite but huge (linalg.solve_amplifies_past)
        for i, (name, sq) in enumerate(inverse.items()):
            checks.append(AMPLIFIES(sq[0].astype(dtype, copy=False), *solved[2 * i:2 * i + 2], dtype.type(self.cond_max),
                                    zero))
            names.append(f"layer {name}'s exact inverse amplifies by more than cond_max = {self.cond_max:g}, "
                         "so its weights are (nearly) singular")
        measured = self._measure(tr, grads, bp_grads, summed[len(keys) + len(stats):], keys, batch) if measure else {}
        if measure and "solve_residual" in info:
            measured["solve_residual"] = info["solve_residual"]
        if measure and "target_jump" in info:
            measured["target_jump"] = target_jumps(info["target_jump"], batch)

        if train_forward:
            # lazy regularisation (--ortho-every K): the penalty's gradient at steps K, 2K, ...
            # with weight K lambda, so that it weighs the same on average (StyleGAN2's lazy R1)
            if step % self.ortho_every == 0:
                add_ortho_grads(net, grads, self.ortho_lambda * self.ortho_every, self.ortho_form)
            flat = {f"{net.layers[l].name}.{k}": grads[l][k] for l, k in keys}
            checks += [NONFINITE(g, zero) for g in flat.values()]
            names += [f"the update of {name} is not finite" for name in flat]
            self.opt.step(net.parameters(), flat)
        params = self.parameters()
        checks += [NONFINITE(p, zero) for p in params.values()]
        names += [f"the weights {name} after the step is not finite" for name in params]
        return StepResult(loss_sum, correct, n_total, xp.stack(checks), names, fb_loss, measured)

    def _measure(self, tr, grads, bp_grads, rest, keys, batch) -> dict:
        """Angles to BP, norm ratios, target distances and (learned feedback) Jacobian-matching
        errors, as host values; ``rest`` holds the summed BP updates, then the distances."""
        net = self.net
        for (l, k), g in zip(keys, rest):
            bp_grads[l][k] = g
        cmp = compare_updates(net, grads, bp_grads)
        out = {"angles_deg": {k: v["angle_deg"] for k, v in cmp.items()},
               "norm_ratio": {k: v["norm_ratio"] for k, v in cmp.items()}}
        dist = rest[len(keys):]
        if dist:                                    # per-rank means of equal shares: average them
            vals = read_scalars(dist)
            out["target_distance"] = {layer.name: v / self.comm.size for layer, v in zip(net.layers, vals)}
        if self.learned_feedback:                   # on the first samples of the global batch
            out["jacobian_error"] = self.rule.jacobian_errors(tr, batch=batch)
        return out
