"""Backpropagation: the explicit backward pass (GAIT-prop NeurIPS eq. 3)."""
from __future__ import annotations


class BP:
    name = "bp"
    needs_square = False

    def __init__(self, net):
        self.net = net

    def compute(self, tr, gy):
        """gy = dL/dy_L -> (per-layer {'W', 'b'} gradients, info)."""
        return self.net.backward(tr, gy), {}
