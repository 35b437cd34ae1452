"""Reading the official pickled data sets without running code from the file.

CIFAR-10's python batches and Chrabaszcz et al.'s downsampled ImageNet hold only dicts
with bytes or str keys, lists, bytes, ints and numpy arrays of numeric dtype. A pickle
can call any importable function while it loads (``__reduce__``), so a crafted
``data_batch_1`` would run arbitrary code under ``pickle.load``. ``load`` unpickles with
an allow-list: the only globals it resolves are the ones numpy arrays, numpy scalars and
dtypes are rebuilt from; anything else stops the load with a one-line error naming the
file and the refused global, before it is called. The result is then checked to hold
only those types.

Memory, disk and time stay bounded by the file's size: an array is only ever built the
way numpy pickles one (``_reconstruct`` of an empty array, then its state from bytes the
file holds), so a few bytes cannot describe a huge array through a shape, a buffer or
zero strides; every array's bytes, and all arrays' bytes together, are at most the
file's size (so replaying one large bytes object through the memo cannot multiply it);
and the walk over the result visits each object once, at most ``MAX_OBJECTS`` of them
(shared references could otherwise make it exponential).
"""
from __future__ import annotations

import math
import os
import pickle

import numpy as np

from .idx import DataFormatError

# (module, name) pairs that rebuild numpy arrays, scalars and dtypes; numpy 2 moved
# numpy.core to numpy._core, and Python 2 pickles name the old module.
ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode")}       # Python 3 writes bytes in protocol 2 as _codecs.encode(str, 'latin1')


MAX_OBJECTS = 1_000_000          # objects the result may hold (the official batches: a few thousand)


class _Budget:
    """The bytes the arrays of one file may still take: at most the file's size."""

    def __init__(self, path, limit: int):
        self.path, self.left = path, int(limit)

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise DataFormatError(f"{self.path}: {what} of {nbytes:,} bytes, more than the file's remaining "
                                  f"{self.left:,} could hold (a crafted shape, or data replayed through references)")
        self.left -= nbytes


class _FromPickle(np.ndarray):
    """What numpy.ndarray stands for inside a pickle: arrays are built as numpy pickles them,
    an empty array whose state (shape, dtype, the bytes) is then set, and every state's
    bytes are charged to the file's budget before they are copied."""

    budget: _Budget = None

    def __new__(cls, *args, **kwargs):
        raise DataFormatError(f"{cls.budget.path}: builds an array directly (numpy.ndarray(shape, dtype, buffer, "
                              "offset, strides)), which numpy's own pickles never do")

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], (bytes, bytearray))):
            raise DataFormatError(f"{self.budget.path}: an array state other than numpy's (shape, dtype, bytes)")
        shape, dtype, raw = state[1], np.dtype(state[2]), state[4]
        n = math.prod(int(d) for d in shape)
        if n < 0 or n * dtype.itemsize != len(raw):
            raise DataFormatError(f"{self.budget.path}: an array of shape {tuple(shape)} and dtype {dtype} whose data "
                                  f"is {len(raw)} bytes")
        self.budget.take(len(raw), f"an array {tuple(shape)} {dtype}")
        super().__setstate__(state)


class _Restricted(pickle.Unpickler):
    def __init__(self, f, path, limit: int, **kwargs):
        super().__init__(f, **kwargs)
        self.path = path
        self.array = type("_FromPickle", (_FromPickle,), {"budget": _Budget(path, limit)})

    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise DataFormatError(f"{self.path}: refused to load {module}.{name} from the pickle (the official files "
                                  "hold only dicts, lists, bytes and numeric numpy arrays; this one may run code)")
        if (module, name) == ("numpy", "ndarray"):
            return self.array
        if name == "_reconstruct":
            return self._reconstruct
        if name == "_frombuffer":
            return self._frombuffer
        return super().find_class(module, name)

    def _reconstruct(self, subtype, shape, dtype):
        """numpy's first step: an empty array of the type; its state comes next."""
        if subtype is not self.array or math.prod(int(d) for d in shape) != 0:
            raise DataFormatError(f"{self.path}: an array built other than numpy pickles one (_reconstruct of "
                                  f"{getattr(subtype, '__name__', subtype)!s}, shape {shape})")
        return np.ndarray.__new__(self.array, shape, dtype)

    def _frombuffer(self, buf, dtype, shape, order):
        """Protocol 5's in-band array: a copy of bytes the file holds."""
        dtype = np.dtype(dtype)
        if not isinstance(buf, (bytes, bytearray)) or math.prod(int(d) for d in shape) * dtype.itemsize != len(buf):
            raise DataFormatError(f"{self.path}: an array of shape {shape} and dtype {dtype} from a buffer that "
                                  "does not hold it")
        self.array.budget.take(len(buf), f"an array {tuple(shape)} {dtype}")
        return np.frombuffer(buf, dtype).reshape(shape, order=order).copy()


def _check(obj, path):
    """The loaded object holds only dicts with str/bytes keys, lists of numbers and strings,
    numbers, strings and numeric arrays, nested at most 4 deep; each object is visited once
    and at most MAX_OBJECTS are. Arrays become plain numpy arrays."""
    seen, todo = set(), [(obj, 0, None, None)]
    while todo:
        o, depth, parent, key = todo.pop()
        if depth > 4:
            raise DataFormatError(f"{path}: nested deeper than the official files")
        if isinstance(o, np.ndarray):
            if not isinstance(o, _FromPickle) and o.base is not None:
                raise DataFormatError(f"{path}: an array that does not own its memory")
            if o.dtype.kind not in "biuf":
                raise DataFormatError(f"{path}: a numpy array of dtype {o.dtype}; the official files hold numbers")
            if isinstance(o, _FromPickle):
                parent[key] = o.view(np.ndarray)
            continue
        if id(o) in seen:
            continue
        seen.add(id(o))
        if len(seen) > MAX_OBJECTS:
            raise DataFormatError(f"{path}: holds more than {MAX_OBJECTS:,} objects")
        if isinstance(o, dict):
            for k, v in o.items():
                if not isinstance(k, (str, bytes)):
                    raise DataFormatError(f"{path}: a key of type {type(k).__name__}; the official files use str/bytes")
                todo.append((v, depth + 1, o, k))
        elif isinstance(o, list):
            if not all(isinstance(v, (int, float, str, bytes, np.integer, np.floating)) for v in o):
                raise DataFormatError(f"{path}: a list holding something other than numbers and strings")
        elif not isinstance(o, (int, float, str, bytes, np.integer, np.floating)):
            raise DataFormatError(f"{path}: holds a {type(o).__name__}")


def load(path, encoding: str = "ASCII") -> dict:
    """The dict in the pickle at ``path``, loaded through the allow-list (see above)."""
    try:
        with open(path, "rb") as f:
            obj = _Restricted(f, path, os.fstat(f.fileno()).st_size, encoding=encoding).load()
    except DataFormatError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise DataFormatError(f"{path}: not a readable pickle ({type(e).__name__}: {' '.join(str(e).split())[:120]})") \
            from None
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: holds a {type(obj).__name__}, expected a dict")
    _check(obj, path)
    return obj
