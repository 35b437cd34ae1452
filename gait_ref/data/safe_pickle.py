"""Reading the official pickled data sets without running code from the file.

CIFAR-10's python batches and Chrabaszcz et al.'s downsampled ImageNet hold only dicts
with bytes or str keys, lists, bytes, ints and numpy arrays of numeric dtype. A pickle
can call any importable function while it loads (``__reduce__``), so a crafted
``data_batch_1`` would run arbitrary code under ``pickle.load``. ``load`` unpickles with
an allow-list: the only globals it resolves are the ones numpy arrays, numpy scalars and
dtypes are rebuilt from; anything else stops the load with a one-line error naming the
file and the refused global, before it is called. The result is then checked to hold
only those types.
"""
from __future__ import annotations

import pickle

import numpy as np

from .idx import DataFormatError

# (module, name) pairs that rebuild numpy arrays, scalars and dtypes; numpy 2 moved
# numpy.core to numpy._core, and Python 2 pickles name the old module.
ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode")}       # Python 3 writes bytes in protocol 2 as _codecs.encode(str, 'latin1')


class _Restricted(pickle.Unpickler):
    def __init__(self, f, path, **kwargs):
        super().__init__(f, **kwargs)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise DataFormatError(f"{self.path}: refused to load {module}.{name} from the pickle (the official files "
                              "hold only dicts, lists, bytes and numeric numpy arrays; this one may run code)")


def _check(obj, path, depth=0):
    if depth > 4:
        raise DataFormatError(f"{path}: nested deeper than the official files")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, bytes)):
                raise DataFormatError(f"{path}: a key of type {type(k).__name__}; the official files use str/bytes")
            _check(v, path, depth + 1)
    elif isinstance(obj, list):
        if not all(isinstance(v, (int, float, str, bytes, np.integer, np.floating)) for v in obj):
            raise DataFormatError(f"{path}: a list holding something other than numbers and strings")
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise DataFormatError(f"{path}: a numpy array of dtype {obj.dtype}; the official files hold numbers")
    elif not isinstance(obj, (int, float, str, bytes, np.integer, np.floating)):
        raise DataFormatError(f"{path}: holds a {type(obj).__name__}")


def load(path, encoding: str = "ASCII") -> dict:
    """The dict in the pickle at ``path``, loaded through the allow-list (see above)."""
    try:
        with open(path, "rb") as f:
            obj = _Restricted(f, path, encoding=encoding).load()
    except DataFormatError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise DataFormatError(f"{path}: not a readable pickle ({type(e).__name__}: {' '.join(str(e).split())[:120]})") \
            from None
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: holds a {type(obj).__name__}, expected a dict")
    _check(obj, path)
    return obj
