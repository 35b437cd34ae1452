"""HDF5 checkpoints: checksummed, written so that a complete one always exists.

A checkpoint holds every parameter, the optimiser and learned-feedback state, the
step/epoch/batch position of the data order, and how many metrics lines it covers
(lines written after it are dropped on resume, so a resumed run writes exactly what an
uninterrupted one would). Every dataset carries the SHA-256 of its bytes (attribute
``sha256``) and the metadata its own; ``load_checkpoint`` verifies them all.

Saving (``save_checkpoint``) keeps a complete checkpoint under a name ``--resume`` reads
at every instant, whenever the process is killed:

    1. write last.h5.tmp, flush and fsync it;
    2. hard-link the current last.h5 to last.prev.h5 (atomically, through a temporary
       name; a copy where the file system has no hard links);
    3. rename last.h5.tmp over last.h5 and fsync the folder.

``load_latest`` reads last.h5 and falls back to last.prev.h5, with a warning, when
last.h5 is missing, incomplete or fails a checksum.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np

from .backend import to_device, to_numpy
from .data.idx import DataFormatError

FORMAT_VERSION = 2


class CheckpointError(DataFormatError):
    pass


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:            # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prev_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev.h5")


def save_checkpoint(path, params: dict, opt_state: dict, meta: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    meta_json = json.dumps({**meta, "format_version": FORMAT_VERSION})
    with h5py.File(tmp, "w") as f:
        for group, items in (("params", params), ("optimizer", opt_state)):
            g = f.create_group(group)
            for k, v in items.items():     # 'm/fc1.W' would make nested groups: escape '/'
                arr = to_numpy(v)
                d = g.create_dataset(k.replace("/", "::"), data=arr)
                d.attrs["sha256"] = _digest(arr)
        f.attrs["meta"] = meta_json
        f.attrs["meta_sha256"] = hashlib.sha256(meta_json.encode()).hexdigest()
        f.attrs["complete"] = True
        f.flush()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    if path.exists():
        prev, link = prev_path(path), path.with_name(path.stem + ".prev.h5.tmp")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError:                    # no hard links here: a (fsynced) copy
            shutil.copyfile(path, link)
            with open(link, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(link, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_checkpoint(path):
    """(params as numpy, optimiser state, meta), every checksum verified; CheckpointError
    naming the file and the dataset at fault."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise CheckpointError(f"{path}: incomplete checkpoint")
            meta_json = f.attrs["meta"]
            meta_json = meta_json if isinstance(meta_json, str) else meta_json.decode()
            if "meta_sha256" in f.attrs and hashlib.sha256(meta_json.encode()).hexdigest() != f.attrs["meta_sha256"]:
                raise CheckpointError(f"{path}: checksum mismatch in the metadata (corrupt)")
            meta = json.loads(meta_json)
            checked = meta.get("format_version", 1) >= 2
            out = {}
            for group in ("params", "optimizer"):
                out[group] = {}
                for k in f[group]:
                    d = f[group][k]
                    v = d[()]
                    if checked and d.attrs.get("sha256") != _digest(np.asarray(v)):
                        raise CheckpointError(f"{path}: checksum mismatch in dataset {group}/{k.replace('::', '/')} "
                                              "(corrupt)")
                    out[group][k.replace("::", "/")] = v
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({' '.join(str(e).split())[:200]})") from None
    opt = {k: (int(v) if np.ndim(v) == 0 and k == "t" else v) for k, v in out["optimizer"].items()}
    return out["params"], opt, meta


def load_latest(path, warn=None):
    """``load_checkpoint(path)``, else the previous checkpoint beside it with a warning.
    Returns (params, optimiser state, meta, the file read)."""
    path = Path(path)
    warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        return (*load_checkpoint(path), path)
    except CheckpointError as first:
        prev = prev_path(path)
        if not prev.exists():
            raise
        warn(f"warning: {first}; resuming from the previous checkpoint {prev.name} instead")
        try:
            return (*load_checkpoint(prev), prev)
        except CheckpointError as second:
            raise CheckpointError(f"no usable checkpoint: {first}; and {second}") from None


def restore_params(net, params: dict, xp) -> None:
    live = net.parameters()
    missing = sorted(set(live) - set(params))
    if missing:
        raise CheckpointError(f"checkpoint lacks parameters {missing[:4]}: another architecture?")
    for layer in net.layers:
        for k in layer.params:
            v = params[f"{layer.name}.{k}"]
            if v.shape != layer.params[k].shape:
                raise CheckpointError(f"checkpoint {layer.name}.{k} has shape {v.shape}, "
                                      f"the network expects {layer.params[k].shape}")
            layer.params[k] = to_device(v.astype(layer.params[k].dtype), xp)
