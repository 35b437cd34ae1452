"""Batches for training and evaluation, from in-memory arrays or HDF5 shards.

Order. The order of epoch e is a permutation drawn from numpy Generator((seed, 2, e)),
so a loader position is just (epoch, batch index): saving those two numbers in a
checkpoint resumes the data order exactly. ``batch_size`` is the *global* batch; a
loader made for rank r of W processes (``part=(r, W)``) yields rows
[r B/W, (r + 1) B/W) of every global batch, so the data order does not depend on W.

Reading (host). In the background, ahead of the model (``prefetch`` batches):
  workers = 0   one thread in this process (in-memory arrays; small shard sets);
  workers = N   N worker processes, each with its own shard files open, reading whole
                batches into shared-memory slots (h5py serialises reads within one
                process, so threads would not read in parallel).
Images stay uint8 in their stored memory layout (shards: NHWC behind an NCHW-shaped
view; the convolutions want channels-last memory anyway).

To the device. Each batch is one host-to-device copy: images and labels packed into one
page-locked (pinned) buffer, copied asynchronously on a copy stream that the compute
stream waits on, into one of a ring of device buffers the loader owns (``DEVICE_RING``).
A batch's device memory is never freed to CuPy's pool: the pool is stream-ordered, so a
buffer allocated on the copy stream and dropped after the step would go straight to the
copy stream's next batch while the compute stream may still be reading it (the copy
stream does not wait for the compute stream). Instead, at each request for a batch the
loader records an event on the compute stream, and the copy into a ring slot first waits
on the event recorded at the request before: everything the caller queued on the slot's
previous batch (two batches earlier) is then ordered before the overwrite, and the copy
still overlaps the step before it. So a batch's arrays stay valid until two more batches
have been requested. Conversion to the run's dtype, the /255, mean/std and any integer box
downscale happen on the device. With ``in_memory="device"`` the whole uint8 data set
lives on the device and a batch is a gather: no copy per step at all (the epoch's
permutation is copied once per epoch).

Time spent waiting for a batch is the caller's to measure (the trainer logs it as
``data_wait_s``).
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import signal
import threading
import traceback
from multiprocessing import shared_memory

import numpy as np

from ..backend import is_device, pinned_empty, to_device
from ..stopping import STOP_SIGNALS
from .idx import DataFormatError
from .shards import shards_under


class ArraySet:
    """In-memory images (N, C, H, W) uint8 (any memory layout) and int labels."""

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int, classes=None, source: str = "arrays"):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x, self.y, self.n_classes = x, np.asarray(y, np.int64), int(n_classes)
        self.in_shape = tuple(x.shape[1:])
        self.classes = classes
        bad = np.flatnonzero((self.y < 0) | (self.y >= self.n_classes))
        if len(bad):
            raise DataFormatError(f"{source}: label {int(self.y[bad[0]])} at index {int(bad[0])} is outside "
                                  f"0..{self.n_classes - 1}")

    def __len__(self):
        return len(self.x)

    def digest(self) -> str:
        """SHA-256 of the images (in NCHW order, whatever the layout) and labels."""
        h = hashlib.sha256(f"{self.x.shape}".encode())
        h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(self.y.tobytes())
        return h.hexdigest()

    def read(self, idx):
        if channels_last(self.x):       # gather in the storage layout, hand back the NCHW view
            return self.x.transpose(0, 2, 3, 1)[idx].transpose(0, 3, 1, 2), self.y[idx]
        return self.x[idx], self.y[idx]


def channels_last(x) -> bool:
    """True when an (N, C, H, W)-shaped uint8 array has NHWC memory (C varies fastest)."""
    return x.shape[1] > 1 and x.strides[1] == x.itemsize


# ---- worker processes ----------------------------------------------------------------------------------
def _slot_views(buf, shape, n_max):
    """(images (n_max, *storage shape) uint8, labels (n_max,) int64) inside one shared buffer."""
    nx = n_max * int(np.prod(shape))
    x = np.ndarray((n_max,) + tuple(shape), np.uint8, buffer=buf, offset=0)
    y = np.ndarray((n_max,), np.int64, buffer=buf, offset=-(-nx // 8) * 8)
    return x, y


def _slot_bytes(shape, n_max):
    return -(-n_max * int(np.prod(shape)) // 8) * 8 + 8 * n_max


def _worker_main(data, slot_names, storage_shape, n_max, jobs, results, parent_pid):
    """Read whole batches into shared-memory slots: jobs (token, slot, idx) -> results
    (token, slot, n) or (token, slot, error message).

    The main process decides when reading stops: the signals a scheduler or a terminal sends
    to the whole process group (SIGTERM, SIGUSR1, SIGINT) are ignored here, so the main
    process can checkpoint and close its workers; a worker whose parent has died (SIGKILL)
    exits instead of waiting for jobs forever."""
    for name in STOP_SIGNALS + ("SIGINT",):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    slots = [shared_memory.SharedMemory(name=n) for n in slot_names]
    views = [_slot_views(s.buf, storage_shape, n_max) for s in slots]
    try:
        while True:
            try:
                job = jobs.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent_pid:
                    return
                continue
            if job is None:
                return
            token, slot, idx = job
            try:
                x, y = data.read(idx)                             # (n, C, H, W) view of NHWC, or NCHW
                xs = x.transpose(0, 2, 3, 1) if channels_last(x) else x
                views[slot][0][:len(idx)] = xs.reshape((len(idx),) + tuple(storage_shape))
                views[slot][1][:len(idx)] = y
                results.put((token, slot, len(idx)))
            except Exception as e:  # handed to the consumer, raised there with the shard named
                results.put((token, slot, f"{type(e).__name__}: {e}" if isinstance(e, DataFormatError)
                             else traceback.format_exc(limit=3)))
    finally:
        del views
        for s in slots:
            s.close()


class _ProcessReader:
    """N persistent worker processes reading batches into 2N shared-memory slots."""

    def __init__(self, data, n_workers: int, n_max: int):
        x0, _ = data.read(np.arange(1))
        self.channels_last = channels_last(x0)
        C, H, W = data.in_shape
        self.storage_shape = (H, W, C) if self.channels_last else (C, H, W)
        self.n_max = int(n_max)
        n_slots = 2 * n_workers
        size = _slot_bytes(self.storage_shape, self.n_max)
        self._shm = [shared_memory.SharedMemory(create=True, size=size) for _ in range(n_slots)]
        self.views = [_slot_views(s.buf, self.storage_shape, self.n_max) for s in self._shm]
        ctx = mp.get_context("spawn")                           # safe beside threads, CUDA and MPI
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, daemon=True, name=f"gait_ref-loader-{i}",
                                  args=(data, [s.name for s in self._shm], self.storage_shape, self.n_max,
                                        self.jobs, self.results, os.getpid()))
                      for i in range(n_workers)]
        for p in self.procs:
            p.start()
        self.free = list(range(n_slots))
        self.token = 0          # batches of an abandoned epoch come back with an old token
        self._n = {}            # slot -> rows it holds
        self.in_flight = {}     # slot -> batch number being read into it

    def batches(self, index_lists):
        """Yield (x view, y view, release) in order; call release() when done with the views.
        Every slot is free, in flight (``self.in_flight``: a worker is filling it) or holds
        a batch not yet released; leaving early frees the last kind, ``drain`` the second."""
        self.token += 1
        token, ready, nxt = self.token, {}, 0        # ready: batch number -> slot
        todo = iter(enumerate(index_lists))
        exhausted = False
        try:
            while True:
                while self.free and not exhausted:
                    item = next(todo, None)
                    if item is None:
                        exhausted = True
                        break
                    k, idx = item
                    slot = self.free.pop()
                    self.in_flight[slot] = k
                    self.jobs.put((token, slot, np.asarray(idx)))
                if nxt in ready:
                    slot = ready.pop(nxt)
                    n = self._n[slot]
                    x, y = self.views[slot][0][:n], self.views[slot][1][:n]
                    if self.channels_last:
                        x = x.transpose(0, 3, 1, 2)
                    yield x, y, (lambda s=slot: self.free.append(s))
                    nxt += 1
                    continue
                if exhausted and not self.in_flight:
                    return
                tok, slot, res = self._get()
                k = self.in_flight.pop(slot)
                if tok != token:                                    # an abandoned epoch's batch
                    self.free.append(slot)
                    continue
                if isinstance(res, str):
                    self.free.append(slot)
                    raise DataFormatError(res)
                self._n[slot] = res
                ready[k] = slot
        finally:
            self.free.extend(ready.values())

    def _get(self):
        while True:
            try:
                return self.results.get(timeout=5.0)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    raise DataFormatError(f"loader worker {dead[0].name} died (exit code {dead[0].exitcode})")

    def drain(self):
        """Wait for the batches still being read (after an early exit) and free their slots."""
        while self.in_flight:
            _, slot, _ = self._get()
            self.in_flight.pop(slot, None)
            self.free.append(slot)

    def close(self):
        """Stop the workers: each gets an end-of-jobs sentinel; one that has not ended within
        5 s (blocked, e.g. on a queue lock a killed worker held) is killed. Workers ignore
        SIGTERM by design, so terminate() would leave it running, and the interpreter's exit,
        which joins daemonic children, waiting for it forever."""
        for _ in self.procs:
            self.jobs.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.views = []
        for s in self._shm:
            s.close()
            s.unlink()
        self._shm = []


class _ThreadReader:
    """One background thread reading batches in order into a bounded queue."""

    def __init__(self, data, prefetch: int):
        self.data, self.prefetch = data, prefetch

    def batches(self, index_lists):
        if self.prefetch <= 0:
            for idx in index_lists:
                x, y = self.data.read(idx)
                yield x, y, None
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            """Hand ``item`` over unless the consumer has stopped (then never block)."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for idx in index_lists:
                    if not put(self.data.read(idx)):
                        return
                put(done)
            except BaseException as e:  # handed to the consumer, raised there
                put(e)

        t = threading.Thread(target=work, daemon=True, name="gait_ref-loader")
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item[0], item[1], None
        finally:
            stop.set()
            t.join()

    def close(self):
        pass


