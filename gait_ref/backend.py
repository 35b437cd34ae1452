"""The one module that owns the numpy/cupy choice.

Maths code never imports cupy and never branches on the device: it asks for the
array module of its inputs with ``get_xp(*arrays)`` (Chainer's
``get_array_module``) and calls ``xp.<function>``. Only this module imports cupy,
guarded, so the package imports and runs on machines without it.

Random numbers for weights always come from a seeded ``numpy.random.Generator``
on the CPU and are moved with ``to_device``, so numpy and cupy runs start from
bit-identical parameters.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

BACKENDS = ("numpy", "cupy")

try:  # cupy imports without a GPU; failure comes at first device use
    import cupy as _cupy
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None


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


def get_backend(name: str):
    """Return the array module for ``name`` ('numpy' or 'cupy'), with a clear error."""
    if name == "numpy":
        return np
    if name == "cupy":
        if _cupy is None:
            raise BackendError(
                "backend 'cupy' requested but cupy is not installed; "
                "install it with `pip install -e .[gpu]` (cupy-cuda12x) or use --backend numpy")
        if not cupy_available():
            raise BackendError(
                "backend 'cupy' requested but no usable CUDA GPU was found; "
                "use --backend numpy")
        return _cupy
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _is_cupy_array(a) -> bool:
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def get_xp(*arrays):
    """The array module shared by ``arrays`` (None entries and Python scalars are ignored).

    Raises BackendError when numpy and cupy arrays are mixed, instead of letting
    cupy copy silently or numpy fail deep inside a kernel.
    """
    kinds = set()
    for a in arrays:
        if a is None or isinstance(a, (int, float, np.generic)):
            continue
        kinds.add("cupy" if _is_cupy_array(a) else "numpy")
    if len(kinds) > 1:
        shapes = [getattr(a, "shape", None) for a in arrays]
        raise BackendError(f"numpy and cupy arrays mixed in one call (shapes {shapes}); "
                           "move them with gait_ref.backend.to_device first")
    return _cupy if kinds == {"cupy"} else np


def backend_name(xp) -> str:
    return "cupy" if (_cupy is not None and xp is _cupy) else "numpy"


def to_device(a, xp):
    """Move a numpy array onto the backend ``xp`` (a no-op for numpy)."""
    if xp is np:
        return a.get() if _is_cupy_array(a) else np.asarray(a)
    return xp.asarray(a)


def to_numpy(a):
    """A numpy copy (or view) of ``a``, whichever backend holds it."""
    if _is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def scipy_linalg(xp):
    """scipy.linalg for numpy, cupyx.scipy.linalg for cupy (LU factor/solve live there)."""
    if xp is np:
        return scipy.linalg
    import cupyx.scipy.linalg  # only reached with a working cupy
    return cupyx.scipy.linalg


def pinned_empty(shape, dtype, xp):
    """A host array for copies to ``xp``: page-locked (pinned) memory under cupy, so the
    host-to-device copy can run asynchronously; a plain numpy array otherwise."""
    if xp is np:
        return np.empty(shape, dtype)
    import cupyx
    return cupyx.empty_pinned(shape, dtype)


def synchronize(xp) -> None:
    """Wait for queued device work (for timings); nothing to do on numpy."""
    if xp is not np:
        xp.cuda.Stream.null.synchronize()
