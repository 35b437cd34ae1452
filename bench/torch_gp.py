"""A PyTorch implementation of the same normalized GAIT-prop training step, as a reference
for benchmarks only (the library never imports torch).

Same network, same weights (copied from a gait_ref Network), same algorithm: the forward
pass, softmax cross-entropy summed over the batch, the difference-form target recursion
with per-sample gamma = gamma0 sqrt(D) / ||d|| (scaling paper eq. 5), an LU solve
(``torch.linalg.solve``) at every square layer every step, the orthogonality regulariser
4 (W W^T - I) W every step, and Adam with TensorFlow's epsilon placement. Convolutions
use TensorFlow's SAME padding and the (ky, kx, c) row order of gait_ref's kernels
(unfold/fold with the axes permuted). ``check_against`` compares one step's updates with
gait_ref's.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class TorchGP:
    def __init__(self, net, slope=0.1, gamma0=1e-7, lam=1.0, lr=1e-5, dtype=torch.float32):
        self.layers = []
        for layer in net.layers:
            p = {k: torch.tensor(np.asarray(v), dtype=dtype) for k, v in layer.params.items()}
            self.layers.append((layer, p))
        self.a, self.gamma0, self.lam, self.lr = slope, gamma0, lam, lr
        self.m = [{k: torch.zeros_like(v) for k, v in p.items()} for _, p in self.layers]
        self.v = [{k: torch.zeros_like(v) for k, v in p.items()} for _, p in self.layers]
        self.t = 0

    # ---- layer maps ---------------------------------------------------------------------------------
    @staticmethod
    def _pads(layer):
        t, b, l, r = layer.geom.pads
        return (l, r, t, b)

    def _cols(self, layer, x):
        """im2col in gait_ref's (ky, kx, c) order: (N, C, H, W) -> (N * Ho * Wo, D)."""
        g = layer.geom
        xr = F.pad(x[:, :layer.c_read], self._pads(layer))
        u = F.unfold(xr, g.K, stride=g.S)                                   # (N, Cr*K*K, L)
        N, _, L = u.shape
        return u.view(N, g.C, g.K * g.K, L).permute(0, 3, 2, 1).reshape(N * L, g.D)

    def _col2im(self, layer, cols, N):
        g = layer.geom
        L = g.Ho * g.Wo
        u = cols.view(N, L, g.K * g.K, g.C).permute(0, 3, 2, 1).reshape(N, g.C * g.K * g.K, L)
        t, b, l, r = g.pads
        x = F.fold(u, (g.H + t + b, g.W + l + r), g.K, stride=g.S)
        x = x[:, :, t:t + g.H, l:l + g.W]
        C = layer.in_shape[0]
        return F.pad(x, (0, 0, 0, 0, 0, C - g.C)) if C > g.C else x

    def forward(self, x):
        ys, hs, xs = [], [], []
        for i, (layer, p) in enumerate(self.layers):
            xs.append(x)
            if layer.kind == "conv":
                g = layer.geom
                h = (self._cols(layer, x) @ p["W"] + p["b"]).view(x.shape[0], g.Ho, g.Wo, -1).permute(0, 3, 1, 2)
            else:
                h = x.reshape(x.shape[0], -1)[:, :layer.n_read] @ p["W"] + p["b"]
            y = h if i == len(self.layers) - 1 else torch.where(h >= 0, h, h * self.a)
            hs.append(h)
            ys.append(y)
            x = y
        return xs, hs, ys

    def _param_grads(self, layer, x, gh):
        if layer.kind == "conv":
            rows = gh.permute(0, 2, 3, 1).reshape(-1, gh.shape[1])
            return {"W": self._cols(layer, x).T @ rows, "b": rows.sum(0)}
        return {"W": x.reshape(x.shape[0], -1)[:, :layer.n_read].T @ gh, "b": gh.sum(0)}

    def _inverse_delta(self, layer, p, dh):
        """dh W^-1 by an LU solve; for a conv, through the patches and col2im."""
        W = p["W"]
        if layer.kind == "conv":
            rows = dh.permute(0, 2, 3, 1).reshape(-1, dh.shape[1])
            patches = torch.linalg.solve(W.T, rows.T).T
            return self._col2im(layer, patches, dh.shape[0])
        x = torch.linalg.solve(W.T, dh.T).T
        full = layer.n_in
        return F.pad(x, (0, full - layer.n_read)).view((dh.shape[0],) + tuple(layer.in_shape))

    def _inverse_difference(self, y, d):
        a = self.a
        u = y + d
        inv = lambda v: torch.where(v >= 0, v, v / a)
        same = torch.where(y >= 0, d, d / a)
        return torch.where((y >= 0) != (u >= 0), inv(u) - inv(y), same)

    # ---- the step -------------------------------------------------------------------------------------
    def updates(self, x, labels, K):
        xs, hs, ys = self.forward(x)
        out = ys[-1]
        p_ = torch.softmax(out[:, :K], dim=1)
        gy = torch.zeros_like(out)
        gy[:, :K] = p_
        gy[torch.arange(len(labels)), labels] -= 1
        grads = [None] * len(self.layers)
        d = -gy
        s = torch.ones(x.shape[0], dtype=x.dtype)
        for l in range(len(self.layers) - 1, -1, -1):
            layer, p = self.layers[l]
            fp = torch.ones_like(hs[l]) if l == len(self.layers) - 1 else torch.where(hs[l] >= 0, 1.0, self.a).to(x.dtype)
            shape = (-1,) + (1,) * (d.ndim - 1)
            grads[l] = self._param_grads(layer, xs[l], (-d) * fp * s.view(shape))
            if l == 0:
                break
            dist = d.reshape(d.shape[0], -1).norm(dim=1)
            gamma = torch.where(dist > 0, self.gamma0 * math.sqrt(d[0].numel()) / torch.where(dist > 0, dist, 1.0),
                                torch.ones_like(dist))
            eps = gamma.view(shape) * fp * fp
            top = l == len(self.layers) - 1                          # the output layer is linear
            dh = eps * d if top else self._inverse_difference(ys[l], eps * d)
            d = self._inverse_delta(layer, p, dh)
            s = s / gamma
        return grads

    def step(self, x, labels, K):
        grads = self.updates(x, labels, K)
        self.t += 1
        b1, b2, eps = 0.9, 0.99, 1e-8
        lr_t = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for (layer, p), g, m, v in zip(self.layers, grads, self.m, self.v):
            W = p["W"]
            if W.shape[0] == W.shape[1]:                        # square: the regulariser, every step
                E = W @ W.T
                E.diagonal().sub_(1)
                g["W"] = g["W"] + self.lam * 4 * (E @ W)
            for k in p:
                m[k].mul_(b1).add_(g[k], alpha=1 - b1)
                v[k].mul_(b2).addcmul_(g[k], g[k], value=1 - b2)
                p[k].sub_(lr_t * m[k] / (v[k].sqrt() + eps))
        return grads


def check_against(net, x, labels, K, rule_grads) -> float:
    """Largest relative difference between one step's updates here and gait_ref's."""
    t = TorchGP(net, dtype=torch.float64)
    g = t.updates(torch.tensor(np.asarray(x), dtype=torch.float64), torch.tensor(np.asarray(labels)), K)
    worst = 0.0
    for a, b in zip(g, rule_grads):
        ref = np.asarray(b["W"], np.float64)
        worst = max(worst, float(np.abs(a["W"].numpy() - ref).max() / np.abs(ref).max()))
    return worst
