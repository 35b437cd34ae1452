"""CuPy's stream-ordered memory pool, as the emulator models it.

CuPy's default pool (``cupy/cuda/memory.pyx``: ``SingleDeviceMemoryPool``) keeps one
arena per stream: an array's memory belongs to the stream that was current when it was
allocated, and when Python drops the array its block goes back to that stream's arena,
at once, to be handed to the next allocation on the same stream. That is safe for work
on the owning stream (a stream runs in order) but not for another stream that was
reading the array: unless its reads are ordered before the owner's next use (the owner
waited on an event recorded after them, or the host waited for them), the owner may
overwrite the block while they run. The same holds for plain writes across streams.

The model, with a logical clock that ticks at every device operation:

* each buffer (a numpy storage root) has an owner stream, the last time each other
  stream read it, and its last writer;
* ``Stream.wait_event(ev)`` orders the waiting stream's later work after the event's
  stream up to the time the event was recorded; ``Stream.synchronize``,
  ``Event.synchronize``, ``Device.synchronize`` and every device-to-host read (CuPy
  synchronises the current stream to copy out) order everything after that work; the
  legacy null stream and blocking streams are ordered with each other implicitly;
* a read of a buffer whose last write, on another stream, is not ordered before it
  raises ``StreamOrderError``; so does a write over another stream's unordered reads;
* a freed buffer with unordered reads by another stream raises at the owner stream's
  next allocation (where the pool would hand the block out again).
"""
from __future__ import annotations

import threading
import weakref

import numpy as np


class StreamOrderError(RuntimeError):
    """Device memory reused or read across streams without ordering (a race on a GPU)."""


def storage_root(a: np.ndarray) -> np.ndarray:
    """The numpy array that owns ``a``'s memory (``a`` itself, or the base of its views)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _describe(a: np.ndarray) -> str:
    return f"a {a.dtype} buffer of {a.nbytes} bytes"


class _Buffer:
    __slots__ = ("owner", "reads", "writer", "what")

    def __init__(self, owner, what):
        self.owner, self.reads, self.writer, self.what = owner, {}, None, what


class StreamMemory:
    def __init__(self):
        self._lock = threading.RLock()
        self.clear()

    def clear(self):
        self.clock = 0
        self.buffers: dict[int, _Buffer] = {}
        self.freed: dict[object, list] = {}      # owner stream -> [(what, {reader: t})]
        self.seen: dict[tuple, int] = {}         # (stream, other) -> other's work up to t is before stream's next
        self.done: dict[object, int] = {}        # stream -> the host waited for its work up to t
        self.done_all = -1

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    # ---- ordering ---------------------------------------------------------------------------------------
    def ordered(self, stream, other, t) -> bool:
        """Is ``other``'s work at time ``t`` ordered before ``stream``'s next work?"""
        if stream is other:
            return True
        if (stream.ptr == 0 and not other.non_blocking) or (other.ptr == 0 and not stream.non_blocking):
            return True                           # the legacy null stream and a blocking stream
        return t <= max(self.seen.get((stream, other), -1), self.done.get(other, -1), self.done_all)

    def wait(self, stream, other, t):
        with self._lock:
            key = (stream, other)
            self.seen[key] = max(self.seen.get(key, -1), t)

    def host_waited(self, stream=None, t=None):
        """The host waited for ``stream``'s work up to ``t`` (all streams' when None)."""
        with self._lock:
            t = self.clock if t is None else t
            if stream is None:
                self.done_all = max(self.done_all, t)
            else:
                self.done[stream] = max(self.done.get(stream, -1), t)

    # ---- buffers ----------------------------------------------------------------------------------------
    def allocate(self, a: np.ndarray, stream) -> None:
        root = storage_root(a)
        with self._lock:
            if id(root) in self.buffers:
                return
            for what, reads in self.freed.pop(stream, []):
                for reader, t in reads.items():
                    if not self.ordered(stream, reader, t):
                        raise StreamOrderError(
                            f"{what} allocated on stream {stream.ptr:#x} was freed while stream {reader.ptr:#x} still "
                            "had reads of it that nothing ordered before this stream's next work: CuPy's pool hands "
                            "the block to this allocation, which may overwrite it under those reads (keep the buffer "
                            "alive until an event recorded after the reads has been waited on)")
            self.buffers[id(root)] = _Buffer(stream, _describe(root))
            weakref.finalize(root, self._free, id(root))

    def _free(self, key):
        with self._lock:
            buf = self.buffers.pop(key, None)
            if buf is None:
                return
            foreign = {s: t for s, t in buf.reads.items() if s is not buf.owner}
            if buf.writer is not None and buf.writer[0] is not buf.owner:
                foreign[buf.writer[0]] = max(foreign.get(buf.writer[0], -1), buf.writer[1])
            if foreign:
                self.freed.setdefault(buf.owner, []).append((buf.what, foreign))

    def read(self, a: np.ndarray, stream) -> None:
        buf = self.buffers.get(id(storage_root(a)))
        if buf is None:
            return
        with self._lock:
            t = self.tick()
            if buf.writer is not None and not self.ordered(stream, *buf.writer):
                raise StreamOrderError(
                    f"stream {stream.ptr:#x} reads {buf.what} that stream {buf.writer[0].ptr:#x} writes, with nothing "
                    "ordering the write first (wait on an event recorded after it)")
            buf.reads[stream] = t

    def write(self, a: np.ndarray, stream) -> None:
        buf = self.buffers.get(id(storage_root(a)))
        if buf is None:
            return
        with self._lock:
            t = self.tick()
            for reader, tr in buf.reads.items():
                if reader is not stream and not self.ordered(stream, reader, tr):
                    raise StreamOrderError(
                        f"stream {stream.ptr:#x} writes {buf.what} that stream {reader.ptr:#x} reads, with nothing "
                        "ordering those reads first (wait on an event recorded after them)")
            buf.writer = (stream, t)
