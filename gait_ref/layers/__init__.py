"""Layers: affine maps with explicit forward, input/parameter gradients and exact inverses.

Every layer offers the same methods, so a learning rule never needs to know which
kind it holds:

    forward(x) -> h, cache             input_grad(gh, cache, W=None) -> gx
    param_grads(gh, cache) -> {W, b}   inverse_operator() -> SquareInverse
    inverse(h, cache, op) -> x         inverse_delta(dh, cache, op) -> dx
"""
from .conv import Conv2D
from .dense import Dense
from .local import LocallyConnected2D

__all__ = ["Dense", "Conv2D", "LocallyConnected2D"]
