"""Backpropagation: the explicit backward pass (GAIT-prop NeurIPS eq. 3)."""
from __future__ import annotations


class BP:
    name = "bp"
    needs_square = False
    takes_narrow_output_grad = True      # gy with only the output units the loss reads (Network.backward)
    reads_live_outputs = True            # a forward pass of the channels read is enough (Network.read_widths)

    def __init__(self, net):
        self.net = net

    def compute(self, tr, gy, labels=None, batch=None):
        """gy = dL/dy_L -> (per-layer {'W', 'b'} gradients, info). Per-sample sums: neither the
        labels nor the split of the batch over processes changes anything here."""
        return self.net.backward(tr, gy), {}
