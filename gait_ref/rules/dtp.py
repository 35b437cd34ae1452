"""Difference target propagation with learned feedback: DTP, SDTP (Bartunov et al. 2018)
and L-DRL feedback training (Ernoult et al. 2022). Any stack of dense, conv, conv-pool
and locally connected layers that read their whole input.

Layers l = 0..L-1; y_l = f_l(layer_l(x_l)), x_l = y_{l-1}. Feedback g_l (l >= 1) maps
layer l's output back to its input (``gait_ref.feedback``). Targets t_l, per sample
(l_n is sample n's loss, so steps do not depend on the batch size or the reduction):

    DTP   t_{L-2} = y_{L-2} - alpha dl_n/dy_{L-2}        (gradient through the last layer only)
    SDTP  t_{L-2} = y_{L-2} - g_{L-1}(p) + g_{L-1}(p + s (onehot - p)), p = softmax of the
          output; s = 1 (Bartunov et al.'s Algorithm 1): t_L = onehot = argmin l_n, no
          gradient anywhere; s < 1 is a control (a partial step toward the label)
    L-DRL t_{L-1} = y_{L-1} - beta dl_n/dy_{L-1}         (logits - beta dCE/dlogits)
          t_{L-2} = y_{L-2} - g_{L-1}(y_{L-1}) + g_{L-1}(t_{L-1})
    then, for all:  t_{l-1} = y_{l-1} - g_l(y_l) + g_l(t_l)   (the difference correction)

Forward updates: the last layer by its task-loss gradient; every other layer by its
local loss sum_n 0.5 ||y_l - t_l||^2 / step (step = alpha for DTP, beta for L-DRL, s for
SDTP), reduced over the batch like the task loss. With exact inverses and small steps
these are BP's gradients.

Feedback training (``feedback_step``), each g_l with the forward weights frozen, noise
e ~ N(0, sigma_l^2) on the layer input, eta ~ N(0, sigma_l^2) on its output:
    denoising (Bartunov)          mean_n || x - g(f(x + e)) ||^2
    noise-preserving (Lee et al.) mean_n || (x + e) - g(f(x + e)) ||^2
    L-DRL (Ernoult et al.)        r = g(f(x)), dr = g(f(x + e)) - r, dr_y = g(f(x) + eta) - r,
                                  mean_n ( -2 e . dr + ||dr_y||^2 );   K_l iterations per
                                  batch, layer by layer; its minimum has J_g = J_f^T.
A feedback layer unpools with the indices of the forward pass that produced its input's
base point: g(f(x + e)) with those of x + e, g(f(x)) and g(f(x) + eta) with those of x.
Every feedback layer has its own optimiser, learning rate, noise and (L-DRL) iteration
count: Adam for DTP/SDTP (Bartunov et al.; beta2 and eps of ``feedback_adam``, shared by
every feedback layer), SGD with momentum for L-DRL (Ernoult et al.).

Noise is drawn on the device from the generator the trainer passes in (keyed by the run
seed and the step). A process holding rows [s, s + n) of a global batch of N rows
(``BatchSlice``) draws the whole (N, ...) noise and keeps its rows, divides batch means
by N and sums the feedback gradients over processes before each feedback update, so any
number of processes computes what one process computes on the whole batch.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_xp, to_device, to_numpy
from ..distributed import BatchSlice
from ..feedback import FORMS, Feedback, jacobian_matching_ratios
from ..optim import SGD, Adam

MODES = ("dtp", "sdtp", "ldrl")
INVERSE_LOSSES = ("denoising", "noise-preserving")


def softmax(z):
    xp = get_xp(z)
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def per_layer(value, n: int, option: str, cast=float) -> list:
    """A scalar for every feedback layer, or a list with one value per feedback layer
    (bottom up: g_1 first)."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return [cast(value[0])] * n
        if len(value) != n:
            raise ValueError(f"{option} has {len(value)} values, but the network has {n} feedback layers "
                             f"(give one value, or {n}: g_1 first)")
        return [cast(v) for v in value]
    return [cast(value)] * n


def _sq_norm_per_sample(d):
    return (d.reshape(d.shape[0], -1) ** 2).sum(axis=1)


