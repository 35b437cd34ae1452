"""Fused kernels: one GPU kernel launch where the plain array code makes several.

On a GPU every array operation is a kernel launch of a few microseconds of host time, and
a training step is a few hundred to a thousand of them (``python bench/launches.py``);
an elementwise chain such as Adam's update is a dozen launches that each read and write
the whole array. A ``Kernel`` runs such a chain as one launch on CuPy and as the plain
code elsewhere:

* ``Kernel(make)``: ``make(xp)`` returns the chain written with ``xp``'s ufuncs. On CuPy
  it is compiled once by ``cupy.fuse`` (elementwise operations, in-place updates of its
  array arguments, a final ``sum``/``all``/``any``), so the GPU runs exactly this code;
  numpy runs ``make(numpy)``, the same lines, unfused;
* ``Kernel(make, twin=f)``: numpy runs ``twin`` instead, where the host has a faster way
  to the same numbers (Adam in cache-sized blocks); tests/test_kernels.py checks that
  ``make(numpy)`` and the twin agree bit for bit;
* ``RawKernel(cuda, twin)``: a hand-written ``cupy.ElementwiseKernel`` where indexing is
  needed (``col2im``'s gather), with a numpy twin; the CUDA source is compiled by NVRTC in
  tests/test_kernels.py when NVRTC is installed, and checked against the twin on a GPU.

The emulated device runs the numpy code and counts one launch (``emulation.fused``).

Memory order. CuPy writes elementwise results C-ordered, where numpy keeps its inputs'
layout: a channels-last activation (NCHW-shaped, NHWC in memory, see ``gait_ref.im2col``)
would come back NCHW in memory and the next layer would copy it again. A kernel whose
4-d array arguments are all channels-last runs on their NHWC views and hands its
results back as NCHW views, so the layout survives on every backend.
"""
from __future__ import annotations

import numpy as np

from . import emulation
from .backend import get_xp


def _nhwc_contiguous(a) -> bool:
    return a.transpose(0, 2, 3, 1).flags.c_contiguous


def _in_memory_order(args):
    """(args with channels-last 4-d arrays as NHWC views, whether they were): when every 4-d
    argument is contiguous in NHWC order (a per-sample (N, 1, 1, 1) factor is, in both
    orders) and one is not in NCHW order."""
    arrays = [a for a in args if getattr(a, "ndim", 0) == 4]
    if not arrays or not all(_nhwc_contiguous(a) for a in arrays) or all(a.flags.c_contiguous for a in arrays):
        return args, False
    return tuple(a.transpose(0, 2, 3, 1) if getattr(a, "ndim", 0) == 4 else a for a in args), True


def _array_module(args):
    """The backend of a kernel's array arguments (numpy scalars are parameters, not arrays)."""
    return get_xp(*[a for a in args if hasattr(a, "shape") and not isinstance(a, np.generic)])


def _back_to_nchw(res):
    if isinstance(res, tuple):
        return tuple(_back_to_nchw(r) for r in res)
    return res.transpose(0, 3, 1, 2) if getattr(res, "ndim", 0) == 4 else res


class Kernel:
    """A fused elementwise chain (see the module docstring). Call it like ``make(xp)``'s
    function; the arguments at positions ``inplace`` are updated in place, on every backend."""

    def __init__(self, make, twin=None, name=None, inplace=()):
        self.make, self.name, self.inplace = make, name or make.__name__, tuple(inplace)
        self.plain = make(np)
        self.twin = twin or self.plain
        self._fused = {}

    def __call__(self, *args):
        xp = _array_module(args)
        args, nhwc = _in_memory_order(args)
        if xp is np:
            res = self.twin(*args)
        elif xp is emulation:
            res = emulation.fused(self.name, self.twin, args, writes=[args[i] for i in self.inplace])
        else:
            fn = self._fused.get(xp)
            if fn is None:
                fn = self._fused[xp] = xp.fuse(kernel_name=self.name)(self.make(xp))
            res = fn(*args)
        return _back_to_nchw(res) if nhwc and res is not None else res


class RawKernel:
    """A ``cupy.ElementwiseKernel`` with a numpy twin: ``RawKernel(in_params, out_params,
    operation, name, twin)``; called as ``kernel(*inputs, out)`` with the output given."""

    def __init__(self, in_params, out_params, operation, name, twin):
        self.in_params, self.out_params, self.operation = in_params, out_params, operation
        self.name, self.twin = name, twin
        self._compiled = {}

    def __call__(self, *args):
        xp = _array_module(args)
        if xp is np:
            return self.twin(*args)
        if xp is emulation:
            return emulation.fused(self.name, self.twin, args, writes=[args[-1]], api="cupy.ElementwiseKernel")
        k = self._compiled.get(xp)
        if k is None:
            k = self._compiled[xp] = xp.ElementwiseKernel(self.in_params, self.out_params, self.operation, self.name)
        return k(*args)
