"""What one CuPy 14.2 call costs on a GPU: kernel launches, bytes moved, GEMM flops.

The emulator runs numpy where CuPy launches kernels. For every call it asks
``launches(name, inputs, results, ...)`` how many kernels (or library calls) CuPy would
launch, and, when a trace is on, records what each moved, for ``bench/gpu_model.py``.

The rules, each from CuPy 14.2's source (tag v14.2.0):

* a call whose results are all views of its inputs launches nothing (reshape, transpose,
  basic slicing, ``astype`` to the same dtype with ``copy=False``): CuPy builds a new
  array header on the host;
* any other call launches one kernel: ufuncs, ``ElementwiseKernel``s, reductions (one
  CUB or reduction kernel), copies, fills (``zeros`` is a cudaMemsetAsync, counted as a
  launch too: its host cost is the same), a gather by an index array, ``__setitem__``
  (one elementwise copy or scatter), a random draw;
* ``concatenate`` (and ``stack``, ``hstack``, ``vstack``, which call it):
  ``cupy/_core/_routines_manipulation.pyx::_concatenate`` copies each input with its own
  kernel, unless there are more than 8 inputs of the output's dtype whose bytes are under
  2 MiB each on average: then one kernel reads a table of the inputs' device pointers,
  which ``core.array`` copies host-to-device first (one table when the inputs all have
  the same shape and are C-contiguous, three otherwise: pointers, strides, offsets).
  Those copies are ``pointer_tables`` below, apart from the batch's copy;
* ``linalg.solve`` on a matrix (``cupy/linalg/_solve.py``): two ``astype`` copies into
  Fortran order, then cuSOLVER's getrf and getrs (``cupyx/lapack.py::gesv``): 4.
  ``linalg.inv``: a copy, ``eye`` (a memset and a fill), getrf, getrs: 5. ``solve`` on a
  stack of matrices of at most 256 (``cupy/cublas.py::batched_gesv``): two contiguous
  copies, two ``arange`` pointer arrays, getrfBatched, getrsBatched and the result's
  transposing copy: 7. ``cholesky`` on a stack (``_potrf_batched``): a copy, the pointer
  array (``_mat_ptrs``), potrfBatched, ``tril``: 4. ``svd``,
  ``qr``: counted at their cuSOLVER calls plus the copies around them (see LIBRARY_CALLS);
  a library call launches more kernels inside the library, which this does not see;
* ``matmul``/``dot``/``tensordot``/``einsum``: one cuBLAS GEMM (batched GEMM for stacked
  operands), whose flops are ``2 m n k`` per matrix product.
"""
from __future__ import annotations

import numpy as np

from .memory import storage_root

ALLOCATION_ONLY = {"empty", "empty_like"}     # cudaMalloc from the pool: no kernel

# Library calls and the copies CuPy makes around them, per call (see the module docstring).
LIBRARY_CALLS = {"solve": 4, "inv": 5, "svd": 4, "qr": 4, "lu_factor": 2, "lu_solve": 2, "cholesky": 4}
BATCHED_LIBRARY_CALLS = {"solve": 7}      # on a stack (.., n, n) of small matrices
BATCHED_GESV_LIMIT = 256                  # cupy.cublas.get_batched_gesv_limit()'s default
GEMMS = {"matmul", "dot", "tensordot", "einsum", "__matmul__", "__rmatmul__", "inner", "vdot"}
CONCATENATING = {"concatenate", "stack", "hstack", "vstack", "column_stack", "concat"}
POINTER_TABLE_MIN = 9                 # _concatenate: `if len(arrays) > 8`
POINTER_TABLE_BYTES = 2 * 1024 * 1024  # threshold_size, per input on average


def is_view_of(result: np.ndarray, inputs) -> bool:
    """True when ``result`` shares its storage with one of ``inputs``."""
    r = id(storage_root(result))
    return any(id(storage_root(i)) == r for i in inputs)


def concatenate_cost(arrays, out_dtype) -> tuple[int, int]:
    """(kernel launches, pointer-table host-to-device copies) of CuPy's _concatenate."""
    n = len(arrays)
    if n >= POINTER_TABLE_MIN and all(a.dtype == out_dtype for a in arrays):
        total = sum(a.nbytes for a in arrays)
        if total < POINTER_TABLE_BYTES * n:
            shape0 = arrays[0].shape
            same = all(a.shape == shape0 and a.flags.c_contiguous for a in arrays)
            return 1, (1 if same else 3)
    return n, 0


def gemm_flops(a: np.ndarray, b: np.ndarray) -> int:
    """2 m n k per matrix product, times the batch (broadcast) for stacked operands."""
    if a.ndim == 0 or b.ndim == 0:
        return 0
    k = a.shape[-1]
    m = a.shape[-2] if a.ndim > 1 else 1
    n = b.shape[-1] if b.ndim > 1 else 1
    batch = int(np.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))) if max(a.ndim, b.ndim) > 2 else 1
    return 2 * m * n * k * batch


def library_launches(name: str, inputs) -> int:
    """Kernels of one library call and the copies around it (see the module docstring)."""
    a = inputs[0] if inputs else None
    if (name in BATCHED_LIBRARY_CALLS and a is not None and a.ndim > 2
            and a.shape[-1] <= BATCHED_GESV_LIMIT):
        return BATCHED_LIBRARY_CALLS[name]
    return LIBRARY_CALLS[name]


def solver_flops(name: str, inputs) -> int:
    """The textbook flop counts of a solver call on (.., n, n) matrices: LU 2/3 n^3, the
    triangular solves 2 n^2 per right-hand side, an inverse 2 n^3, QR 4/3 n^3, an SVD 12 n^3,
    a Cholesky factorisation n^3 / 3."""
    a = inputs[0]
    n = a.shape[-1]
    batch = int(np.prod(a.shape[:-2])) if a.ndim > 2 else 1
    b = inputs[-1] if name == "lu_solve" else inputs[1] if len(inputs) > 1 else None
    rhs = b.shape[-1] if b is not None and b.ndim == a.ndim else 1
    per = {"solve": 2 * n ** 3 / 3 + 2 * n * n * rhs, "inv": 2 * n ** 3, "qr": 4 * n ** 3 / 3, "svd": 12 * n ** 3,
           "lu_factor": 2 * n ** 3 / 3, "lu_solve": 2 * n * n * rhs, "cholesky": n ** 3 / 3}[name]
    return int(batch * per)


def kind_of(name: str) -> str:
    if name in GEMMS:
        return "gemm"
    if name in LIBRARY_CALLS:
        return "solver"
    if name in CONCATENATING:
        return "copy"
    return "elementwise"
