"""Learned feedback (approximate inverse) layers for the DTP family, with explicit gradients.

Forward layer l maps its input x (shape ``in_shape``) to y = f(layer(x)) (``out_shape``).
Its feedback layer g maps back, with weights V of its own, shaped like the forward W
but never tied to it:

    g(u) = s_out( T_V( s_in( P u ) ) + c )                                  (one place)

T_V   the *transpose structure* of the forward layer with V's values
      (``layer.linear_transpose``): dense  a V^T;  conv  the transposed convolution
      col2im(a V^T) (stride, padding and kernel of the forward conv);  locally
      connected  the per-position transposes a_p V_p^T summed back by col2im.
P     the inverse of max-pooling for a conv-pool layer: unpool with the forward pass's
      indices (``gait_ref.pooling``); the identity otherwise.
c     bias: per input unit (dense, locally connected: untied) or per input channel
      (conv, as a transposed convolution's bias).

Two forms, after the two papers:

    bartunov  g(u) = f_{l-1}( T_V(u) + c )             Bartunov et al. 2018, sec. 2.1.1:
              s_out is the activation of the layer below (whose activity g rebuilds).
    ernoult   g(u) = T_V( f_l(P u) ) + c               Ernoult et al. 2022's SimpleVGG
              feedback blocks unpool -> ELU -> transposed conv; for a dense layer
              u -> f_l(u) V^T + c.

What travels: ``forward(u, fcache)`` returns (g(u), gcache); ``fcache`` is the forward
layer's cache of the pass that produced u's base point (for the pooling indices).
``param_grads(gcache, g_r)`` gives dL/dV and dL/dc from dL/dg = g_r; ``jvp`` the
directional derivative. ``jacobian_matching_error`` measures ||J_g - J_f^T||_F / ||J_f||_F.
"""
from __future__ import annotations

import numpy as np

from .activations import Identity
from .backend import get_xp, random_generator, read_scalars, to_device
from .init import draw_weights

FORMS = ("bartunov", "ernoult")


def _no_aux_units(layer) -> None:
    """Learned feedback rebuilds the whole layer input, so the layer must read all of it."""
    read_all = (layer.n_read == layer.n_in) if layer.kind == "dense" else (layer.c_read == layer.in_shape[0])
    if not read_all:
        raise ValueError(f"layer {layer.name} reads only part of its input (auxiliary units); "
                         "learned-feedback rules need layers that read all of it")


class Feedback:
    """The feedback layer g of forward layer ``layer`` (see the module docstring)."""

    def __init__(self, layer, s_out=None, s_in=None, name: str | None = None):
        _no_aux_units(layer)
        self.layer = layer
        self.s_out = Identity() if s_out is None else s_out
        self.s_in = Identity() if s_in is None else s_in
        self.name = f"g_{layer.name}" if name is None else name
        self.pools = layer.kind == "convpool"
        C = layer.in_shape[0]
        self.c_shape = (C, 1, 1) if layer.kind in ("conv", "convpool") else tuple(layer.in_shape)
        self.params = {}

    @classmethod
    def of(cls, net, l: int, form: str = "bartunov") -> "Feedback":
        """The feedback of layer l >= 1 of ``net`` in ``form``."""
        if form == "bartunov":
            return cls(net.layers[l], s_out=net.activations[l - 1])
        if form == "ernoult":
            return cls(net.layers[l], s_in=net.activations[l])
        raise ValueError(f"unknown feedback form {form!r}; choose one of {FORMS}")

    def init(self, rng: np.random.Generator, xp, dtype, scheme: str = "glorot") -> None:
        V = draw_weights(rng, self.layer.weight_shape, scheme)
        self.params = {"V": to_device(V.astype(dtype), xp),
                       "c": to_device(np.zeros(self.c_shape, dtype), xp)}

    def forward(self, u, fcache=None):
        """u : (N, *out_shape) -> (g(u) : (N, *in_shape), gcache)."""
        p = self.layer.unpool(u, fcache) if self.pools else u
        a = self.s_in.f(p)
        z = self.layer.linear_transpose(a, self.params["V"]) + self.params["c"][None]
        return self.s_out.f(z), {"p": p, "a": a, "z": z}

    def param_grads(self, gcache, g_r) -> dict:
        """dL/dV and dL/dc for dL/dg(u) = g_r, through z = T_V(a) + c."""
        gz = g_r * self.s_out.deriv(gcache["z"])
        gV = self.layer.transpose_weight_grad(gcache["a"], gz)
        per_channel = self.layer.kind in ("conv", "convpool")
        gc = (gz.sum(axis=(0, 2, 3)) if per_channel else gz.sum(axis=0)).reshape(self.c_shape)
        return {"V": gV, "c": gc}

    def jvp(self, du, gcache, fcache=None):
        """J_g du at the point of ``gcache``: s_out'(z) * T_V( s_in'(P u) * P du )."""
        dp = self.layer.unpool(du, fcache) if self.pools else du
        da = self.s_in.deriv(gcache["p"]) * dp
        return self.s_out.deriv(gcache["z"]) * self.layer.linear_transpose(da, self.params["V"])


