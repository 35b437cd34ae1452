"""The emulator does what CuPy 14.2 does where numpy does not: CuPy's own reads inside its
functions, its pointer-table copies and kernel launches, its stream-ordered memory pool,
its float32 linear algebra and C-ordered elementwise outputs (gait_ref/emulation)."""

import json
from pathlib import Path

import numpy as np
import pytest

from gait_ref import emulation as em
from gait_ref.data.loader import ArraySet, BatchLoader
from gait_ref.emulation.memory import StreamOrderError

SURVEY = json.loads((Path(em.__file__).with_name("cupy-syncs.json")).read_text())


@pytest.fixture(autouse=True)
def fresh_counters():
    em.reset_counters()
    yield


def reads_of(fn):
    em.reset_counters()
    fn()
    return em.reset_counters()["d2h"]


# ---- CuPy's internal reads ------------------------------------------------------------------------
def test_cupys_own_reads_inside_its_functions_are_counted():
    x = em.asarray(np.arange(10.0))
    assert reads_of(lambda: em.argpartition(x, 3)) == 2           # unravel_index's two .any()
    assert reads_of(lambda: em.nonzero(x > 3)) == 1                  # the count of nonzeros sizes it
    assert reads_of(lambda: em.where(x > 3)) == 1                    # where(cond) is nonzero(cond)
    assert reads_of(lambda: em.where(x > 3, x, 0.0)) == 0            # where(cond, a, b): one kernel
    assert reads_of(lambda: em.repeat(x, em.asarray(np.arange(10)))) == SURVEY["syncs"]["cupy.repeat"]["reads"]
    assert reads_of(lambda: em.repeat(x, 2)) == 0
    assert reads_of(lambda: em.argmax(x, axis=0)) == 0
    assert reads_of(lambda: x[x > 3]) == 1                           # a boolean mask's size


def test_the_survey_names_its_evidence_in_cupys_source():
    assert SURVEY["cupy_version"] == em.API["cupy_version"]
    where = SURVEY["syncs"]["cupy.argpartition"]["where"]
    assert all("cupy/_indexing/generate.py" in w and "unravel_index" in w for w in where)
    for name in ("cupy.matmul", "cupy.exp", "cupy.ndarray.sum", "cupy.ndarray.astype", "cupy.linalg.solve"):
        assert name in SURVEY["sync_free"], name
    assert not set(SURVEY["syncs"]) & set(SURVEY["sync_free"])


def test_a_call_outside_the_survey_is_found(monkeypatch):
    """What ``called`` collects is what the per-rule test checks against the survey."""
    em.called.clear()
    x = em.asarray(np.ones(4))
    em.cumsum(x)
    assert "cupy.cumsum" in em.called
    monkeypatch.setitem(SURVEY, "sync_free", [n for n in SURVEY["sync_free"] if n != "cupy.cumsum"])
    assert unsurveyed(em.called) == {"cupy.cumsum"}


def unsurveyed(called) -> set:
    return set(called) - set(SURVEY["syncs"]) - set(SURVEY["sync_free"])


# ---- pointer tables and launches -------------------------------------------------------------------------
def test_concatenating_more_than_eight_arrays_copies_a_pointer_table():
    parts = [em.asarray(np.ones((2, 3))) for _ in range(9)]
    em.reset_counters()
    em.stack(parts[:8])
    c = em.reset_counters()
    assert (c["launch"], c["pointer_tables"], c["h2d"]) == (8, 0, 0)    # one copy kernel per array
    em.stack(parts)
    c = em.reset_counters()
    assert (c["launch"], c["pointer_tables"]) == (1, 1)                 # one kernel, one table
    em.concatenate(parts + [em.asarray(np.ones((1, 3)))])
    assert em.reset_counters()["pointer_tables"] == 3                     # shapes differ: three tables


def test_launches_are_counted_as_cupy_makes_them():
    a = em.asarray(np.ones((4, 6), np.float32))
    em.reset_counters()
    v = a.reshape(6, 4).T[1:]                                             # views: no kernel
    assert em.counters["launch"] == 0
    b = em.tanh(a) * 2 + 1                                               # three elementwise kernels
    a += b                                                               # one, in place
    s = (a @ b.T).sum()                                                  # a GEMM and a reduction
    assert em.counters["launch"] == 6 and v.shape == (3, 6) and s.shape == ()
    em.reset_counters()
    with em.launch_trace() as t:
        em.asarray(np.ones((3, 5), np.float32)) @ em.asarray(np.ones((5, 2), np.float32))
    assert [(r["kind"], r["flops"]) for r in t] == [("gemm", 2 * 3 * 2 * 5)]
    em.empty((100,), dtype=np.float32)
    assert em.counters["launch"] == 1                                     # only the GEMM: empty is an allocation


