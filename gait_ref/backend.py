"""The one module that owns the numpy/cupy choice.

Maths code never imports cupy and never branches on the device: it asks for the
array module of its inputs with ``get_xp(*arrays)`` (Chainer's
``get_array_module``) and calls ``xp.<function>``. Only this module imports cupy,
guarded, so the package imports and runs on machines without it.

Three backends share two code paths:

    numpy     the host; arrays are numpy arrays
    cupy      a CUDA GPU through CuPy
    emulated  CuPy's device path on the CPU (``gait_ref.emulation``): device arrays that
              refuse implicit host conversion, CuPy's namespace only, and counters of
              device-to-host reads and host-to-device copies. The test suite runs the
              trainer on it to prove the GPU path without a GPU.

Everything the host reads from the device goes through ``to_numpy`` or
``read_scalars`` (counted in ``host_reads``), so a training step's synchronisations
can be audited on a real GPU too. Random numbers for weights come from a seeded
``numpy.random.Generator`` on the CPU and are moved with ``to_device``, so numpy and
cupy runs start from bit-identical parameters; per-step noise is drawn on the device
by ``random_generator`` (keyed by the run seed and the step, so nothing but the step
number needs checkpointing; counter-based Philox on a device).
"""
from __future__ import annotations

import re
import time

import numpy as np

from . import emulation as _emulated

BACKENDS = ("numpy", "cupy", "emulated")

try:  # cupy imports without a GPU; failure comes at first device use
    import cupy as _cupy
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None

GPU_INSTALL = ("install CuPy with its CUDA libraries: `pip install -e \".[gpu]\"` (cupy-cuda12x[ctk], for CUDA 12 "
               "drivers) or `pip install -e \".[gpu-cuda13]\"` (CUDA 13), or use --backend numpy")

host_reads = {"calls": 0}        # device-to-host reads made through this module (any device backend)


class BackendError(RuntimeError):
    """The requested backend cannot be used, or arrays of two backends were mixed."""


def cupy_available() -> bool:
    """True when cupy imports and sees at least one usable GPU."""
    if _cupy is None:
        return False
    try:
        return bool(_cupy.is_available())
    except Exception:  # pragma: no cover - driver problems
        return False


# The CUDA library behind each smoke-test stage, and the names it shows up under in errors.
_LIBRARIES = (("cuBLAS", r"cublas"), ("cuSOLVER", r"cusolver"), ("NVRTC", r"nvrtc|compile"),
              ("cuRAND", r"curand"), ("the CUDA runtime", r"cudart|libcuda\b|driver"))


def smoke_test(xp) -> None:
    """Run one of each kind of device work gait_ref needs, forcing execution: a GEMM
    (cuBLAS), an LU solve (cuSOLVER, as the square-layer inverses use it), an elementwise
    kernel (compiled by NVRTC) and an RNG draw (cuRAND). Raises BackendError with one line naming the
    library that failed and how to install it."""
    stages = (
        ("a GEMM", "cuBLAS", lambda: xp.ones((8, 8), dtype=xp.float32) @ xp.ones((8, 4), dtype=xp.float32)),
        ("an LU solve", "cuSOLVER", lambda: xp.linalg.solve(xp.eye(4, dtype=xp.float64) * 2,
                                                            xp.ones((4, 2), dtype=xp.float64))),
        ("an elementwise kernel", "NVRTC", lambda: xp.tanh(xp.arange(8, dtype=xp.float32)) * 2 + 1),
        ("an RNG draw", "cuRAND", lambda: xp.random.default_rng(0).standard_normal((8,), dtype=xp.float32)),
    )
    for what, library, run in stages:
        try:
            to_numpy(run())
        except Exception as e:  # ImportError for a missing .so, CUDA/NVRTC runtime errors
            msg = " ".join(str(e).split())[:240]
            named = next((name for name, pat in _LIBRARIES if re.search(pat, msg, re.IGNORECASE)), library)
            raise BackendError(f"backend 'cupy': {what} failed, {named} is missing or unusable "
                               f"({type(e).__name__}: {msg}); {GPU_INSTALL}") from None


def get_backend(name: str):
    """Return the array module for ``name`` ('numpy', 'cupy' or 'emulated'), with a clear error."""
    if name == "numpy":
        return np
    if name == "emulated":
        return _emulated
    if name == "cupy":
        if _cupy is None:
            raise BackendError(f"backend 'cupy' requested but cupy is not installed; {GPU_INSTALL}")
        if not cupy_available():
            raise BackendError("backend 'cupy' requested but no usable CUDA GPU was found; "
                               "use --backend numpy")
        smoke_test(_cupy)
        return _cupy
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def check_gpus_per_node(local_size: int, n_gpus: int) -> None:
    """BackendError unless each rank on this node can have a GPU of its own: NCCL refuses two
    ranks on one device, with an unexplained NCCL_ERROR_INVALID_USAGE."""
    if local_size > n_gpus:
        raise BackendError(f"{local_size} ranks on this node but {n_gpus} GPU(s) visible to it: each rank needs a "
                           f"GPU of its own (NCCL refuses two ranks on one device); start at most {n_gpus} ranks per "
                           "node, or check CUDA_VISIBLE_DEVICES")