# ---- the loader ---------------------------------------------------------------------------------------------
DEVICE_RING = 3          # device batch buffers: a slot is reused two requests after its batch


class BatchLoader:
    def __init__(self, data, batch_size: int, xp, dtype, shuffle=True, seed=0, drop_last=True,
                 mean=None, std=None, prefetch: int = 2, image_size: int | None = None, workers: int = 0,
                 in_memory: str | None = None, part=(0, 1), quiet: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if drop_last and len(data) < batch_size:
            raise ValueError(f"--batch-size {batch_size} exceeds the {len(data)} training examples")
        rank, world = part
        if drop_last and batch_size % world:
            raise ValueError(f"--batch-size {batch_size} is not divisible by the {world} processes "
                             f"(each takes an equal share of the global batch)")
        if in_memory not in (None, "host", "device"):
            raise ValueError(f"--in-memory must be host or device, got {in_memory!r}")
        self.data, self.batch_size, self.xp, self.dtype = data, int(batch_size), xp, np.dtype(dtype)
        self.shuffle, self.seed, self.drop_last, self.prefetch = shuffle, int(seed), drop_last, prefetch
        self.rank, self.world = int(rank), int(world)
        C, H = data.in_shape[0], data.in_shape[-1]
        if image_size and (len(data.in_shape) != 3 or data.in_shape[1] % image_size or H % image_size):
            raise ValueError(f"--image-size {image_size} must divide the stored image size "
                             f"{data.in_shape[1:]} (images are box-downscaled by an integer factor)")
        self.image_size = image_size if image_size and image_size != H else None
        shape = (1, C, 1, 1)
        self._mean = None if mean is None else to_device(np.asarray(mean, self.dtype).reshape(shape), xp)
        self._std = None if std is None else to_device(np.asarray(std, self.dtype).reshape(shape), xp)
        self.in_memory, self.workers, self.quiet = in_memory, int(workers), quiet
        self.reader, self._device_data = None, None    # set up at the first epoch (after verification)
        self._shards = shards_under(data)
        self._pinned, self._copy_stream = [], None
        self._ring, self._ring_next, self._requested = [None] * DEVICE_RING, 0, None

    def _setup(self):
        """Load into memory, or start the reader (worker processes get the data set as it is
        now, shards verified)."""
        data = self.data
        if self.in_memory is not None and hasattr(data, "read_all"):
            data = self.data = ArraySet(*data.read_all(quiet=self.quiet), data.n_classes)
        if self.in_memory == "device":
            self._device_data = self._to_device_memory(data)
        elif self.workers and hasattr(data, "entries"):          # shard sets: worker processes
            self.reader = _ProcessReader(data, self.workers, -(-self.batch_size // self.world))
        else:
            self.reader = _ThreadReader(data, self.prefetch)

    # ---- order ------------------------------------------------------------------------------------------------
    @property
    def in_shape(self):
        C, H, W = self.data.in_shape
        return (C, self.image_size, self.image_size) if self.image_size else (C, H, W)

    def batches_per_epoch(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.data)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, 2, int(epoch)]).permutation(n)

    def _local(self, rows: np.ndarray) -> np.ndarray:
        """This rank's share of one global batch's rows."""
        return np.array_split(rows, self.world)[self.rank]

    def index_lists(self, epoch: int, start: int = 0):
        order = self.order(epoch)
        for b in range(start, self.batches_per_epoch()):
            yield self._local(order[b * self.batch_size:(b + 1) * self.batch_size])

    # ---- to the device --------------------------------------------------------------------------------------------
    def _to_device_memory(self, data):
        xp = self.xp
        need = data.x.nbytes + data.y.nbytes
        if is_device(xp):
            free, _ = xp.cuda.Device().mem_info
            if need > 0.5 * free:
                raise ValueError(f"--in-memory device: the data set is {need / 2**30:.1f} GiB, more than half of the "
                                 f"{free / 2**30:.1f} GiB free on the device; use --in-memory host")
        x = data.x
        last = channels_last(x)
        store = np.ascontiguousarray(x.transpose(0, 2, 3, 1) if last else x)
        x_dev = to_device(store, xp)
        return (x_dev.transpose(0, 3, 1, 2) if last else x_dev), to_device(data.y, xp)

    def _pinned_buffer(self, nbytes):
        """A pinned host buffer whose previous copy has finished (a small ring)."""
        for i, (buf, ev) in enumerate(self._pinned):
            if buf.nbytes >= nbytes and (ev is None or ev.done):
                self._pinned.append(self._pinned.pop(i))
                return buf, len(self._pinned) - 1
        if len(self._pinned) >= self.prefetch + 3:            # all busy: wait for the oldest copy
            buf, ev = self._pinned.pop(0)
            ev.synchronize()
            self._pinned.append((buf, None))
            if buf.nbytes >= nbytes:
                return buf, len(self._pinned) - 1
            self._pinned.pop()
        buf = pinned_empty((nbytes,), np.uint8, self.xp)
        self._pinned.append((buf, None))
        return buf, len(self._pinned) - 1

    def _ring_slot(self, nbytes):
        """The next device buffer of the ring (see the module docstring) and the compute
        stream's event its copy must wait for: the one recorded at the request before this
        one, after every use of the slot's last batch (None for a new buffer)."""
        xp = self.xp
        compute = xp.cuda.get_current_stream()
        previous, self._requested = self._requested, compute.record()    # the caller's work so far
        i = self._ring_next
        self._ring_next = (i + 1) % DEVICE_RING
        slot = self._ring[i]
        if slot is None or slot.nbytes < nbytes:
            slot = self._ring[i] = xp.empty((nbytes,), dtype=xp.uint8)      # on the compute stream's arena
            previous = None                                                # nothing has read it yet
        return slot[:nbytes], previous

    def _copy_to_device(self, x_u8, y):
        """One host-to-device copy of (images, labels) through a pinned buffer into a ring
        slot, on a copy stream the compute stream then waits on. Returns device (x uint8
        NCHW-shaped, y), views of the slot."""
        xp = self.xp
        last = channels_last(x_u8)
        store = x_u8.transpose(0, 2, 3, 1) if last else x_u8             # memory order of the batch
        nx = store.size
        off = -(-nx // 8) * 8
        n = off + 8 * len(y)
        buf, i = self._pinned_buffer(n)
        np.copyto(buf[:nx].reshape(store.shape), store)
        buf[off:n].view(np.int64)[:] = y
        if self._copy_stream is None:
            self._copy_stream = xp.cuda.Stream(non_blocking=True)
        dev, reusable = self._ring_slot(n)
        with self._copy_stream:
            if reusable is not None:
                self._copy_stream.wait_event(reusable)   # the slot's last batch is no longer read
            dev.set(buf[:n], stream=self._copy_stream)  # async from pinned memory
            ev = self._copy_stream.record()
        xp.cuda.get_current_stream().wait_event(ev)
        self._pinned[i] = (buf, ev)
        x = dev[:nx].reshape(store.shape)
        return (x.transpose(0, 3, 1, 2) if last else x), dev[off:].view(xp.int64)

    def _normalise(self, x):
        """uint8 images on the device -> the run's dtype, /255, box downscale, mean/std."""
        x = x.astype(self.dtype)
        if self.image_size:  # box filter by an integer factor f: the mean of each f x f block
            N, C, H, W = x.shape
            S = self.image_size
            x = x.reshape(N, C, S, H // S, S, W // S).mean(axis=(3, 5))
        x *= self.dtype.type(1 / 255)
        if self._mean is not None:
            x -= self._mean
        if self._std is not None:
            x /= self._std
        return x

    def to_device(self, x_u8, y):
        """uint8 NCHW host batch -> normalised dtype array and labels on the backend (new
        arrays: the host buffers may be reused as soon as this returns)."""
        if is_device(self.xp):
            x_u8, y = self._copy_to_device(x_u8, y)
            return self._normalise(x_u8), y
        return self._normalise(x_u8), np.array(y)

    # ---- epochs ---------------------------------------------------------------------------------------------------
    def epoch(self, epoch: int, start: int = 0):
        """Yield (batch index, x, y) for ``epoch`` from batch ``start``: this rank's rows."""
        if self.reader is None and self._device_data is None:
            self._setup()
        if self._shards is not None and self.in_memory is None:       # read from the files: still as verified
            self._shards.check_unchanged()
        if self._device_data is not None:
            yield from self._device_epoch(epoch, start)
            return
        batches = self.reader.batches(self.index_lists(epoch, start))
        b = start
        try:
            for x, y, release in batches:
                xd, yd = self.to_device(x, y)
                if release is not None:
                    release()
                yield (b, xd, yd)
                b += 1
        finally:
            batches.close()
            if isinstance(self.reader, _ProcessReader):
                self.reader.drain()

    def _device_epoch(self, epoch, start):
        xp = self.xp
        x_all, y_all = self._device_data
        n, B, order = self.batches_per_epoch(), self.batch_size, self.order(epoch)
        rows = [self._local(order[b * B:(b + 1) * B]) for b in range(n)]
        flat = to_device(np.concatenate(rows[start:]).astype(np.int64), xp)    # one copy per epoch
        pos = 0
        for b in range(start, n):
            idx = flat[pos:pos + len(rows[b])]
            pos += len(rows[b])
            yield b, self._normalise(x_all[idx]), y_all[idx]

    def close(self):
        if self.reader is not None:
            self.reader.close()
            self.reader = None
