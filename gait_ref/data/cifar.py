"""CIFAR-10 from the official python pickles (cifar-10-batches-py/), read through an
allow-list (``gait_ref.data.safe_pickle``): a crafted batch file cannot run code."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from . import safe_pickle
from .idx import DataFormatError

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"


def find_cifar_dir(root) -> Path:
    root = Path(root)
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / TEST_FILE).exists():
            return cand
    raise DataFormatError(
        f"CIFAR-10 not found under {root}: expected cifar-10-batches-py/{{data_batch_1..5,test_batch}} "
        "(the python version from https://www.cs.toronto.edu/~kriz/cifar.html)")


def integer_labels(labels, path, lo: int, hi: int) -> np.ndarray:
    """A pickle's labels as int64, each checked to be an integer in lo..hi before any
    conversion (a float would be truncated silently, 2**70 overflow); DataFormatError naming
    the file, the label and its index."""
    labels = labels.tolist() if isinstance(labels, np.ndarray) else labels
    if not isinstance(labels, list):
        raise DataFormatError(f"{path}: labels are a {type(labels).__name__}; expected a list of integers")
    for i, v in enumerate(labels):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise DataFormatError(f"{path}: label {v!r} at index {i} is not an integer")
        if not lo <= v <= hi:
            raise DataFormatError(f"{path}: label {v} at index {i} is outside {lo}..{hi}")
    return np.asarray(labels, dtype=np.int64)


def _read_batch(path: Path):
    if not path.exists():
        raise DataFormatError(f"{path}: missing CIFAR-10 batch file")
    d = safe_pickle.load(path, encoding="bytes")
    try:
        x = np.asarray(d[b"data"])
        labels = d[b"labels"]
    except (KeyError, ValueError, TypeError) as e:  # missing keys
        raise DataFormatError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    y = integer_labels(labels, path, 0, 9)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),):
        raise DataFormatError(f"{path}: data {x.dtype} {x.shape}, labels {y.shape}; expected uint8 (N, 3072), (N,)")
    return x.reshape(-1, 3, 32, 32), y                         # planar RGB -> (N, 3, 32, 32)


def load_cifar10(root):
    """((x_train, y_train), (x_test, y_test)): uint8 (N, 3, 32, 32), int64 labels 0-9."""
    d = find_cifar_dir(root)
    parts = [_read_batch(d / name) for name in TRAIN_FILES]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    return (x_tr, y_tr), _read_batch(d / TEST_FILE)


def write_cifar_batch(path, x: np.ndarray, y) -> None:
    """Write a batch in the official format (tests generate CIFAR-10 files with this)."""
    with open(path, "wb") as f:
        pickle.dump({b"data": np.asarray(x, np.uint8).reshape(len(x), 3072),
                     b"labels": [int(v) for v in y], b"batch_label": b"generated"}, f)
