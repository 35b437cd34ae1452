"""Backpropagation: the explicit backward pass (GAIT-prop NeurIPS eq. 3)."""
from __future__ import annotations


class BP:
    name = "bp"
    needs_square = False
    # gy with only the output units the loss reads, and a forward pass of only the channels read
    # (Network.backward reads nothing else; TrainStep)
    takes_narrow_output_grad = True

    def __init__(self, net):
        self.net = net

    def compute(self, tr, gy, labels=None, batch=None):
        """gy = dL/dy_L -> (per-layer {'W', 'b'} gradients, info). Per-sample sums: neither the
        labels nor the split of the batch over processes changes anything here."""
        return self.net.backward(tr, gy), {}