# ---- dtypes and layouts ---------------------------------------------------------------------------------
def test_linalg_computes_float32_in_float32_as_cusolver_does():
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((64, 64)) + 8 * np.eye(64)).astype(np.float32)
    X = em.linalg.inv(em.asarray(W)).get()
    exact32 = np.linalg.inv(W.astype(np.float64)).astype(np.float32)    # what numpy's float32 inv returns
    assert X.dtype == np.float32
    assert not np.array_equal(X, exact32)                                 # computed in float32, not rounded
    assert np.abs(X @ W - np.eye(64)).max() < 1e-4
    B = rng.standard_normal((64, 3)).astype(np.float32)
    x = em.linalg.solve(em.asarray(W), em.asarray(B)).get()
    assert x.dtype == np.float32 and not np.array_equal(x, np.linalg.solve(W, B))


def test_elementwise_outputs_are_c_ordered_as_in_cupy():
    nhwc = em.asarray(np.ones((2, 4, 4, 3), np.float32))
    nchw = nhwc.transpose(0, 3, 1, 2)                                      # channels-last memory
    assert not nchw.flags.c_contiguous
    assert em.tanh(nchw).flags.c_contiguous and (nchw * 2).flags.c_contiguous
    assert np.tanh(np.ones((2, 4, 4, 3)).transpose(0, 3, 1, 2)).flags.c_contiguous is False   # numpy keeps it


# ---- the stream-ordered pool ---------------------------------------------------------------------------
def copied_on_a_side_stream():
    """(the copy stream, an array copied on it, the event recorded after the copy)."""
    copy = em.cuda.Stream(non_blocking=True)
    with copy:
        dev = em.asarray(np.ones(8, np.float32))
        ev = copy.record()
    return copy, dev, ev


def test_a_read_before_waiting_for_the_copy_that_wrote_it_is_refused():
    copy, dev, ev = copied_on_a_side_stream()
    with pytest.raises(StreamOrderError, match="reads"):
        dev * 2                                                           # the null stream did not wait
    em.cuda.get_current_stream().wait_event(ev)
    dev * 2


def test_a_buffer_freed_under_another_streams_reads_is_refused_at_the_owners_next_allocation():
    copy, dev, ev = copied_on_a_side_stream()
    em.cuda.get_current_stream().wait_event(ev)
    y = dev * 2                                                            # read on the null stream
    del dev
    with copy, pytest.raises(StreamOrderError, match="freed while stream"):
        em.asarray(np.ones(8, np.float32))
    assert float(y.sum()) == 16.0


def test_a_host_read_orders_what_it_waited_for():
    copy, dev, ev = copied_on_a_side_stream()
    em.cuda.get_current_stream().wait_event(ev)
    float((dev * 2).sum())                                                 # the host waited for the null stream
    del dev
    with copy:
        em.asarray(np.ones(8, np.float32))


class AllocatingLoader(BatchLoader):
    """The loader before its ring of device buffers: each batch allocated on the copy stream
    (gait_ref/data/loader.py at da80255), whose pool arena hands it to the next copy."""

    def _copy_to_device(self, x_u8, y):
        xp = self.xp
        nx = x_u8.size
        off = -(-nx // 8) * 8
        buf, i = self._pinned_buffer(off + 8 * len(y))
        np.copyto(buf[:nx].reshape(x_u8.shape), x_u8)
        buf[off:off + 8 * len(y)].view(np.int64)[:] = y
        if self._copy_stream is None:
            self._copy_stream = xp.cuda.Stream(non_blocking=True)
        with self._copy_stream:
            dev = xp.asarray(buf[:off + 8 * len(y)], blocking=False)
            ev = self._copy_stream.record()
        xp.cuda.get_current_stream().wait_event(ev)
        self._pinned[i] = (buf, ev)
        return dev[:nx].reshape(x_u8.shape), dev[off:].view(xp.int64)


def evaluation_like(loader_class):
    """An evaluation pass: each batch is read on the compute stream, nothing is read back
    until the end (top-1 sums stay on the device)."""
    rng = np.random.default_rng(0)
    data = ArraySet(rng.integers(0, 255, (40, 1, 4, 4), dtype=np.uint8), rng.integers(0, 3, 40), 3)
    loader = loader_class(data, 8, em, np.float32, shuffle=False)
    total = em.zeros((), dtype=np.float64)
    for _, x, y in loader.epoch(0):
        total = total + x.sum() + y.sum()
    return float(total)


def test_the_emulator_catches_the_loader_that_reused_batch_memory_across_streams():
    with pytest.raises(StreamOrderError, match="freed while stream"):
        evaluation_like(AllocatingLoader)


def test_the_loaders_ring_of_device_buffers_is_reused_only_after_its_readers():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 1, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 3, 40)
    expected = x.astype(np.float64).sum() / 255 + y.sum()
    assert evaluation_like(BatchLoader) == pytest.approx(expected, rel=1e-6)


def test_a_batch_held_past_the_rings_promise_is_caught():
    """A batch's arrays stay valid until two more batches have been requested; reading one
    later races with the copy that reuses its slot, and the emulator says so."""
    rng = np.random.default_rng(0)
    data = ArraySet(rng.integers(0, 255, (48, 1, 4, 4), dtype=np.uint8), rng.integers(0, 3, 48), 3)
    loader = BatchLoader(data, 8, em, np.float32, shuffle=False)
    held = []
    with pytest.raises(StreamOrderError):
        for _, x, y in loader.epoch(0):
            held.append(y)
            held[0].sum()                                                   # the first batch, read again