class DifferenceTargetProp:
    needs_square = False
    uses_labels = True

    def __init__(self, net, mode: str = "dtp", n_classes: int = 10, seed: int = 0, alpha: float = 0.1,
                 beta: float = 0.1, sigma=0.1, inverse_loss: str = "denoising", feedback_lr=1e-4,
                 ldrl_iters=5, feedback_momentum: float = 0.9, feedback_adam=(0.999, 1e-8),
                 sdtp_step: float = 1.0, feedback_form: str = "bartunov",
                 reduction: str = "mean", linear_top: bool = False):
        if mode not in MODES:
            raise ValueError(f"unknown DTP mode {mode!r}; choose one of {MODES}")
        if inverse_loss not in INVERSE_LOSSES:
            raise ValueError(f"--inverse-loss must be one of {INVERSE_LOSSES}, got {inverse_loss!r}")
        if feedback_form not in FORMS:
            raise ValueError(f"--feedback-form must be one of {FORMS}, got {feedback_form!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if len(net) < 2:
            raise ValueError(f"{mode} needs at least two layers")
        if mode == "sdtp" and tuple(net.out_shape) != (int(n_classes),):
            raise ValueError(f"sdtp: the output layer must have exactly {n_classes} units (one per class), "
                             f"got shape {tuple(net.out_shape)}")
        self.net, self.name, self.K = net, mode, int(n_classes)
        if not 0 < sdtp_step <= 1:
            raise ValueError(f"--sdtp-step must be in (0, 1], got {sdtp_step!r}")
        self.alpha, self.beta, self.inverse_loss, self.reduction = alpha, beta, inverse_loss, reduction
        self.sdtp_step = float(sdtp_step)
        self.feedback_first = mode == "ldrl"
        L = len(net)
        top = L - 1 if mode in ("sdtp", "ldrl") else L - 2
        self.layers_with_feedback = list(range(1, top + 1))
        n_fb = len(self.layers_with_feedback)
        self.sigma = per_layer(sigma, n_fb, "--dtp-sigma")
        self.lrs = per_layer(feedback_lr, n_fb, "--feedback-lr")
        self.iters = per_layer(ldrl_iters, n_fb, "--ldrl-iters", cast=int)
        if any(k < 1 for k in self.iters):
            raise ValueError(f"--ldrl-iters must be >= 1, got {self.iters}")
        W0 = net.layers[0].params["W"]
        xp, dtype = get_xp(W0), W0.dtype
        rng = np.random.default_rng([int(seed), 4])                  # stream 4: feedback weights
        self.fb = [None] * L
        self.opts = [None] * L
        for i, l in enumerate(self.layers_with_feedback):
            # a control (--linear-top-inverse): the top feedback layer without its nonlinearity, g(u) = T_V u + c
            linear = linear_top and l == self.layers_with_feedback[-1]
            self.fb[l] = Feedback(net.layers[l]) if linear else Feedback.of(net, l, feedback_form)
            self.fb[l].init(rng, xp, dtype)
            self.opts[l] = (SGD(lr=self.lrs[i], momentum=feedback_momentum) if mode == "ldrl"
                            else Adam(lr=self.lrs[i], beta2=feedback_adam[0], eps=feedback_adam[1],
                                      eps_placement="tf"))

    # ---- targets and forward updates ----------------------------------------------------------
    def _fb_input(self, l, y):
        """What g_l reads: the layer's output; for SDTP's top feedback, the softmax of the logits."""
        if self.name == "sdtp" and l == len(self.net) - 1:
            return softmax(y)
        return y

    def correct(self, l, tr, t_l, y_l=None):
        """t_{l-1} = y_{l-1} - g_l(y_l) + g_l(t_l), both through the forward pass's pooling indices."""
        y_l = tr.ys[l] if y_l is None else y_l
        g_t, _ = self.fb[l].forward(t_l, tr.caches[l])
        g_y, _ = self.fb[l].forward(y_l, tr.caches[l])
        return tr.xs[l] + (g_t - g_y)

    def _per_sample(self, gy, n_total):
        """dl_n/dy from dL/dy: undo the batch mean (over the global batch of n_total)."""
        return gy * gy.dtype.type(n_total) if self.reduction == "mean" else gy

    def targets(self, tr, gy, labels, batch: BatchSlice | None = None):
        net, L = self.net, len(self.net)
        xp = get_xp(gy)
        batch = BatchSlice.whole(gy.shape[0]) if batch is None else batch
        t = [None] * L
        g_n = self._per_sample(gy, batch.n_total)
        if self.name == "dtp":
            delta = g_n * net.activations[-1].deriv(tr.hs[-1])
            t[L - 2] = tr.ys[L - 2] - net.layers[-1].input_grad(delta, tr.caches[-1]) * gy.dtype.type(self.alpha)
        elif self.name == "sdtp":
            onehot = xp.zeros((gy.shape[0], self.K), dtype=gy.dtype)
            onehot[xp.arange(gy.shape[0]), labels] = 1
            p = self._fb_input(L - 1, tr.ys[-1])
            # s = 1 is the label itself, exactly (p + (onehot - p) rounds away from it)
            top = onehot if self.sdtp_step == 1 else p + (onehot - p) * gy.dtype.type(self.sdtp_step)
            t[L - 2] = self.correct(L - 1, tr, top, p)
        else:
            t[L - 1] = tr.ys[-1] - g_n * gy.dtype.type(self.beta)
            t[L - 2] = self.correct(L - 1, tr, t[L - 1])
        for l in range(L - 2, 0, -1):
            t[l - 1] = self.correct(l, tr, t[l])
        return t

    def compute(self, tr, gy, labels=None, batch: BatchSlice | None = None):
        """Per-layer updates (this process's rows; summed over processes by the caller) and
        info: the mean target distance per layer (0-d device arrays) and, with ``labels``,
        ``target_jump``: each sample's jump ||t_l - y_l|| at the top and bottom hidden layers
        and whether the network classifies it correctly ((N,) device arrays; the training
        step reports their medians on measuring steps)."""
        net, L = self.net, len(self.net)
        xp = get_xp(gy)
        batch = BatchSlice.whole(gy.shape[0]) if batch is None else batch
        t = self.targets(tr, gy, labels, batch)
        step = {"dtp": self.alpha, "sdtp": self.sdtp_step, "ldrl": self.beta}[self.name]
        scale = gy.dtype.type((1.0 / batch.n_total if self.reduction == "mean" else 1.0) / step)
        grads = [None] * L
        grads[-1] = net.layers[-1].param_grads(gy * net.activations[-1].deriv(tr.hs[-1]), tr.caches[-1])
        dist, jump = [0.0] * L, {}
        for l in range(L - 1):
            d = tr.ys[l] - t[l]
            grads[l] = net.layers[l].param_grads(d * net.activations[l].deriv(tr.hs[l]) * scale, tr.caches[l])
            per_sample = xp.sqrt(_sq_norm_per_sample(d))
            dist[l] = per_sample.mean()
            if l in (0, L - 2):
                jump[net.layers[l].name] = per_sample
        info = {"target_distance": dist}
        if labels is not None:
            info["target_jump"] = {**jump, "correct": tr.ys[-1][:, :self.K].argmax(axis=1) == labels}
        return grads, info

    # ---- feedback training -----------------------------------------------------------------------
    def _forward_layer(self, l, x):
        """(what g_l reads at layer input x, the forward cache) with frozen forward weights."""
        h, cache = self.net.layers[l].forward(x)
        return self._fb_input(l, self.net.activations[l].f(h)), cache

    def inverse_loss_grads(self, l, x, e, n_total=None):
        """(loss, grads) of g_l's inverse loss at layer input x with input noise e (same shape);
        the mean is over ``n_total`` rows (default: x's). The loss is a 0-d device array."""
        fb, N = self.fb[l], x.shape[0] if n_total is None else n_total
        u, fcache = self._forward_layer(l, x + e)
        r, gcache = fb.forward(u, fcache)
        diff = r - (x + e if self.inverse_loss == "noise-preserving" else x)
        return (diff ** 2).sum() / N, fb.param_grads(gcache, diff * diff.dtype.type(2.0 / N))

    def ldrl_loss_grads(self, l, x, e, eta, clean=None, n_total=None):
        """(loss, grads) of L-DRL's loss for g_l at layer input x, input noise e, output noise
        eta, averaged over ``n_total`` rows (default: x's). ``clean``: (f_l(x), its forward
        cache), if already known. The loss is a 0-d device array."""
        fb, N = self.fb[l], x.shape[0] if n_total is None else n_total
        u0, c0 = self._forward_layer(l, x) if clean is None else clean
        u1, c1 = self._forward_layer(l, x + e)
        (r0, g0), (r1, g1), (r2, g2) = fb.forward(u0, c0), fb.forward(u1, c1), fb.forward(u0 + eta, c0)
        dr, dr_y = r1 - r0, r2 - r0
        loss = (-2 * (e * dr).sum() + (dr_y ** 2).sum()) / N
        two_n = e.dtype.type(2.0 / N)
        # dloss/dr1 = -2 e / N, dloss/dr2 = 2 dr_y / N, dloss/dr0 = 2 (e - dr_y) / N
        grads = {}
        for gcache, g_r in ((g1, -two_n * e), (g2, two_n * dr_y), (g0, two_n * (e - dr_y))):
            for k, v in fb.param_grads(gcache, g_r).items():
                grads[k] = grads[k] + v if k in grads else v
        return loss, grads

    @staticmethod
    def _noise(rng, sigma, like, batch: BatchSlice):
        """sigma * N(0, 1) shaped like ``like``: this process's rows of a draw for the whole
        global batch, made on the device by ``rng`` (a ``backend.random_generator``)."""
        shape = (batch.n_total,) + tuple(like.shape[1:])
        return rng.standard_normal(shape, dtype=like.dtype)[batch.rows(like.shape[0])] * like.dtype.type(sigma)

    def _update(self, l, grads):
        fb = self.fb[l]
        self.opts[l].step({f"{fb.name}.{k}": fb.params[k] for k in grads},
                          {f"{fb.name}.{k}": grads[k] for k in grads})

    def feedback_step(self, tr, rng, batch: BatchSlice | None = None) -> dict:
        """Train every feedback layer on this batch, forward weights untouched (DTP/SDTP:
        one step each; L-DRL: K_l steps each, layer by layer). ``rng``: a device generator
        (``backend.random_generator``). Returns each layer's last loss, summed over
        processes (0-d device arrays)."""
        batch = BatchSlice.whole(tr.xs[0].shape[0]) if batch is None else batch
        losses = {}
        for i, l in enumerate(self.layers_with_feedback):
            fb, x, sigma = self.fb[l], tr.xs[l], self.sigma[i]
            if self.name == "ldrl":
                clean = (self._fb_input(l, tr.ys[l]), tr.caches[l])   # frozen forward: the trace's pass
                for _ in range(self.iters[i]):
                    e, eta = self._noise(rng, sigma, x, batch), self._noise(rng, sigma, tr.ys[l], batch)
                    loss, g = self.ldrl_loss_grads(l, x, e, eta, clean, n_total=batch.n_total)
                    g = batch.allreduce_dict({**g, "loss": loss})
                    loss = g.pop("loss")
                    self._update(l, g)
            else:
                loss, g = self.inverse_loss_grads(l, x, self._noise(rng, sigma, x, batch), n_total=batch.n_total)
                g = batch.allreduce_dict({**g, "loss": loss})
                loss = g.pop("loss")
                self._update(l, g)
            losses[fb.name] = loss
        return losses

    def parameters(self) -> dict:
        """{'<feedback>.<param>': array} of every feedback layer (the live arrays)."""
        return {f"{self.fb[l].name}.{k}": v for l in self.layers_with_feedback for k, v in self.fb[l].params.items()}

    def jacobian_errors(self, tr, n_samples: int = 8, batch: BatchSlice | None = None) -> dict:
        """||J_g - J_f^T||_F / ||J_f||_F per feedback layer, the mean over the first ``n_samples``
        rows of the global batch (not for SDTP's softmax-reading top). Split over processes,
        each computes its share of those rows and the per-sample terms are gathered."""
        batch = BatchSlice.whole(tr.xs[0].shape[0]) if batch is None else batch
        n_local = tr.xs[0].shape[0]
        rows = slice(0, max(0, min(n_local, n_samples - batch.start)))        # local rows among the first n
        mine = {}
        for l in self.layers_with_feedback:
            if self.name == "sdtp" and l == len(self.net) - 1:
                continue
            mine[self.fb[l].name] = jacobian_matching_ratios(self.net.layers[l], self.net.activations[l], self.fb[l],
                                                             tr.xs[l][rows], first_row=batch.start)
        gathered = batch.comm.allgather_object(mine)
        return {k: float(np.mean([v for part in gathered for v in part[k]])) for k in mine}

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {}
        for l in self.layers_with_feedback:
            fb = self.fb[l]
            state.update({f"param/{fb.name}.{k}": to_numpy(v) for k, v in fb.params.items()})
            state.update({f"opt/{fb.name}/{k}": v for k, v in self.opts[l].state_dict().items()})
        return state

    def load_state_dict(self, state: dict, xp) -> None:
        for l in self.layers_with_feedback:
            fb = self.fb[l]
            for k in fb.params:
                key = f"param/{fb.name}.{k}"
                if key not in state:
                    raise ValueError(f"checkpoint has no {key}: it was written by a different rule or network")
                fb.params[k] = to_device(state[key].astype(fb.params[k].dtype), xp)
            prefix = f"opt/{fb.name}/"
            self.opts[l].load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, xp,
                                         names=[f"{fb.name}.{k}" for k in fb.params])
