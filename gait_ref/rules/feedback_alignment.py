"""Feedback alignment (Lillicrap et al. 2016) and direct feedback alignment (Nokland 2016).

FA: BP's backward pass with a fixed random matrix B_l in place of W_l:
    delta_{l-1} = (delta_l B_l^T) * f'(h_{l-1}); for a conv, a transposed conv by B_l.
DFA: the output error e = dL/dy_L * f'(h_L) goes straight to every hidden layer:
    delta_l = (e B_l) * f'(h_l),  B_l : (O_L, |h_l|).

The feedback matrices are drawn from their own numpy stream (seed, 1): the scaling
reference code seeds them like the forward weights, so that B_l equals the initial
W_{l+1}; that collision is a bug and is not reproduced here.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_xp, to_device
from ..init import draw_weights


def draw_feedback(net, shapes, seed: int, init: str):
    """Fixed random matrices of the given shapes (None stays None), drawn from the
    feedback stream (seed, 1), never the forward weights' stream (seed, 0), and placed
    on the network's backend in its dtype."""
    rng = np.random.default_rng([int(seed), 1])
    W0 = net.layers[0].params["W"]
    xp, dtype = get_xp(W0), W0.dtype
    return [None if s is None else to_device(draw_weights(rng, s, init).astype(dtype), xp) for s in shapes]


class FA:
    name = "fa"
    needs_square = False
    # gy with only the output units the loss reads, and a forward pass of only the channels read
    # (Network.backward reads nothing else; TrainStep)
    takes_narrow_output_grad = True

    def __init__(self, net, seed: int = 0, init: str = "orthogonal"):
        self.net = net
        # B_l for l >= 1 (layer 0 sends no error further down)
        self.B = draw_feedback(net, [None] + [l.weight_shape for l in net.layers[1:]], seed, init)

    def compute(self, tr, gy, labels=None, batch=None):
        """Per-layer updates (labels and batch split unused: sums over samples)."""
        return self.net.backward(tr, gy, feedback=self.B), {}


class DFA:
    name = "dfa"
    needs_square = False

    def __init__(self, net, seed: int = 0, init: str = "normal"):
        self.net = net
        n_out = math.prod(net.out_shape)
        self.B = draw_feedback(net, [(n_out, math.prod(l.out_shape)) for l in net.layers[:-1]] + [None],
                               seed, init)

    def compute(self, tr, gy, labels=None, batch=None):
        """Per-layer updates (labels and batch split unused: sums over samples)."""
        net = self.net
        L = len(net)
        e = gy * net.activations[-1].deriv(tr.hs[-1])                # (N, O_L)
        e_flat = e.reshape(e.shape[0], -1)
        grads = [None] * L
        grads[-1] = net.layers[-1].param_grads(e, tr.caches[-1])
        for l in range(L - 1):
            delta = (e_flat @ self.B[l]).reshape(tr.hs[l].shape) * net.activations[l].deriv(tr.hs[l])
            grads[l] = net.layers[l].param_grads(delta, tr.caches[l])
        return grads, {}
