"""Difference target propagation with learned feedback: DTP, SDTP (Bartunov et al. 2018)
and L-DRL feedback training (Ernoult et al. 2022). Dense networks.

Layers l = 0..L-1; y_l = f_l(x_l W_l + b_l), x_l = y_{l-1}. Feedback g_l (l >= 1) maps
layer l's output back to its input (``gait_ref.feedback``). Targets t_l:

    DTP   t_{L-2} = y_{L-2} - alpha dL/dy_{L-2}          (gradient through the last layer only)
    SDTP  t_{L-2} = y_{L-2} - g_{L-1}(p) + g_{L-1}(onehot), p = softmax of the output:
                                                          t_L = argmin L, no gradient anywhere
    L-DRL t_{L-1} = y_{L-1} - beta dL/dy_{L-1}            (logits - beta dCE/dlogits)
          t_{L-2} = y_{L-2} - g_{L-1}(y_{L-1}) + g_{L-1}(t_{L-1})
    then, for all:  t_{l-1} = y_{l-1} - g_l(y_l) + g_l(t_l)   (the difference correction)

Forward updates: the last layer by its task-loss gradient; every other layer by its
local loss 0.5 ||y_l - t_l||^2, i.e. dW_l = x_l^T ((y_l - t_l) * f'(h_l)), divided by
alpha (DTP) or beta (L-DRL) so that updates are on the gradient's scale.

Feedback training (``feedback_step``), each g_l with the forward weights frozen:
    denoising (Bartunov)          mean_n || x_l - g_l(f_l(x_l + e)) ||^2,          e ~ N(0, s^2)
    noise-preserving (Lee et al.) mean_n || (x_l + e) - g_l(f_l(x_l + e)) ||^2
    L-DRL (Ernoult et al.)        r = g(f(x)), dr = g(f(x + e)) - r, dr_y = g(f(x) + eta) - r,
                                  mean_n ( -2 e . dr + ||dr_y||^2 ),  K iterations per batch,
                                  SGD with momentum; its minimum has J_g = J_f^T.
Adam trains the DTP/SDTP feedback (as Bartunov et al.), SGD with momentum L-DRL's.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_xp, to_device
from ..feedback import DenseFeedback, jacobian_matching_error
from ..optim import SGD, Adam

MODES = ("dtp", "sdtp", "ldrl")
INVERSE_LOSSES = ("denoising", "noise-preserving")


def softmax(z):
    xp = get_xp(z)
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class DifferenceTargetProp:
    needs_square = False
    uses_labels = True

    def __init__(self, net, mode: str = "dtp", n_classes: int = 10, seed: int = 0, alpha: float = 0.1,
                 beta: float = 0.1, sigma: float = 0.1, inverse_loss: str = "denoising",
                 feedback_lr: float = 1e-4, ldrl_iters: int = 5, ldrl_momentum: float = 0.9):
        if mode not in MODES:
            raise ValueError(f"unknown DTP mode {mode!r}; choose one of {MODES}")
        if inverse_loss not in INVERSE_LOSSES:
            raise ValueError(f"--inverse-loss must be one of {INVERSE_LOSSES}, got {inverse_loss!r}")
        for layer in net.layers:
            if layer.kind != "dense":
                raise ValueError(f"{mode}: layer {layer.name} is {layer.kind}; learned feedback is "
                                 "implemented for dense layers only so far")
        if len(net) < 2:
            raise ValueError(f"{mode} needs at least two layers")
        self.net, self.name, self.K = net, mode, int(n_classes)
        self.alpha, self.beta, self.sigma, self.inverse_loss = alpha, beta, sigma, inverse_loss
        self.ldrl_iters = int(ldrl_iters)
        self.feedback_first = mode == "ldrl"
        W0 = net.layers[0].params["W"]
        xp, dtype = get_xp(W0), W0.dtype
        rng = np.random.default_rng([int(seed), 4])                  # stream 4: feedback weights
        top = len(net) - 1 if mode in ("sdtp", "ldrl") else len(net) - 2
        self.fb = [None] * len(net)
        for l in range(1, top + 1):
            layer = net.layers[l]
            n_out = self.K if (mode == "sdtp" and l == len(net) - 1) else layer.n_out
            self.fb[l] = DenseFeedback(n_out, layer.n_read, net.activations[l - 1], f"g_{layer.name}")
            self.fb[l].init(rng, xp, dtype)
        self.opt = (SGD(lr=feedback_lr, momentum=ldrl_momentum) if mode == "ldrl"
                    else Adam(lr=feedback_lr, eps_placement="tf"))

    # ---- targets and forward updates ----------------------------------------------------------
    def _fb_input(self, l, y):
        """What g_l reads: the layer's output; for SDTP's top feedback, the softmax of the logits."""
        if self.name == "sdtp" and l == len(self.net) - 1:
            return softmax(y[:, :self.K])
        return y

    def correct(self, l, tr, t_l, y_l=None):
        """t_{l-1} = y_{l-1} - g_l(y_l) + g_l(t_l) on the units layer l reads; the others keep y."""
        y_l = tr.ys[l] if y_l is None else y_l
        g_t, _ = self.fb[l].forward(t_l)
        g_y, _ = self.fb[l].forward(y_l)
        t = tr.xs[l].reshape(tr.xs[l].shape[0], -1).copy()
        t[:, :self.fb[l].n_read] += g_t - g_y
        return t

    def targets(self, tr, gy, labels):
        net, L = self.net, len(self.net)
        xp = get_xp(gy)
        t = [None] * L
        if self.name == "dtp":
            delta = gy * net.activations[-1].deriv(tr.hs[-1])
            gx = net.layers[-1].input_grad(delta, tr.caches[-1]).reshape(gy.shape[0], -1)
            t[L - 2] = tr.ys[L - 2] - self.alpha * gx
        elif self.name == "sdtp":
            onehot = xp.zeros((gy.shape[0], self.K), dtype=gy.dtype)
            onehot[xp.arange(gy.shape[0]), labels] = 1
            t[L - 2] = self.correct(L - 1, tr, onehot, self._fb_input(L - 1, tr.ys[-1]))
        else:
            t[L - 1] = tr.ys[-1] - self.beta * gy
            t[L - 2] = self.correct(L - 1, tr, t[L - 1])
        for l in range(L - 2, 0, -1):
            t[l - 1] = self.correct(l, tr, t[l])
        return t

    def compute(self, tr, gy, labels=None):
        net, L = self.net, len(self.net)
        xp = get_xp(gy)
        t = self.targets(tr, gy, labels)
        scale = {"dtp": 1 / self.alpha, "sdtp": 1.0, "ldrl": 1 / self.beta}[self.name]
        grads = [None] * L
        grads[-1] = net.layers[-1].param_grads(gy * net.activations[-1].deriv(tr.hs[-1]), tr.caches[-1])
        dist = [0.0] * L
        for l in range(L - 1):
            d = tr.ys[l] - t[l]
            grads[l] = net.layers[l].param_grads(d * net.activations[l].deriv(tr.hs[l]) * d.dtype.type(scale),
                                                 tr.caches[l])
            dist[l] = float(xp.sqrt((d ** 2).sum(axis=1)).mean())
        return grads, {"target_distance": dist}

    # ---- feedback training -----------------------------------------------------------------------
    def _forward_layer(self, l, x):
        layer, f = self.net.layers[l], self.net.activations[l]
        return self._fb_input(l, f.f(layer.forward(x)[0]))

    def inverse_loss_grads(self, l, x, e):
        """(loss, grads) of g_l's inverse loss at layer input x (N, n_in) with noise e (N, R)."""
        fb = self.fb[l]
        R = fb.n_read
        xn = x.copy()
        xn[:, :R] += e
        u = self._forward_layer(l, xn)
        r, z = fb.forward(u)
        target = x[:, :R] + (e if self.inverse_loss == "noise-preserving" else 0)
        diff = r - target
        N = x.shape[0]
        return float((diff ** 2).sum()) / N, fb.param_grads(u, z, 2 * diff / N)

    def ldrl_loss_grads(self, l, x, e, eta, u0=None):
        """(loss, grads) of L-DRL's loss for g_l at layer input x, input noise e (N, R),
        output noise eta (N, O). ``u0``: the clean f_l(x), if already known."""
        fb = self.fb[l]
        R, N = fb.n_read, x.shape[0]
        u0 = self._forward_layer(l, x) if u0 is None else u0
        xn = x.copy()
        xn[:, :R] += e
        u1 = self._forward_layer(l, xn)
        u2 = u0 + eta
        (r0, z0), (r1, z1), (r2, z2) = fb.forward(u0), fb.forward(u1), fb.forward(u2)
        dr, dr_y = r1 - r0, r2 - r0
        loss = float((-2 * (e * dr).sum() + (dr_y ** 2).sum())) / N
        # dloss/dr1 = -2 e / N, dloss/dr2 = 2 dr_y / N, dloss/dr0 = (2 e - 2 dr_y) / N
        grads = {}
        for u, z, g in ((u1, z1, -2 * e / N), (u2, z2, 2 * dr_y / N), (u0, z0, (2 * e - 2 * dr_y) / N)):
            for k, v in fb.param_grads(u, z, g).items():
                grads[k] = grads[k] + v if k in grads else v
        return loss, grads

    def _noise(self, rng, shape, like):
        return to_device((rng.standard_normal(shape) * self.sigma).astype(like.dtype), get_xp(like))

    def feedback_step(self, tr, rng: np.random.Generator) -> dict:
        """Train every feedback layer on this batch (forward weights untouched).
        Returns each layer's last feedback loss."""
        losses = {}
        iters = self.ldrl_iters if self.name == "ldrl" else 1
        for _ in range(iters):
            params, grads = {}, {}
            for l, fb in enumerate(self.fb):
                if fb is None:
                    continue
                x = tr.xs[l].reshape(tr.xs[l].shape[0], -1)
                e = self._noise(rng, (x.shape[0], fb.n_read), x)
                if self.name == "ldrl":
                    eta = self._noise(rng, (x.shape[0], fb.n_out), x)
                    # forward weights are frozen: the clean f_l(x) is the trace's y_l
                    loss, g = self.ldrl_loss_grads(l, x, e, eta, u0=self._fb_input(l, tr.ys[l]))
                else:
                    loss, g = self.inverse_loss_grads(l, x, e)
                losses[fb.name] = loss
                for k in g:
                    params[f"{fb.name}.{k}"] = fb.params[k]
                    grads[f"{fb.name}.{k}"] = g[k]
            self.opt.step(params, grads)
        return losses

    def jacobian_errors(self, tr) -> dict:
        """||J_g - J_f^T||_F / ||J_f||_F per feedback layer (not for SDTP's softmax-reading top)."""
        out = {}
        for l, fb in enumerate(self.fb):
            if fb is None or (self.name == "sdtp" and l == len(self.net) - 1):
                continue
            _, z = fb.forward(tr.ys[l])
            out[fb.name] = jacobian_matching_error(self.net.layers[l], self.net.activations[l], tr.hs[l], fb, z)
        return out

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        from ..backend import to_numpy
        state = {f"param/{fb.name}.{k}": to_numpy(v) for fb in self.fb if fb for k, v in fb.params.items()}
        state.update({f"opt/{k}": v for k, v in self.opt.state_dict().items()})
        return state

    def load_state_dict(self, state: dict, xp) -> None:
        for fb in self.fb:
            if fb:
                for k in fb.params:
                    fb.params[k] = to_device(state[f"param/{fb.name}.{k}"].astype(fb.params[k].dtype), xp)
        self.opt.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("opt/")}, xp)
