"""The network container: a stack of (layer, activation) pairs.

Layer l (1-based in the papers, 0-based here) computes h_l = layer_l(y_{l-1}) and
y_l = f_l(h_l), with y_{-1} = x the input. ``forward`` returns a ``Trace`` holding
every layer's input, pre-activation, output and cache: everything the BP backward
pass, the exact inverses and the learning rules need, passed explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .init import init_layer


@dataclass
class Trace:
    """One forward pass. xs[l] is layer l's input (y_{l-1}), hs[l] its pre-activation,
    ys[l] its output, caches[l] what its gradients and inverse need. A pass of only the
    channels read (``Network.read_widths``) holds only those in hs and ys."""

    xs: list = field(default_factory=list)
    hs: list = field(default_factory=list)
    ys: list = field(default_factory=list)
    caches: list = field(default_factory=list)

    @property
    def output(self):
        return self.ys[-1]


class Network:
    def __init__(self, layers, activations):
        if len(layers) != len(activations):
            raise ValueError("one activation per layer")
        for below, above in zip(layers, layers[1:]):
            if tuple(below.out_shape) != tuple(above.in_shape):
                raise ValueError(f"{above.name} expects input {above.in_shape}, "
                                 f"{below.name} gives {below.out_shape}")
        self.layers = list(layers)
        self.activations = list(activations)

    def __len__(self):
        return len(self.layers)

    @property
    def in_shape(self):
        return self.layers[0].in_shape

    @property
    def out_shape(self):
        return self.layers[-1].out_shape

    def init(self, seed: int, scheme: str, xp, dtype, scale: float = 1.0) -> None:
        """Draw every layer's weights from numpy Generator(seed) in layer order."""
        rng = np.random.default_rng([int(seed), 0])  # stream 0: forward weights
        for layer in self.layers:
            init_layer(layer, rng, scheme, xp, dtype, scale)

    def parameters(self) -> dict:
        """{'<layer>.<param>': array}: the live arrays (optimisers update them in place)."""
        return {f"{l.name}.{k}": v for l in self.layers for k, v in l.params.items()}

    def describe(self) -> str:
        rows = []
        for l, f in zip(self.layers, self.activations):
            sq = "square" if l.square else "      "
            rows.append(f"{l.name:>8} {l.kind:>6} {str(l.in_shape):>16} -> {str(l.out_shape):<16} "
                        f"W{tuple(l.weight_shape)} {sq} {f.name}")
        return "\n".join(rows)

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x, widths=None) -> Trace:
        """The forward pass; with ``widths`` (``read_widths``), layer l computes only its first
        widths[l] output channels (None: all), those that anything above it reads."""
        tr = Trace()
        widths = [None] * len(self.layers) if widths is None else widths
        for layer, f, width in zip(self.layers, self.activations, widths):
            h, cache = layer.forward(x, width)
            y = f.f(h)
            tr.xs.append(x)
            tr.hs.append(h)
            tr.ys.append(y)
            tr.caches.append(cache)
            x = y
        return tr

    def live_channels(self, l: int) -> int | None:
        """How many leading channels (axis 1; units for a dense output) of layer l's output
        the layer above reads, when that is a whole number of channels and not all of them;
        None otherwise (the top layer, an ordinary layer below one that reads everything).
        The rest are auxiliary: every gradient and target difference on them is zero, so the
        backward maps carry only these (``gait_ref.live``)."""
        if l >= len(self.layers) - 1:
            return None
        above, shape = self.layers[l + 1], self.layers[l].out_shape
        per_channel = int(np.prod(shape[1:]))                     # units per channel (1 for dense)
        read = above.n_read if above.kind == "dense" else above.c_read * per_channel
        if read % per_channel or read // per_channel >= shape[0]:
            return None
        return read // per_channel

    def read_widths(self, top: int | None = None) -> list:
        """Per layer, the leading output channels that are read: by the layer above
        (``live_channels``) and, for a dense output layer, the first ``top`` units (the K
        classes a loss reads); None where everything is. A forward pass with these widths
        leaves out the auxiliary channels, which only the absolute form's inverse reads
        (``invert_layer``): BP, FA and the target rules' difference form never do."""
        widths = [self.live_channels(l) for l in range(len(self.layers))]
        out = self.layers[-1].out_shape
        if top is not None and len(out) == 1 and top < out[0]:
            widths[-1] = int(top)
        return widths

    # ---- backprop ------------------------------------------------------------------------
    def backward(self, tr: Trace, gy, feedback=None):
        """BP (Rumelhart et al.; NeurIPS eq. 3): delta_L = dL/dy_L * f'(h_L),
        delta_{l-1} = (delta_l W_l^T) * f'(h_{l-1}), dW_l = y_{l-1}^T delta_l.
        With ``feedback`` (a matrix B_l shaped like W_l per layer l >= 1), delta_l B_l^T
        replaces delta_l W_l^T: feedback alignment (Lillicrap et al. 2016).

        Each delta holds only the channels the layer above reads (``live_channels``); those
        of the auxiliary units are zero. gy : dL/dy_L, shaped like the output, or only its
        first c units (the rest zero: those the loss reads, see ``TrainStep``). Returns a
        list of {'W', 'b'} per layer, shaped like the parameters.
        """
        grads = [None] * len(self.layers)
        c = gy.shape[1]
        delta = gy * self.activations[-1].deriv(tr.hs[-1] if c == tr.hs[-1].shape[1] else tr.hs[-1][:, :c])
        for l in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[l]
            grads[l] = layer.param_grads(delta, tr.caches[l])
            if l > 0:
                c = self.live_channels(l - 1)
                back = layer.input_grad(delta, tr.caches[l], W=None if feedback is None else feedback[l],
                                        read_only=c is not None)
                h = tr.hs[l - 1] if c is None else tr.hs[l - 1][:, :c]
                delta = back * self.activations[l - 1].deriv(h)
        return grads

    # ---- exact inverse --------------------------------------------------------------------
    def check_invertible(self, first: int = 1) -> None:
        """Raise a ValueError naming the first layer from ``first`` up that is not square."""
        for layer in self.layers[first:]:
            if not layer.square:
                raise ValueError(f"layer {layer.name} (W {layer.weight_shape}) is not square, "
                                 "so it has no exact inverse; target rules need square layers "
                                 "above the first")

    def inverse_operators(self, first: int = 1):
        """One factorisation per square layer from ``first`` up (None below it)."""
        self.check_invertible(first)
        return [None if l < first else layer.inverse_operator() for l, layer in enumerate(self.layers)]

    def invert_layer(self, l: int, y, tr: Trace, op):
        """g_l^-1(y) = (f^-1(y) - b_l) W_l^-1, auxiliary units from the forward pass (eq. 5)."""
        return self.layers[l].inverse(self.activations[l].inverse(y), tr.caches[l], op)
