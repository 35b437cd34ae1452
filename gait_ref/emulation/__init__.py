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
  ``ndarray.set``, host index arrays);
* CuPy's own reads inside its functions (``argpartition`` reads twice through
  ``unravel_index``, ``nonzero``, one-argument ``where``, ``unique``, ``repeat`` with an
  array, ...): ``cupy-syncs.json``, made from CuPy 14.2's source by ``find_syncs.py``,
  lists every function that reads and how often, and every function that does not; a
  call of a listed one adds its reads to ``counters["d2h"]`` (and
  ``counters["internal_reads"]``). ``called`` collects every name gait_ref calls, so a
  test can refuse a call that is in neither list;
* kernel launches, as CuPy 14.2 makes them (``launches.py``): ``counters["launch"]``,
  and ``counters["pointer_tables"]`` for the host-to-device pointer tables of a
  concatenate of more than 8 arrays (apart from ``h2d``). ``with launch_trace() as t:`` records
  each launch's kind, bytes and flops for the cost model (``bench/gpu_model.py``);
* CuPy's stream-ordered memory pool (``memory.py``): an array belongs to the stream it
  was allocated on, and a read, write or reuse across streams that nothing orders
  raises ``StreamOrderError``;
* CuPy's dtypes and layouts where they differ from numpy's: elementwise results are
  C-ordered (numpy keeps the inputs' layout), and ``linalg`` computes float32 in float32
  (numpy computes it in float64 and rounds).

Reductions return 0-d device arrays, as in CuPy, so ``float(x.sum())`` is a counted
read. Random numbers come from ``random.default_rng(seed)`` (numpy's PCG64 under the
hood: the same API as CuPy's Generator, not the same numbers). Streams and events
exist and record wall-clock times; work runs eagerly, so an event is always done.
``cuda.nccl`` is absent (NCCL needs real GPUs; see gait_ref.distributed).
"""
from __future__ import annotations

import builtins as _builtins
import json
import threading
import time
import types
from pathlib import Path

import numpy as _np
import scipy.linalg as _scipy_linalg

from . import launches as _launches
from .memory import StreamMemory, StreamOrderError  # noqa: F401  (StreamOrderError is public)

API = json.loads((Path(__file__).with_name("cupy-api.json")).read_text())
SYNC_SURVEY = json.loads((Path(__file__).with_name("cupy-syncs.json")).read_text())
__version__ = API["cupy_version"] + "+emulated"

counters = {"d2h": 0, "sync": 0, "h2d": 0, "h2d_bytes": 0, "launch": 0, "pointer_tables": 0, "internal_reads": 0}
called: set = set()          # every CuPy name gait_ref has called, qualified ("cupy.ndarray.sum")
memory = StreamMemory()      # the stream-ordered pool's model (memory.py)
_trace = None                # a list while ``launch_trace()`` is on: one dict per launch, for the cost model
_lock = threading.Lock()

# Calls whose internal read depends on the arguments (the survey lists them as syncing): the
# condition under which CuPy 14.2 reads, as found in its source.
_SYNCS_WHEN = {
    "cupy.where": lambda args, kwargs: len(args) + len(kwargs) == 1,           # nonzero(condition)
    "cupy.repeat": lambda args, kwargs: _repeats_array(args[1:2] or [kwargs.get("repeats")]),
    "cupy.ndarray.repeat": lambda args, kwargs: _repeats_array(args[1:2] or [kwargs.get("repeats")]),
    "cupy.ndarray.__getitem__": lambda args, kwargs: False,    # boolean masks: counted by _index
}


def _repeats_array(r) -> bool:
    r = r[0]
    return isinstance(r, (ndarray, _np.ndarray, list, tuple)) and _np.size(r._a if isinstance(r, ndarray) else r) > 1


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


def written_list(writes) -> list:
    return list(writes) if isinstance(writes, (list, tuple)) else [] if writes is None else [writes]


def fused(name: str, impl, args, writes=(), api="cupy.fuse"):
    """A fused kernel (``cupy.fuse``, or ``api="cupy.ElementwiseKernel"``, see
    gait_ref.kernels) run as its numpy code ``impl``: one launch, reading its array
    arguments and writing ``writes`` (device arrays it updates in place)."""
    return _wrap(_call(api, impl, args, writes=[w._a for w in writes], launches=1, kind="elementwise",
                       label=f"fused:{name}"))


class launch_trace:
    """``with launch_trace() as launches:`` records every kernel launch made inside: its name,
    kind (gemm, solver, copy, elementwise, rng), bytes read and written, and GEMM flops."""

    def __enter__(self):
        global _trace
        self._outer, _trace = _trace, []
        return _trace

    def __exit__(self, *exc):
        global _trace
        self.records, _trace = _trace, self._outer
        if self._outer is not None:
            self._outer.extend(self.records)
        return False


def _current_stream():
    return getattr(_Stream._current, "stream", None) or _Stream.null


def _array_results(res):
    if isinstance(res, _np.ndarray):
        return [res]
    if isinstance(res, (tuple, list)):
        return [r for r in res if isinstance(r, _np.ndarray)]
    return []


def _scalars_to_arrays(res):
    """numpy scalars -> 0-d arrays (CuPy returns device arrays from reductions)."""
    if isinstance(res, _np.generic):
        return _np.asarray(res)
    if isinstance(res, tuple):
        return tuple(_scalars_to_arrays(r) for r in res)
    return res


def _call(name: str, impl, args=(), kwargs=None, *, writes=None, kind=None, launches=None, label=None):
    """Run one CuPy call on numpy storage, as CuPy would: its internal reads, the stream
    order of what it reads and writes, its kernel launches; returns numpy results."""
    kwargs = kwargs or {}
    called.add(name)
    inputs = []
    a, k = _unwrap(args, name, inputs), _unwrap(kwargs, name, inputs)
    stream = _current_stream()
    survey = SYNC_SURVEY["syncs"].get(name)
    if survey is not None and _SYNCS_WHEN.get(name, lambda *_: True)(args, kwargs):
        _count("d2h", survey["reads"])
        _count("internal_reads", survey["reads"])
        memory.host_waited(stream)
    res = _scalars_to_arrays(impl(*a, **k))
    new = [r for r in _array_results(res) if not _launches.is_view_of(r, inputs)]
    if launches is None:
        launches = 0 if (not new and writes is None) or name.rsplit(".", 1)[-1] in _launches.ALLOCATION_ONLY else 1
    if launches:                              # a kernel reads its inputs (a view reads nothing)
        for x in inputs:
            memory.read(x, stream)
    for w in written_list(writes):
        memory.write(w, stream)
    for r in new:
        memory.allocate(r, stream)
    short = name.rsplit(".", 1)[-1]
    if launches and short in _launches.CONCATENATING and new:
        seq = [x for x in inputs if not _builtins.any(x is w for w in written_list(writes))]
        launches, tables = _launches.concatenate_cost(seq, new[0].dtype)
        _count("pointer_tables", tables)
    elif launches and short in _launches.LIBRARY_CALLS:
        launches = _launches.library_launches(short, inputs)
    if launches:
        _count("launch", launches)
        if _trace is not None:
            out_bytes = _builtins.sum(r.nbytes for r in new) + _builtins.sum(w.nbytes for w in written_list(writes))
            if short in _launches.GEMMS and len(inputs) > 1:
                flops = _launches.gemm_flops(inputs[0], inputs[1])
            elif short in _launches.LIBRARY_CALLS and inputs:
                flops = _launches.solver_flops(short, inputs)
            else:
                flops = 0
            _trace.append({"name": label or name, "kind": kind or _launches.kind_of(short), "launches": launches,
                           "bytes": _builtins.sum(x.nbytes for x in inputs) + out_bytes, "flops": flops,
                           "dtype": str(new[0].dtype if new else inputs[0].dtype if inputs else "")})
    return res


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


def _unwrap(obj, where: str, inputs=None):
    """Device arrays -> their numpy storage, recursively (appended to ``inputs`` when
    given); numpy arrays are refused."""
    if isinstance(obj, ndarray):
        if inputs is not None:
            inputs.append(obj._a)
        return obj._a
    _refuse_host(obj, where)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o, where, inputs) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v, where, inputs) for k, v in obj.items()}
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
    if isinstance(obj, list) and obj and _builtins.all(isinstance(o, _np.ndarray) for o in obj):
        return [ndarray(o) for o in obj]
    return obj


def _device_parts(key) -> tuple:
    """The device arrays inside an index (they are read by the gather or scatter)."""
    keys = key if isinstance(key, tuple) else (key,)
    return tuple(k for k in keys if isinstance(k, ndarray))


def _c_contiguous(res):
    """CuPy's elementwise kernels write C-ordered outputs (``_kernel.pyx``:
    ``_get_out_args_from_optionals`` -> ``_ndarray_init``), where numpy keeps the inputs' layout."""
    if isinstance(res, _np.ndarray) and res.ndim > 1 and not res.flags.c_contiguous:
        return _np.ascontiguousarray(res)
    if isinstance(res, tuple):
        return tuple(_c_contiguous(r) for r in res)
    return res


def _c_order(impl):
    return lambda *a, **k: _c_contiguous(impl(*a, **k))


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
        if out:
            _call(f"cupy.{name}", lambda *a, **k: ufunc(*a[:-1], out=a[-1], **k), inputs + (out[0],), kwargs,
                  writes=out[0]._a)
            return out[0]
        return _wrap(_call(f"cupy.{name}", _c_order(ufunc), inputs, kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        name = func.__name__
        if name not in API["cupy"] or not _builtins.all(issubclass(t, ndarray) for t in types_):
            return NotImplemented
        return globals()[name](*args, **kwargs) if name in globals() else NotImplemented

    def _read(self):
        """A device-to-host copy: CuPy synchronises the current stream, then copies."""
        _count("d2h")
        stream = _current_stream()
        memory.read(self._a, stream)
        memory.host_waited(stream)
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
        called.add("cupy.ndarray.nonzero")
        return _wrap(self._read().nonzero())

    def set(self, arr, stream=None):
        """Copy host data into this array (an H2D copy, on ``stream`` or the current one)."""
        arr = _np.asarray(arr)
        if arr.shape != self.shape:
            raise ValueError(f"set: shape {arr.shape} does not match {self.shape}")
        called.add("cupy.ndarray.set")
        _count("h2d")
        _count("h2d_bytes", arr.nbytes)
        memory.write(self._a, stream or _current_stream())
        self._a[...] = arr

    # -- indexing -----------------------------------------------------------------------------------
    def __getitem__(self, key):
        k = _index(key, "__getitem__")
        return _wrap(_call("cupy.ndarray.__getitem__", lambda a, *idx: a[k], (self,) + _device_parts(key)))

    def __setitem__(self, key, value):
        k = _index(key, "__setitem__")
        if isinstance(value, _np.ndarray) and value.ndim > 0:
            _count("h2d")                                   # CuPy copies a host value over
            _count("h2d_bytes", value.nbytes)
            v, dev = value, ()
        else:
            v = _unwrap(value, "__setitem__")
            dev = (value,) if isinstance(value, ndarray) else ()
        _call("cupy.ndarray.__setitem__", lambda *_: self._a.__setitem__(k, v), (self,) + dev + _device_parts(key),
              writes=self._a, launches=1)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        called.add("cupy.ndarray.__iter__")
        return (ndarray(_np.asarray(r)) if not isinstance(r, _np.ndarray) else ndarray(r) for r in self._a)

    def __copy__(self):
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray(self._a.copy())

    def __getstate__(self):
        raise TypeError("pickling a device array would hide a device-to-host copy; use .get()")


def _binary(name):
    def op(self, other):
        res = _call(f"cupy.ndarray.{name}", _c_order(lambda a, b: getattr(a, name)(b)), (self, other))
        return NotImplemented if res is NotImplemented else _wrap(res)
    op.__name__ = name
    return op


def _inplace(name):
    def op(self, other):
        _call(f"cupy.ndarray.{name}", lambda a, b: getattr(a, name)(b), (self, other), writes=self._a)
        return self
    op.__name__ = name
    return op


def _unary(name):
    def op(self):
        return _wrap(_call(f"cupy.ndarray.{name}", _c_order(lambda a: getattr(a, name)()), (self,), launches=1))
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


_IN_PLACE_METHODS = {"fill", "sort", "partition", "put", "setfield"}


def _method(name):
    qual = f"cupy.ndarray.{name}"
    writes = name in _IN_PLACE_METHODS

    def m(self, *args, **kwargs):
        return _wrap(_call(qual, lambda a, *r, **k: getattr(a, name)(*r, **k), (self,) + args, kwargs,
                           writes=self._a if writes else None))
    m.__name__ = name
    return m


_OWN = {"get", "item", "tolist", "tobytes", "nonzero", "set", "T", "mT", "shape", "dtype", "ndim", "size",
        "strides", "nbytes", "itemsize", "flags", "data", "device", "base"}
for _n in API["cupy.ndarray"]:
    if not _n.startswith("_") and _n not in _OWN and hasattr(_np.ndarray, _n):
        setattr(ndarray, _n, _method(_n))


# ---- the namespace ---------------------------------------------------------------------------------
def _function(name, impl, prefix="cupy"):
    qual = f"{prefix}.{name}"
    run = _c_order(impl) if isinstance(impl, _np.ufunc) else impl

    def f(*args, **kwargs):
        out = kwargs.get("out")
        return _wrap(_call(qual, run, args, kwargs, writes=out._a if isinstance(out, ndarray) else None))
    f.__name__ = name
    f.__qualname__ = name
    return f


def asarray(a, dtype=None, order=None, *, blocking=False):
    """Host data -> a device array (an H2D copy); a device array passes through."""
    called.add("cupy.asarray")
    if isinstance(a, ndarray):
        return a if dtype is None else a.astype(dtype, copy=False)
    host = _np.asarray(a, dtype=dtype, order=order)
    _count("h2d")
    _count("h2d_bytes", host.nbytes)
    dev = _np.array(host, copy=True)
    memory.allocate(dev, _current_stream())
    memory.write(dev, _current_stream())
    return ndarray(dev)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        return _wrap(_call("cupy.array", lambda a: _np.array(a, dtype=dtype, copy=copy, order=order, ndmin=ndmin),
                           (obj,)))
    return asarray(_np.array(obj, dtype=dtype, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    called.add("cupy.asnumpy")
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


def _submodule(name, source, names, own=None, prefix=None):
    mod = types.ModuleType(f"{__name__}.{name}")
    for n in names:
        if own and n in own:
            setattr(mod, n, own[n])
        elif not n.startswith("_") and hasattr(source, n) and callable(getattr(source, n)):
            setattr(mod, n, _function(n, getattr(source, n), prefix or f"cupy.{name}"))
    return mod


# ---- linalg in the input's dtype ------------------------------------------------------------------------
# numpy.linalg computes float32 in float64 and rounds the result; CuPy runs cuSOLVER's float32
# routines (cupy/linalg/_util.py: linalg_common_type keeps float32). scipy.linalg's LAPACK calls keep
# the dtype too (sgesv, sgetri, sgesdd, sgeqrf), so the emulator's float32 is a GPU's float32.
def _stacked(one):
    def run(a, *rest, **kwargs):
        if a.ndim == 2:
            return one(a, *rest, **kwargs)
        out = [one(a[i], *(r[i] for r in rest), **kwargs) for i in _np.ndindex(a.shape[:-2])]
        if isinstance(out[0], tuple):
            return tuple(_np.stack([o[j] for o in out]).reshape(a.shape[:-2] + out[0][j].shape)
                         for j in range(len(out[0])))
        return _np.stack(out).reshape(a.shape[:-2] + out[0].shape)
    return run


def _in_dtype(a, *others):
    t = _np.result_type(a, *others)
    return t if t in (_np.float32, _np.float64) else _np.float64


def _solve(a, b):
    t = _in_dtype(a, b)
    vector = b.ndim == 1
    x = _stacked(lambda m, r: _scipy_linalg.solve(m, r, check_finite=False))(
        a.astype(t, copy=False), (b[:, None] if vector else b).astype(t, copy=False))
    return x[:, 0] if vector else x


def _inv(a):
    return _stacked(lambda m: _scipy_linalg.inv(m, check_finite=False))(a.astype(_in_dtype(a), copy=False))


def _svd(a, full_matrices=True, compute_uv=True, hermitian=False):
    t = _in_dtype(a)
    run = _stacked(lambda m: _scipy_linalg.svd(m, full_matrices=full_matrices, compute_uv=compute_uv,
                                               check_finite=False))
    return run(a.astype(t, copy=False))


def _qr(a, mode="reduced"):
    if mode != "reduced":
        raise NotImplementedError("the emulator's qr supports mode='reduced' (what gait_ref uses)")
    return _stacked(lambda m: _scipy_linalg.qr(m, mode="economic", check_finite=False))(
        a.astype(_in_dtype(a), copy=False))


linalg = _submodule("linalg", _np.linalg, API["cupy.linalg"],
                    own={n: _function(n, f, "cupy.linalg") for n, f in
                         (("solve", _solve), ("inv", _inv), ("svd", _svd), ("qr", _qr))})
lib = types.ModuleType(f"{__name__}.lib")
lib.stride_tricks = _submodule("lib.stride_tricks", _np.lib.stride_tricks, API["cupy.lib.stride_tricks"],
                               prefix="cupy.lib.stride_tricks")


# ---- random -------------------------------------------------------------------------------------
class Generator:
    """CuPy's Generator API over numpy's PCG64 (same calls, not the same numbers). CuPy's
    default bit generator (XORWOW) initialises its state with one kernel launch."""

    def __init__(self, seed):
        self._g = _np.random.default_rng(seed)
        called.add("cupy.random.default_rng")
        _count("launch")

    def __getattr__(self, name):
        if name not in API["cupy.random.Generator"]:
            raise AttributeError(f"cupy.random.Generator has no attribute {name!r}")
        impl = getattr(self._g, name)
        return lambda *a, **k: _wrap(_call(f"cupy.random.Generator.{name}", lambda *a, **k: _np.asarray(impl(*a, **k)),
                                           a, k, kind="rng"))


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
        memory.host_waited(self)
        return True

    def synchronize(self):
        _count("sync")
        memory.host_waited(self)

    def record(self, event=None):
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event):
        if event._where is not None:
            memory.wait(self, *event._where)

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
        self._where = None          # (stream, logical time) of the last record

    def record(self, stream=None):
        self._t = time.perf_counter()
        self._where = (stream or _current_stream(), memory.tick())

    @property
    def done(self):
        """Work runs eagerly, so a recorded event is complete (and the host now knows it)."""
        if self._where is not None:
            memory.host_waited(*self._where)
        return True

    def synchronize(self):
        _count("sync")
        if self._where is not None:
            memory.host_waited(*self._where)


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
        memory.host_waited()

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


_Stream.null = _Stream(null=True)
cuda = types.ModuleType(f"{__name__}.cuda")
cuda.Stream = _Stream
cuda.Event = Event
cuda.Device = Device
cuda.get_elapsed_time = get_elapsed_time
cuda.get_current_stream = _current_stream
cuda.is_available = is_available
cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)


# ---- cupyx: pinned host memory, scipy.linalg ----------------------------------------------------------
def empty_pinned(shape, dtype=float, order="C"):
    """Page-locked host memory is an ordinary numpy array, as in CuPy."""
    return _np.empty(shape, dtype=dtype, order=order)


def _lu_factor(a, overwrite_a=False, check_finite=True):
    return _scipy_linalg.lu_factor(a, overwrite_a=overwrite_a, check_finite=False)


def _lu_solve(lu_and_piv, b, trans=0, overwrite_b=False, check_finite=True):
    return _scipy_linalg.lu_solve(tuple(lu_and_piv), b, trans=trans, check_finite=False)


cupyx = types.ModuleType(f"{__name__}.cupyx")
cupyx.empty_pinned = empty_pinned
cupyx.scipy = types.SimpleNamespace(linalg=_submodule(
    "cupyx.scipy.linalg", _scipy_linalg, API["cupyx.scipy.linalg"],
    own={"lu_factor": _function("lu_factor", _lu_factor, "cupyx.scipy.linalg"),
         "lu_solve": _function("lu_solve", _lu_solve, "cupyx.scipy.linalg")}, prefix="cupyx.scipy.linalg"))

import sys as _sys  # noqa: E402

_this = _sys.modules[__name__]
