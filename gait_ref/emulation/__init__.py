"""A strict CPU emulation of CuPy, for proving the device path without a GPU.

``gait_ref.backend.get_backend("emulated")`` returns this module. It behaves like the
``cupy`` module where gait_ref's code could tell the difference, and it refuses what
real CuPy refuses:

* arrays live "on the device": ``ndarray`` wraps a numpy array that code outside this
  module never sees. ``numpy.asarray(a)`` raises TypeError (CuPy 14:
  "Implicit conversion to a NumPy array is not allowed"), and so does mixing a numpy
  array into a device operation (``dev + host``, ``xp.concatenate([dev, host])``);
* the namespace holds only what the installed CuPy release exports: the names in
  ``cupy-api.json`` (generated from the cupy-cuda12x 14.2.0 wheel by
  ``make_api_list.py``) that numpy also implements. Anything else is AttributeError;
* every device-to-host read is counted in ``counters["d2h"]`` (``float(a)``,
  ``bool(a)``, ``int(a)``, ``a.item()``, ``a.get()``, ``a.tolist()``, boolean-mask
  indexing and ``nonzero``, whose result size lives on the device), every explicit
  synchronisation in ``counters["sync"]`` (``Stream.synchronize``,
  ``Event.synchronize``, ``cuda.Device.synchronize``), and every host-to-device copy in
  ``counters["h2d"]`` / ``counters["h2d_bytes"]`` (``asarray`` of host data,
  ``ndarray.set``, host index arrays).

Reductions return 0-d device arrays, as in CuPy, so ``float(x.sum())`` is a counted
read. Random numbers come from ``random.default_rng(seed)`` (numpy's PCG64 under the
hood: the same API as CuPy's Generator, not the same numbers). Streams and events
exist and record wall-clock times; work runs eagerly, so an event is always done.
``cuda.nccl`` is absent (NCCL needs real GPUs; see gait_ref.distributed).
"""
from __future__ import annotations

import json
import threading
import time
import types
from pathlib import Path

import numpy as _np
import scipy.linalg as _scipy_linalg

API = json.loads((Path(__file__).with_name("cupy-api.json")).read_text())
__version__ = API["cupy_version"] + "+emulated"

counters = {"d2h": 0, "sync": 0, "h2d": 0, "h2d_bytes": 0}
_lock = threading.Lock()


def reset_counters() -> dict:
    """Zero the counters; returns their values before."""
    with _lock:
        before = dict(counters)
        for k in counters:
            counters[k] = 0
    return before


def _count(key: str, n: int = 1) -> None:
    with _lock:
        counters[key] += n


# ---- device arrays -----------------------------------------------------------------------------
class MemoryPointer:
    """``a.data``: the device address (``ptr``) of an array's first element."""

    def __init__(self, owner):
        self._owner = owner

    @property
    def ptr(self) -> int:
        return int(self._owner._a.__array_interface__["data"][0])


class Flags:
    def __init__(self, a):
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = bool(a.flags.owndata)

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[key]


def _refuse_host(obj, where: str):
    if isinstance(obj, _np.ndarray):
        raise TypeError(f"Unsupported type {type(obj)} in {where}: a numpy array mixed into a device "
                        "operation (move it with gait_ref.backend.to_device first)")


def _unwrap(obj, where: str):
    """Device arrays -> their numpy storage, recursively; numpy arrays are refused."""
    if isinstance(obj, ndarray):
        return obj._a
    _refuse_host(obj, where)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o, where) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v, where) for k, v in obj.items()}
    return obj


def _wrap(obj):
    """numpy results -> device arrays; numpy scalars -> 0-d device arrays (CuPy returns
    arrays from reductions); tuples elementwise; anything else unchanged."""
    if isinstance(obj, _np.ndarray):
        return ndarray(obj)
    if isinstance(obj, _np.generic):
        return ndarray(_np.asarray(obj))
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list) and obj and all(isinstance(o, _np.ndarray) for o in obj):
        return [ndarray(o) for o in obj]
    return obj


