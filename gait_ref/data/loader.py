"""Batches for training and evaluation, from in-memory arrays or HDF5 shards.

The order of epoch e is a permutation drawn from numpy Generator((seed, 2, e)), so a
loader position is just (epoch, batch index): saving those two numbers in a
checkpoint resumes the data order exactly. A background thread reads and
assembles the next batches (uint8, on the host) while the model trains; conversion
to the run's dtype and the /255 and mean/std normalisation happen on the device.
With cupy, host batches go through pinned memory for asynchronous copies.
"""
from __future__ import annotations

import queue
import threading

import numpy as np

from ..backend import pinned_empty, to_device


class ArraySet:
    """In-memory images (N, C, H, W) uint8 and int labels."""

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int, classes=None):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x, self.y, self.n_classes = x, np.asarray(y, np.int64), int(n_classes)
        self.in_shape = tuple(x.shape[1:])
        self.classes = classes

    def __len__(self):
        return len(self.x)

    def read(self, idx):
        return self.x[idx], self.y[idx]


class BatchLoader:
    def __init__(self, data, batch_size: int, xp, dtype, shuffle=True, seed=0, drop_last=True,
                 mean=None, std=None, prefetch: int = 2, image_size: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if drop_last and len(data) < batch_size:
            raise ValueError(f"--batch-size {batch_size} exceeds the {len(data)} training examples")
        self.data, self.batch_size, self.xp, self.dtype = data, int(batch_size), xp, np.dtype(dtype)
        self.shuffle, self.seed, self.drop_last, self.prefetch = shuffle, int(seed), drop_last, prefetch
        C, H = data.in_shape[0], data.in_shape[-1]
        if image_size and (len(data.in_shape) != 3 or data.in_shape[1] % image_size or H % image_size):
            raise ValueError(f"--image-size {image_size} must divide the stored image size "
                             f"{data.in_shape[1:]} (images are box-downscaled by an integer factor)")
        self.image_size = image_size if image_size and image_size != H else None
        shape = (1, C, 1, 1)
        self._mean = None if mean is None else to_device(np.asarray(mean, self.dtype).reshape(shape), xp)
        self._std = None if std is None else to_device(np.asarray(std, self.dtype).reshape(shape), xp)

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

    def _host_batches(self, epoch, start):
        order = self.order(epoch)
        for b in range(start, self.batches_per_epoch()):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.data.read(idx)
            buf = pinned_empty(x.shape, x.dtype, self.xp)    # plain numpy when not on cupy
            buf[...] = x
            yield b, buf, y

    def to_device(self, x_u8, y):
        """uint8 NCHW host batch -> normalised dtype array and labels on the backend."""
        xp = self.xp
        x = to_device(x_u8, xp).astype(self.dtype)
        if self.image_size:  # box filter by an integer factor f: the mean of each f x f block
            N, C, H, W = x.shape
            S = self.image_size
            x = x.reshape(N, C, S, H // S, S, W // S).mean(axis=(3, 5))
        x *= self.dtype.type(1 / 255)
        if self._mean is not None:
            x -= self._mean
        if self._std is not None:
            x /= self._std
        return x, to_device(y, xp)

    def epoch(self, epoch: int, start: int = 0):
        """Yield (batch index, x, y) for ``epoch`` from batch ``start``, prefetching in a thread."""
        if self.prefetch <= 0:
            for b, x, y in self._host_batches(epoch, start):
                yield (b,) + self.to_device(x, y)
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
                for item in self._host_batches(epoch, start):
                    if not put(item):
                        return
                put(done)
            except BaseException as e:  # handed to the consumer, raised there
                put(e)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                b, x, y = item
                yield (b,) + self.to_device(x, y)
        finally:
            stop.set()
            t.join()
