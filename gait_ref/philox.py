"""Counter-based normal noise on a device: Philox4x32-10 keyed by the whole run seed.

The learned-feedback rules draw fresh noise every step, keyed by (seed, stream, step), so
that nothing but the step number needs checkpointing. On a GPU, CuPy's generators are
cuRAND's: a ``default_rng`` per step builds a fresh XORWOW state (8 x 256 states per SM:
13 MB and an initialisation kernel on an H100), its numbers depend on the card's SM count
(so a resume on another GPU model is not bit-exact), and CuPy keys it with 32 bits of the
seed (``cupy/random/_bit_generator.pyx``: ``generate_state(1, numpy.uint32)``). Here
instead, element j of a draw is a pure function of (key, draw number, j):

    (w0, w1, w2, w3) = Philox4x32-10(counter = (j mod 2^32, j >> 32, draw, 0), key = (k0, k1))
    z_j = sqrt(-2 ln u1) cos(2 pi u2),  u1 = (w0 + 1/2) / 2^32,  u2 = (w1 + 1/2) / 2^32

with (k0, k1) = 64 bits of ``numpy.random.SeedSequence(key)`` (every integer of the key
enters). Philox4x32-10 is Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy
as 1, 2, 3" (SC 2011), checked against Random123's known-answer vectors in the tests. The
integer part is exact on every backend; the Box-Muller transform is float64 (a GPU's
log/cos may differ from numpy's in the last bit). One fused kernel (``gait_ref.kernels``)
plus an ``arange`` per draw; no state, nothing card-dependent.

The numpy backend keeps numpy's PCG64 Generator (``backend.random_generator``), so the
CPU's results are unchanged; the emulated device runs this module's numpy code, so what it
proves is what a GPU draws.
"""
from __future__ import annotations

import math

import numpy as np

from .kernels import Kernel

M0, M1 = 0xD2511F53, 0xCD9E8D57            # Philox4x32's multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85            # its Weyl key increments
ROUNDS = 10


def _philox(xp):
    """Philox4x32-10 on uint64 arrays holding 32-bit words (every product fits in 64 bits)."""
    def philox4x32_10(c0, c1, c2, c3, k0, k1, m0, m1, w0, w1, low, bits):
        for r in range(ROUNDS):
            if r:
                k0 = (k0 + w0) & low
                k1 = (k1 + w1) & low
            p0, p1 = m0 * c0, m1 * c2
            c0, c1, c2, c3 = ((p1 >> bits) ^ c1 ^ k0), p1 & low, ((p0 >> bits) ^ c3 ^ k1), p0 & low
        return c0, c1, c2, c3
    return philox4x32_10


def _normal(xp):
    philox = _philox(xp)

    def philox_normal(j, draw, k0, k1, m0, m1, w0, w1, low, bits, zero, half, scale, two_pi, minus_two):
        w = philox(j & low, j >> bits, draw + zero, zero, k0, k1, m0, m1, w0, w1, low, bits)
        u1 = (w[0] + half) * scale
        u2 = (w[1] + half) * scale
        return xp.sqrt(minus_two * xp.log(u1)) * xp.cos(two_pi * u2)
    return philox_normal


_NORMAL = Kernel(_normal, name="philox_normal")
_WORDS = Kernel(lambda xp: _philox(xp), name="philox4x32_10")


def philox4x32_10(counter, key):
    """The four output words of Philox4x32-10 for ``counter`` (4 uint32) and ``key`` (2),
    as Python ints: the block function itself, for the known-answer tests."""
    u = np.uint64
    c = [np.asarray([v], dtype=u) for v in counter]
    out = _WORDS(*c, u(key[0]), u(key[1]), u(M0), u(M1), u(W0), u(W1), u(0xFFFFFFFF), u(32))
    return [int(w[0]) for w in out]


class PhiloxNormal:
    """``random_generator``'s device stand-in: ``standard_normal(shape, dtype)`` draws, the
    n-th draw of this object (n = 0, 1, ...) counted into the Philox counter."""

    def __init__(self, xp, key):
        self.xp = xp
        k = np.random.SeedSequence([int(v) for v in key]).generate_state(2, np.uint32)
        self.k0, self.k1 = np.uint64(k[0]), np.uint64(k[1])
        self.draws = 0

    def standard_normal(self, shape, dtype=np.float64):
        xp, u = self.xp, np.uint64
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        j = xp.arange(math.prod(shape), dtype=xp.uint64)
        z = _NORMAL(j, u(self.draws), self.k0, self.k1, u(M0), u(M1), u(W0), u(W1), u(0xFFFFFFFF), u(32), u(0),
                    np.float64(0.5), np.float64(2.0 ** -32), np.float64(2 * math.pi), np.float64(-2.0))
        self.draws += 1
        return z.reshape(shape).astype(dtype, copy=False)
