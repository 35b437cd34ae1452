"""Layers: affine maps with explicit forward, input/parameter gradients and exact inverses.

Every layer offers the same methods, so a learning rule never needs to know which
kind it holds:

    forward(x) -> h, cache                  input_grad(gh, cache, W=None, read_only=False) -> gx
    param_grads(gh, cache) -> {W, b}        inverse_operator() -> SquareInverse
    inverse(h, cache, op) -> x              inverse_delta(dh, cache, op, read_only=False) -> dx
    linear_transpose(a, V, read_only=False) -> x     transpose_weight_grad(a, gx) -> dV

The last two are the layer's transposed linear structure with someone else's weights
V (shaped like W): what learned feedback layers (``gait_ref.feedback``) are built from.
gh, dh and a may hold only the first c output channels, the rest being zero; with
``read_only`` gx and dx are only the input channels the layer reads (``gait_ref.live``).
ConvPool2D (conv + 2x2 max-pool) has no exact inverse.
"""
from .conv import Conv2D, ConvPool2D
from .dense import Dense
from .local import LocallyConnected2D

__all__ = ["Dense", "Conv2D", "ConvPool2D", "LocallyConnected2D"]
