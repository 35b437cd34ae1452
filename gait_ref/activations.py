"""Elementwise activations with their inverses and derivatives.

Every activation offers, for arrays of any shape:

* ``f(h)``                    the forward map, y = f(h)
* ``inverse(y)``              f^-1(y)
* ``deriv(h)``                f'(h), from the pre-activation
* ``deriv_from_output(y)``    f'(f^-1(y)), from the output (what a target rule sees)
* ``inverse_difference(y, d)`` f^-1(y + d) - f^-1(y), computed without cancellation.

``inverse_difference`` is the core of the *difference* target form (see
``gait_ref.rules.targets``): in float32 the naive ``f^-1(y + d) - f^-1(y)`` loses
all digits of ``d`` when ``|d| << |y|``; the forms below keep them.
"""
from __future__ import annotations

from .backend import get_xp
from .kernels import Kernel


class Identity:
    name = "identity"
    invertible = True

    def f(self, h):
        return h

    def inverse(self, y):
        return y

    def deriv(self, h):
        return get_xp(h).ones_like(h)

    def deriv_from_output(self, y):
        return get_xp(y).ones_like(y)

    def inverse_difference(self, y, d):
        return d


class LeakyReLU:
    """f(h) = h for h >= 0, a h otherwise; invertible on all reals for a > 0.

    Written with ufuncs only (maximum/minimum, comparisons, products): unlike ``where``,
    they keep the memory layout of their inputs (activations are channels-last behind an
    NCHW view, see ``gait_ref.im2col``), so nothing downstream has to transpose-copy; on a
    channels-last (64, 216, 16, 16) map this is 2.9 ms for f against 17.6 ms with ``where``.
    """

    name = "leaky_relu"
    invertible = True

    def __init__(self, slope: float = 0.1):
        if not slope > 0:
            raise ValueError(f"leaky ReLU slope must be > 0 to be invertible, got {slope}")
        self.slope = float(slope)
        # for a < 1, f(h) = max(h, a h) and f^-1(y) = min(y, y / a); for a > 1 the other way round
        self._up, self._down = ("maximum", "minimum") if self.slope <= 1 else ("minimum", "maximum")
        self._kernels = self._make_kernels()          # one fused kernel each on a GPU (gait_ref.kernels)

    def f(self, h):
        return self._kernels[0](h, h.dtype.type(self.slope))

    def inverse(self, y):
        return self._kernels[1](y, y.dtype.type(self.slope))

    def deriv(self, h):
        """1 where h >= 0, a elsewhere: (h >= 0) (1 - a) + a."""
        return self._kernels[2](h, h.dtype.type(self.slope))

    def deriv_from_output(self, y):
        # sign(y) == sign(h) because a > 0
        return self.deriv(y)

    def inverse_difference(self, y, d):
        """f^-1(y+d) - f^-1(y), exact piecewise: d / f'(y) wherever y and y + d lie on the
        same side of the kink (d when >= 0, d/a when < 0); where they cross it (rare for
        small d) the two ends are evaluated directly, and there |d| >= |y|, so that
        subtraction does not cancel. Branch-free: no host read of where the crossings are."""
        return self._kernels[3](y, d, y.dtype.type(self.slope))

    def _inverse_difference_host(self, y, d, a):
        """``inverse_difference`` on the host: the same numbers as the fused ``where``, with
        ufuncs only, so the result keeps ``y``'s memory layout (see the class docstring)."""
        xp = get_xp(y, d)
        pos = y >= 0
        out = d / ((pos) * (1 - a) + a)                               # the same side of the kink
        u = y + d
        cross = pos != (u >= 0)
        down = getattr(xp, self._down)
        xp.copyto(out, down(u, u / a) - down(y, y / a), where=cross)
        return out

    def _make_kernels(self):
        up, down = self._up, self._down

        def f(xp):
            return lambda h, a: getattr(xp, up)(h, h * a)

        def inverse(xp):
            return lambda y, a: getattr(xp, down)(y, y / a)

        def deriv(xp):
            return lambda h, a: (h >= 0) * (1 - a) + a

        def inverse_difference(xp):
            def leaky_inverse_difference(y, d, a):
                u = y + d
                same = (y >= 0) == (u >= 0)
                inv = getattr(xp, down)
                return xp.where(same, d / ((y >= 0) * (1 - a) + a), inv(u, u / a) - inv(y, y / a))
            return leaky_inverse_difference
        return (Kernel(f, name="leaky_relu"), Kernel(inverse, name="leaky_relu_inverse"),
                Kernel(deriv, name="leaky_relu_deriv"),
                Kernel(inverse_difference, twin=self._inverse_difference_host, name="leaky_relu_inverse_difference"))


class Tanh:
    name = "tanh"
    invertible = True  # on (-1, 1)

    def f(self, h):
        return get_xp(h).tanh(h)

    def inverse(self, y):
        return get_xp(y).arctanh(y)

    def deriv(self, h):
        return _TANH_DERIV(h)

    def deriv_from_output(self, y):
        return _TANH_DERIV_FROM_OUTPUT(y)

    def inverse_difference(self, y, d):
        # atanh(u) - atanh(y) = atanh((u - y) / (1 - u y)) with u = y + d
        return _TANH_INVERSE_DIFFERENCE(y, d)


def _tanh_deriv(xp):
    def tanh_deriv(h):
        t = xp.tanh(h)
        return 1 - t * t
    return tanh_deriv


_TANH_DERIV = Kernel(_tanh_deriv)
_TANH_DERIV_FROM_OUTPUT = Kernel(lambda xp: lambda y: 1 - y * y, name="tanh_deriv_from_output")
_TANH_INVERSE_DIFFERENCE = Kernel(lambda xp: lambda y, d: xp.arctanh(d / (1 - (y + d) * y)),
                                  name="tanh_inverse_difference")


class ELU:
    """f(h) = h for h > 0, alpha (e^h - 1) otherwise; invertible onto (-alpha, inf)."""

    name = "elu"
    invertible = True

    def __init__(self, alpha: float = 1.0):
        self.alpha = float(alpha)

    def f(self, h):
        xp = get_xp(h)
        a = h.dtype.type(self.alpha)
        return xp.where(h > 0, h, a * xp.expm1(xp.minimum(h, 0)))

    def inverse(self, y):
        xp = get_xp(y)
        a = y.dtype.type(self.alpha)
        return xp.where(y > 0, y, xp.log1p(xp.minimum(y, 0) / a))

    def deriv(self, h):
        xp = get_xp(h)
        a = h.dtype.type(self.alpha)
        return xp.where(h > 0, h.dtype.type(1), a * xp.exp(xp.minimum(h, 0)))

    def deriv_from_output(self, y):
        xp = get_xp(y)
        a = y.dtype.type(self.alpha)
        return xp.where(y > 0, y.dtype.type(1), y + a)

    def inverse_difference(self, y, d):
        # both ends < 0: log1p(u/a) - log1p(y/a) = log1p(d / (a + y))
        xp = get_xp(y, d)
        a = y.dtype.type(self.alpha)
        u = y + d
        same_pos = (y > 0) & (u > 0)
        same_neg = (y <= 0) & (u <= 0)
        neg = xp.log1p(d / (a + xp.minimum(y, 0)))
        across = self.inverse(u) - self.inverse(y)
        return xp.where(same_pos, d, xp.where(same_neg, neg, across))


ACTIVATIONS = {"identity": Identity, "leaky_relu": LeakyReLU, "tanh": Tanh, "elu": ELU}


def make_activation(name: str, **kwargs):
    try:
        return ACTIVATIONS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
