"""Device noise (gait_ref.philox): Philox4x32-10 against Random123's known answers, keyed by
the whole seed, a pure function of (key, draw, element) -- so the same on every card and
after a resume -- and normal."""

import numpy as np
import pytest
from scipy import stats

from gait_ref import emulation as em
from gait_ref.backend import random_generator
from gait_ref.philox import PhiloxNormal, philox4x32_10

# Random123's kat_vectors: philox4x32 10, counter (4 words), key (2 words) -> 4 words
KNOWN_ANSWERS = [
    ([0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
    ([0xffffffff] * 4, [0xffffffff] * 2, [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
    ([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
     [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_matches_random123s_known_answers(counter, key, expected):
    assert philox4x32_10(counter, key) == expected


def test_a_device_draw_is_a_pure_function_of_key_draw_and_element():
    a = PhiloxNormal(np, [7, 5, 3]).standard_normal((4, 1000))
    b = PhiloxNormal(np, [7, 5, 3]).standard_normal((4, 1000))
    assert np.array_equal(a, b)
    # element j does not depend on the draw's size or shape (nothing like a per-SM state)
    c = PhiloxNormal(np, [7, 5, 3]).standard_normal((3000,))
    assert np.array_equal(a.reshape(-1)[:3000], c)
    # the second draw of a generator is another stream; so is any other key
    g = PhiloxNormal(np, [7, 5, 3])
    g.standard_normal((10,))
    assert not np.array_equal(g.standard_normal((10,)), a.reshape(-1)[:10])


def test_the_whole_seed_keys_the_noise():
    """CuPy's cuRAND generators keep 32 bits of the seed; here seeds that differ only above
    bit 32 (or only in the step) draw different noise."""
    base = PhiloxNormal(np, [1, 5, 3]).standard_normal((64,))
    assert not np.array_equal(base, PhiloxNormal(np, [1 + 2 ** 40, 5, 3]).standard_normal((64,)))
    assert not np.array_equal(base, PhiloxNormal(np, [1, 5, 4]).standard_normal((64,)))


def test_the_draws_are_standard_normal():
    z = PhiloxNormal(np, [0, 5, 1]).standard_normal((200_000,))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_device_backends_draw_philox_noise_and_numpy_keeps_pcg64():
    z = random_generator(em, [3, 5, 9]).standard_normal((5, 6), dtype=np.float32)
    assert isinstance(z, em.ndarray) and z.dtype == np.float32
    assert np.array_equal(z.get(), PhiloxNormal(np, [3, 5, 9]).standard_normal((5, 6)).astype(np.float32))
    host = random_generator(np, [3, 5, 9]).standard_normal((5, 6), dtype=np.float32)
    assert np.array_equal(host, np.random.default_rng([3, 5, 9]).standard_normal((5, 6), dtype=np.float32))
    em.reset_counters()
    random_generator(em, [3, 5, 10]).standard_normal((100,), dtype=np.float32)
    c = em.reset_counters()
    assert c["launch"] <= 3 and c["d2h"] == 0 and c["h2d"] == 0       # arange, the kernel, the cast
