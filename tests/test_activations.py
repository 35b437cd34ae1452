import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gait_ref.activations import ELU, Identity, LeakyReLU, Tanh, make_activation

from .conftest import asnumpy


def _acts():
    return [Identity(), LeakyReLU(0.1), LeakyReLU(0.37), Tanh(), ELU(1.0), ELU(0.5)]


@pytest.mark.parametrize("f", _acts(), ids=lambda f: f"{f.name}")
def test_inverse_and_derivatives(f, xp):
    rng = np.random.default_rng(0)
    h = xp.asarray(rng.standard_normal(1000) * 2)
    y = f.f(h)
    np.testing.assert_allclose(asnumpy(f.inverse(y)), asnumpy(h), rtol=1e-9, atol=1e-9)
    # f' against central differences (away from the kink at 0)
    e = 1e-6
    hs = h[xp.abs(h) > 1e-3]
    fd = (f.f(hs + e) - f.f(hs - e)) / (2 * e)
    np.testing.assert_allclose(asnumpy(f.deriv(hs)), asnumpy(fd), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(asnumpy(f.deriv_from_output(f.f(hs))), asnumpy(f.deriv(hs)), rtol=1e-9, atol=1e-12)


def _exact_leaky_inverse_difference(y, d, slope):
    """f^-1(y + d) - f^-1(y) in exact rational arithmetic (the oracle)."""
    from fractions import Fraction
    a = Fraction(slope)

    def inv(u):
        return u if u >= 0 else u / a

    return np.array([float(inv(Fraction(yi) + Fraction(di)) - inv(Fraction(yi))) for yi, di in zip(y, d)])


@given(slope=st.floats(0.01, 1.0), scale=st.sampled_from([1e-12, 1e-7, 1e-3, 1.0, 10.0]),
       seed=st.integers(0, 2**16))
def test_leaky_inverse_difference_is_exact(slope, scale, seed):
    """f^-1(y + d) - f^-1(y) against an exact rational oracle, in float64 and float32."""
    rng = np.random.default_rng(seed)
    f = LeakyReLU(slope)
    y = rng.standard_normal(60)
    d = rng.standard_normal(60) * scale
    exact = _exact_leaky_inverse_difference(y, d, slope)
    np.testing.assert_allclose(f.inverse_difference(y, d), exact, rtol=1e-13, atol=0)
    y32, d32 = y.astype(np.float32), d.astype(np.float32)
    exact32 = _exact_leaky_inverse_difference(y32.astype(np.float64), d32.astype(np.float64), slope)
    np.testing.assert_allclose(f.inverse_difference(y32, d32), exact32, rtol=1e-5, atol=0)
    # the naive float32 formula loses d when |d| << |y|: the reason the difference form exists
    if scale <= 1e-7:
        naive = f.inverse(y32 + d32) - f.inverse(y32)
        assert np.abs(naive - exact32).max() > 1e-3 * np.abs(exact32).max()


@pytest.mark.parametrize("f", [Tanh(), ELU(1.0)], ids=lambda f: f.name)
def test_smooth_inverse_difference(f):
    rng = np.random.default_rng(1)
    y = f.f(rng.standard_normal(500))
    for scale in (1e-9, 1e-4, 1e-1):
        d = rng.standard_normal(500) * scale
        d = np.where(np.abs(y + d) < 0.999, d, 0) if f.name == "tanh" else np.maximum(d, -0.5 * (y + f.alpha))
        # high-precision oracle through mpmath-free route: float64 difference is exact enough at 1e-1
        # and the float64 formula must agree with the float32 one to float32 accuracy
        ref = f.inverse_difference(y, d)
        got = f.inverse_difference(y.astype(np.float32), d.astype(np.float32)).astype(np.float64)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * scale)
        if scale > 1e-5:
            np.testing.assert_allclose(ref, f.inverse(y + d) - f.inverse(y), rtol=1e-6, atol=1e-12)


def test_make_activation_errors():
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("relu6")
    with pytest.raises(ValueError, match="slope must be > 0"):
        LeakyReLU(0.0)