def use_device(name: str, local_rank: int, local_size: int = 1) -> str:
    """Make the GPU of this process (GPU number ``local_rank`` on its node) current, before
    anything allocates on device 0; BackendError when the node has fewer GPUs than ranks.
    Returns a description; a no-op off the GPU."""
    if name != "cupy" or not cupy_available():
        return "host"
    n = _cupy.cuda.runtime.getDeviceCount()
    check_gpus_per_node(local_size, n)
    _cupy.cuda.Device(local_rank).use()
    return f"GPU {local_rank} of {n}"


def nccl_module(xp):
    """NCCL for a device backend: cupy.cuda.nccl, or the emulator's MPI-backed stand-in."""
    if xp is _emulated:
        from .emulation import nccl
        return nccl
    import importlib
    nccl = importlib.import_module("cupy.cuda.nccl")
    if not getattr(nccl, "available", True):
        raise BackendError(f"--distributed mpi with cupy needs NCCL, which could not be loaded; {GPU_INSTALL}")
    return nccl


def _device_module(a):
    """The device module (cupy or the emulator) whose array ``a`` is, else None."""
    if isinstance(a, _emulated.ndarray):
        return _emulated
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy
    return None


def get_xp(*arrays):
    """The array module shared by ``arrays`` (None entries and Python scalars are ignored).

    Raises BackendError when host and device arrays are mixed, instead of letting
    cupy copy silently or numpy fail deep inside a kernel.
    """
    mods = set()
    for a in arrays:
        if a is None or isinstance(a, (int, float, np.generic)):
            continue
        mods.add(_device_module(a) or np)
    if len(mods) > 1:
        shapes = [getattr(a, "shape", None) for a in arrays]
        raise BackendError(f"numpy and cupy arrays mixed in one call (shapes {shapes}); "
                           "move them with gait_ref.backend.to_device first")
    return mods.pop() if mods else np


def backend_name(xp) -> str:
    if xp is np:
        return "numpy"
    return "emulated" if xp is _emulated else "cupy"


def is_device(xp) -> bool:
    return xp is not np


def to_device(a, xp):
    """Move a numpy array onto the backend ``xp`` (a no-op for numpy)."""
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)


def to_numpy(a):
    """A numpy copy (or view) of ``a``, whichever backend holds it (a counted read)."""
    if _device_module(a) is not None:
        host_reads["calls"] += 1
        return a.get()
    return np.asarray(a)


def read_scalars(values) -> list:
    """Python floats of several 0-d arrays (or numbers) in one device-to-host read."""
    values = list(values)
    if not values:
        return []
    dev = [v for v in values if _device_module(v) is not None]
    if not dev:
        return [float(v) for v in values]
    xp = get_xp(*dev)
    if len({v.dtype for v in dev}) == 1:            # one stack (one kernel past 8 values), no casts
        host = iter(to_numpy(xp.stack(dev)).tolist())
    else:
        host = iter(to_numpy(xp.stack([v.astype(xp.float64, copy=False) for v in dev])).tolist())
    return [next(host) if _device_module(v) is not None else float(v) for v in values]


def blas_info() -> list:
    """Which BLAS/LAPACK libraries and thread counts this process runs (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return []
    return [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "architecture", "filepath")}
            for d in threadpool_info()]


def pinned_empty(shape, dtype, xp):
    """A host array for copies to ``xp``: page-locked (pinned) memory on a device, so the
    host-to-device copy can run asynchronously; a plain numpy array otherwise."""
    if xp is np:
        return np.empty(shape, dtype)
    if xp is _emulated:
        return _emulated.cupyx.empty_pinned(shape, dtype)
    import cupyx
    return cupyx.empty_pinned(shape, dtype)


def synchronize(xp) -> None:
    """Wait for queued device work; nothing to do on numpy."""
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def random_generator(xp, key):
    """Normal draws keyed by the integer sequence ``key``:
    ``random_generator(xp, [seed, stream, step]).standard_normal(shape, dtype=...)``. numpy:
    numpy's Generator (PCG64 via SeedSequence); a device: Philox4x32-10 keyed by 64 bits of
    the whole key, drawn on the device by one kernel (``gait_ref.philox``: the same numbers on
    every card and after a resume, no generator state). The two give different numbers."""
    key = [int(k) for k in key]
    if xp is np:
        return np.random.default_rng(key)
    from .philox import PhiloxNormal                  # (philox -> kernels imports this module)
    return PhiloxNormal(xp, key)


class StepTimer:
    """Time spent in device work, summed over steps and read once.

    numpy: host wall time. Device backends: CUDA events recorded before and after each
    step on the current stream; the elapsed times are read (one synchronisation on the
    last event) only when ``total_s`` is called, at log time."""

    def __init__(self, xp):
        self.xp = xp
        self._host_total, self._t0, self._pairs = 0.0, None, []

    def start(self):
        if self.xp is np:
            self._t0 = time.perf_counter()
        else:
            self._t0 = self.xp.cuda.Event()
            self._t0.record()

    def stop(self):
        if self.xp is np:
            self._host_total += time.perf_counter() - self._t0
        else:
            end = self.xp.cuda.Event()
            end.record()
            self._pairs.append((self._t0, end))

    def total_s(self) -> float:
        """Seconds measured since the last call (and reset)."""
        total, self._host_total = self._host_total, 0.0
        if self._pairs:
            self._pairs[-1][1].synchronize()
            total += sum(self.xp.cuda.get_elapsed_time(a, b) for a, b in self._pairs) / 1e3
            self._pairs = []
        return total