def jacobian_matching_error(layer, f, fb: Feedback, x, n_samples: int = 8, max_exact: int = 256,
                            n_probes: int = 64, seed: int = 0) -> float:
    """mean_n ||J_g - J_f^T||_F / ||J_f||_F over the first ``n_samples`` inputs of ``x``
    (``jacobian_matching_ratios`` gives the per-sample terms)."""
    ratios = jacobian_matching_ratios(layer, f, fb, x[:n_samples], max_exact, n_probes, seed)
    return float(np.mean(ratios)) if ratios else float("nan")


def jacobian_matching_ratios(layer, f, fb: Feedback, x, max_exact: int = 256, n_probes: int = 64,
                             seed: int = 0, first_row: int = 0) -> list:
    """||J_g - J_f^T||_F / ||J_f||_F for every input row of ``x``; row n's probes are keyed by
    (seed, first_row + n), its index in the global batch, so the value does not depend on
    which process holds the row.

    J_f = dy/dx of the forward layer y = f(layer(x)) at x_n; J_g = dg/du of the feedback at
    u = y_n (what L-DRL trains towards J_f^T). Both are applied to probe directions E in
    the output space: J_f^T E by the layer's own backward map, J_g E by ``fb.jvp``. With
    at most ``max_exact`` output units the probes are the identity and the norms exact;
    above, ``n_probes`` fixed-seed Gaussian probes (drawn on the device) give an unbiased
    estimate of both squared norms (E[||A e||^2] = ||A||_F^2 for e ~ N(0, I)). The norms
    stay on the device until one read at the end.
    """
    xp = get_xp(x)
    out_shape = tuple(layer.out_shape)
    n_out = int(np.prod(out_shape))
    exact = n_out <= max_exact
    P = n_out if exact else int(n_probes)
    norms = []
    for n in range(x.shape[0]):
        xr = xp.repeat(x[n:n + 1], P, axis=0)
        h, fcache = layer.forward(xr)
        y = f.f(h)
        if exact:
            E = xp.eye(n_out, dtype=x.dtype).reshape((P,) + out_shape)
        else:
            E = random_generator(xp, [seed, first_row + n]).standard_normal((P,) + out_shape, dtype=x.dtype)
        jft = layer.input_grad(E * f.deriv(h), fcache)               # rows of J_f^T E
        _, gcache = fb.forward(y, fcache)
        jg = fb.jvp(E, gcache, fcache)
        norms += [((jg - jft) ** 2).sum(), (jft ** 2).sum()]
    sq = np.array(read_scalars(norms)).reshape(-1, 2)                 # (n, 2): ||J_g - J_f^T||^2, ||J_f||^2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sq[:, 1] > 0, np.sqrt(sq[:, 0] / sq[:, 1]), np.nan).tolist()