def _is_host_index(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (_np.ndarray, list)) for k in keys)


def _index(key, where: str):
    """A device-array index: unwrap it. Host index arrays and lists are copied to the
    device first in CuPy (counted); a boolean device mask needs its count of True on the
    host (counted as a read)."""
    keys = key if isinstance(key, tuple) else (key,)
    out = []
    for k in keys:
        if isinstance(k, ndarray):
            if k.dtype == _np.bool_:
                _count("d2h")
            out.append(k._a)
        elif isinstance(k, (_np.ndarray, list)):
            arr = _np.asarray(k)
            _count("h2d")
            _count("h2d_bytes", arr.nbytes)
            if arr.dtype == _np.bool_:
                _count("d2h")
            out.append(arr)
        else:
            out.append(k)
    return tuple(out) if isinstance(key, tuple) else out[0]


class ndarray:
    """A device array (see the module docstring)."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100

    def __init__(self, a):
        if not isinstance(a, _np.ndarray):
            raise TypeError(f"ndarray wraps numpy storage, got {type(a)}")
        self._a = a

    # -- attributes ------------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    T = property(lambda self: ndarray(self._a.T))
    mT = property(lambda self: ndarray(_np.swapaxes(self._a, -1, -2)))
    flags = property(lambda self: Flags(self._a))
    data = property(lambda self: MemoryPointer(self))
    device = property(lambda self: cuda.Device(0))
    base = property(lambda self: None if self._a.base is None else ndarray(_np.asarray(self._a.base)))

    def __repr__(self):
        return f"emulated.ndarray(shape={self.shape}, dtype={self.dtype})"

    # -- what CuPy refuses or counts -------------------------------------------------------------
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for x in inputs + tuple(kwargs.get("out", ())):
            _refuse_host(x, f"numpy.{ufunc.__name__}")
        name = ufunc.__name__
        if name not in API["cupy"] or method != "__call__":
            return NotImplemented
        out = kwargs.pop("out", None)
        res = getattr(ufunc, method)(*_unwrap(inputs, name), **_unwrap(kwargs, name),
                                     **({"out": _unwrap(out, name)} if out else {}))
        return out[0] if out else _wrap(res)

    def __array_function__(self, func, types_, args, kwargs):
        name = func.__name__
        if name not in API["cupy"] or not all(issubclass(t, ndarray) for t in types_):
            return NotImplemented
        return globals()[name](*args, **kwargs) if name in globals() else NotImplemented

    def _read(self):
        _count("d2h")
        return self._a

    def __float__(self):
        return float(self._read())

    def __int__(self):
        return int(self._read())

    def __bool__(self):
        return bool(self._read())

    def __complex__(self):
        return complex(self._read())

    def get(self, stream=None, order="C", out=None):
        a = _np.array(self._read(), order=order)
        if out is not None:
            out[...] = a
            return out
        return a

    def item(self, *args):
        return self._read().item(*args)

    def tolist(self):
        return self._read().tolist()

    def tobytes(self, order="C"):
        return self._read().tobytes(order)

    def nonzero(self):
        return _wrap(self._read().nonzero())

    def set(self, arr, stream=None):
        """Copy host data into this array (an H2D copy)."""
        arr = _np.asarray(arr)
        if arr.shape != self.shape:
            raise ValueError(f"set: shape {arr.shape} does not match {self.shape}")
        _count("h2d")
        _count("h2d_bytes", arr.nbytes)
        self._a[...] = arr

    # -- indexing -----------------------------------------------------------------------------------
    def __getitem__(self, key):
        return _wrap(self._a[_index(key, "__getitem__")])

    def __setitem__(self, key, value):
        if isinstance(value, _np.ndarray) and value.ndim > 0:
            _count("h2d")                                   # CuPy copies a host value over
            _count("h2d_bytes", value.nbytes)
            v = value
        else:
            v = _unwrap(value, "__setitem__")
        self._a[_index(key, "__setitem__")] = v

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(_np.asarray(r)) if not isinstance(r, _np.ndarray) else ndarray(r) for r in self._a)

    def __copy__(self):
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray(self._a.copy())

    def __getstate__(self):
        raise TypeError("pickling a device array would hide a device-to-host copy; use .get()")


def _binary(name):
    def op(self, other):
        return _wrap(getattr(self._a, name)(_unwrap(other, name)))
    op.__name__ = name
    return op


def _inplace(name):
    def op(self, other):
        getattr(self._a, name)(_unwrap(other, name))
        return self
    op.__name__ = name
    return op


def _unary(name):
    def op(self):
        return _wrap(getattr(self._a, name)())
    op.__name__ = name
    return op


for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
           "lshift", "rshift", "divmod"):
    for _d in (f"__{_n}__", f"__r{_n}__"):
        if _d in API["cupy.ndarray"]:
            setattr(ndarray, _d, _binary(_d))
    if f"__i{_n}__" in API["cupy.ndarray"]:
        setattr(ndarray, f"__i{_n}__", _inplace(f"__i{_n}__"))
for _d in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(ndarray, _d, _binary(_d))
for _d in ("__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(ndarray, _d, _unary(_d))
ndarray.__hash__ = None


def _method(name):
    def m(self, *args, **kwargs):
        return _wrap(getattr(self._a, name)(*_unwrap(args, name), **_unwrap(kwargs, name)))
    m.__name__ = name
    return m


_OWN = {"get", "item", "tolist", "tobytes", "nonzero", "set", "T", "mT", "shape", "dtype", "ndim", "size",
        "strides", "nbytes", "itemsize", "flags", "data", "device", "base"}
for _n in API["cupy.ndarray"]:
    if not _n.startswith("_") and _n not in _OWN and hasattr(_np.ndarray, _n):
        setattr(ndarray, _n, _method(_n))


# ---- the namespace ---------------------------------------------------------------------------------
def _function(name, impl):
    def f(*args, **kwargs):
        return _wrap(impl(*_unwrap(args, name), **_unwrap(kwargs, name)))
    f.__name__ = name
    f.__qualname__ = name
    return f


def asarray(a, dtype=None, order=None, *, blocking=False):
    """Host data -> a device array (an H2D copy); a device array passes through."""
    if isinstance(a, ndarray):
        return a if dtype is None else a.astype(dtype, copy=False)
    host = _np.asarray(a, dtype=dtype, order=order)
    _count("h2d")
    _count("h2d_bytes", host.nbytes)
    return ndarray(_np.array(host, copy=True))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        return ndarray(_np.array(obj._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    return asarray(_np.array(obj, dtype=dtype, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    return a.get(order=order, out=out) if isinstance(a, ndarray) else _np.asarray(a, order=order)


def get_array_module(*args):
    return _this


def is_available() -> bool:
    return True


_OWN_FUNCTIONS = {"asarray", "array", "asnumpy", "get_array_module", "is_available", "ndarray", "random",
                  "linalg", "lib", "cuda", "fft", "testing"}
_namespace = {}
for _n in API["cupy"]:
    if _n in _OWN_FUNCTIONS or _n.startswith("_") or not hasattr(_np, _n):
        continue
    _obj = getattr(_np, _n)
    if isinstance(_obj, (type, _np.dtype, int, float)) or _obj is None:
        _namespace[_n] = _obj                        # dtypes (float32, ...) and constants
    elif callable(_obj):
        _namespace[_n] = _function(_n, _obj)
globals().update(_namespace)


def _submodule(name, source, names, own=None):
    mod = types.ModuleType(f"{__name__}.{name}")
    for n in names:
        if own and n in own:
            setattr(mod, n, own[n])
        elif not n.startswith("_") and hasattr(source, n) and callable(getattr(source, n)):
            setattr(mod, n, _function(n, getattr(source, n)))
    return mod


linalg = _submodule("linalg", _np.linalg, API["cupy.linalg"])
lib = types.ModuleType(f"{__name__}.lib")
lib.stride_tricks = _submodule("lib.stride_tricks", _np.lib.stride_tricks, API["cupy.lib.stride_tricks"])


# ---- random -------------------------------------------------------------------------------------
class Generator:
    """CuPy's Generator API over numpy's PCG64 (same calls, not the same numbers)."""

    def __init__(self, seed):
        self._g = _np.random.default_rng(seed)

    def __getattr__(self, name):
        if name not in API["cupy.random.Generator"]:
            raise AttributeError(f"cupy.random.Generator has no attribute {name!r}")
        impl = getattr(self._g, name)
        return lambda *a, **k: _wrap(_np.asarray(impl(*_unwrap(a, name), **_unwrap(k, name))))


def default_rng(seed=None):
    return Generator(seed)


random = _submodule("random", _np.random, [], own={})
random.default_rng = default_rng
random.Generator = Generator


# ---- cuda: streams, events, devices -----------------------------------------------------------------
class _Stream:
    """A CUDA stream: work runs eagerly, so it is always done; synchronize is counted."""

    _current = threading.local()

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self.ptr = 0 if null else id(self)
        self.device_id = 0
        self.non_blocking = non_blocking

    @property
    def done(self):
        return True

    def synchronize(self):
        _count("sync")

    def record(self, event=None):
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event):
        pass

    def use(self):
        _Stream._current.stream = self
        return self

    def __enter__(self):
        stack = getattr(_Stream._current, "stack", [])
        stack.append(getattr(_Stream._current, "stream", None))
        _Stream._current.stack = stack
        _Stream._current.stream = self
        return self

    def __exit__(self, *exc):
        _Stream._current.stream = _Stream._current.stack.pop()


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.ptr = id(self)
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    @property
    def done(self):
        return True

    def synchronize(self):
        _count("sync")


def get_elapsed_time(start_event, end_event) -> float:
    """Milliseconds between two recorded events (both are complete: no wait)."""
    if start_event._t is None or end_event._t is None:
        raise RuntimeError("get_elapsed_time: an event was never recorded")
    return (end_event._t - start_event._t) * 1e3


class Device:
    def __init__(self, device=0):
        self.id = int(device)

    def synchronize(self):
        _count("sync")

    @property
    def mem_info(self):
        total = 16 << 30
        return total, total

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _get_current_stream():
    return getattr(_Stream._current, "stream", None) or _Stream.null


_Stream.null = _Stream(null=True)
cuda = types.ModuleType(f"{__name__}.cuda")
cuda.Stream = _Stream
cuda.Event = Event
cuda.Device = Device
cuda.get_elapsed_time = get_elapsed_time
cuda.get_current_stream = _get_current_stream
cuda.is_available = is_available
cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)


# ---- cupyx: pinned host memory, scipy.linalg ----------------------------------------------------------
def empty_pinned(shape, dtype=float, order="C"):
    """Page-locked host memory is an ordinary numpy array, as in CuPy."""
    return _np.empty(shape, dtype=dtype, order=order)


def _lu_factor(a, overwrite_a=False, check_finite=True):
    lu, piv = _scipy_linalg.lu_factor(_unwrap(a, "lu_factor"), overwrite_a=overwrite_a, check_finite=False)
    return ndarray(lu), ndarray(piv)


def _lu_solve(lu_and_piv, b, trans=0, overwrite_b=False, check_finite=True):
    lu, piv = lu_and_piv
    return ndarray(_scipy_linalg.lu_solve((_unwrap(lu, "lu_solve"), _unwrap(piv, "lu_solve")),
                                          _unwrap(b, "lu_solve"), trans=trans, check_finite=False))


cupyx = types.ModuleType(f"{__name__}.cupyx")
cupyx.empty_pinned = empty_pinned
cupyx.scipy = types.SimpleNamespace(linalg=_submodule(
    "cupyx.scipy.linalg", _scipy_linalg, API["cupyx.scipy.linalg"],
    own={"lu_factor": _lu_factor, "lu_solve": _lu_solve}))

import sys as _sys  # noqa: E402

_this = _sys.modules[__name__]
