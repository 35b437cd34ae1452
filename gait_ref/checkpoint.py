"""HDF5 checkpoints: checksummed, written so that a complete one always exists.

A checkpoint holds every parameter, the optimiser and learned-feedback state, the
step/epoch/batch position of the data order, and how many metrics lines it covers
(lines written after it are dropped on resume, so a resumed run writes exactly what an
uninterrupted one would). Every dataset carries the SHA-256 of its bytes (attribute
``sha256``) and the metadata its own; the metadata also lists every dataset's name with
its digest (format 3), so a damaged name, a missing or an extra dataset is caught too.
``load_checkpoint`` verifies them all.

Saving (``save_checkpoint``) keeps a complete checkpoint under a name ``--resume`` reads
at every instant, whenever the process is killed:

    1. write last.h5.tmp, flush and fsync it;
    2. hard-link the current last.h5 to last.prev.h5 (atomically, through a temporary
       name; a copy where the file system has no hard links);
    3. rename last.h5.tmp over last.h5 and fsync the folder.

``load_latest`` reads last.h5 and falls back, with a warning, to last.h5.tmp (complete
and checksum-clean: a save killed before its rename) and then to last.prev.h5, when
last.h5 is missing, incomplete, fails a checksum or cannot be restored into the run
(``accept``). A damaged last.h5 is renamed aside (last.h5.corrupt) once another file
was taken, so that the next save does not keep it as last.prev.h5.
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

FORMAT_VERSION = 3      # 2: per-dataset checksums; 3: the meta lists every dataset with its digest


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
    tmp = tmp_path(path)
    arrays = {(group, k): to_numpy(v) for group, items in (("params", params), ("optimizer", opt_state))
              for k, v in items.items()}
    digests = {(group, k): _digest(a) for (group, k), a in arrays.items()}
    meta_json = json.dumps({**meta, "format_version": FORMAT_VERSION,
                            "datasets": {f"{g}/{k}": d for (g, k), d in sorted(digests.items())}})
    with h5py.File(tmp, "w") as f:
        for group in ("params", "optimizer"):
            f.create_group(group)
        for (group, k), arr in arrays.items():   # 'm/fc1.W' would make nested groups: escape '/'
            d = f[group].create_dataset(k.replace("/", "::"), data=arr)
            d.attrs["sha256"] = digests[(group, k)]
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
            listed = meta.get("datasets") if meta.get("format_version", 1) >= 3 else None
            out = {}
            for group in ("params", "optimizer"):
                out[group] = {}
                for k in f[group]:
                    d = f[group][k]
                    v = d[()]
                    name = f"{group}/{k.replace('::', '/')}"
                    digest = _digest(np.asarray(v)) if checked else None
                    if checked and d.attrs.get("sha256") != digest:
                        raise CheckpointError(f"{path}: checksum mismatch in dataset {name} (corrupt)")
                    if listed is not None and listed.get(name) != digest:
                        raise CheckpointError(f"{path}: dataset {name} is not the one its metadata lists "
                                              "(a damaged name or content)")
                    out[group][k.replace("::", "/")] = v
            if listed is not None:
                missing = sorted(set(listed) - {f"{g}/{k}" for g in out for k in out[g]})
                if missing:
                    raise CheckpointError(f"{path}: datasets {missing[:4]} listed in its metadata are missing (corrupt)")
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({' '.join(str(e).split())[:200]})") from None
    opt = {k: (int(v) if np.ndim(v) == 0 and k == "t" else v) for k, v in out["optimizer"].items()}
    return out["params"], opt, meta


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def load_latest(path, warn=None, accept=None):
    """The newest usable checkpoint of ``path``, its in-progress save and its previous one,
    in that order: (params, optimiser state, meta, the file read). A file is usable when
    ``load_checkpoint`` verifies it and ``accept(params, state, meta)`` (if given) raises no
    CheckpointError; each file passed over is named in a warning. When a file other than
    ``path`` is taken, a damaged ``path`` is renamed aside to ``<name>.corrupt``, so that the
    next save does not keep it as the previous checkpoint."""
    path = Path(path)
    warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    errors = []
    for candidate in (path, tmp_path(path), prev_path(path)):
        if candidate != path and not candidate.exists():
            continue
        try:
            loaded = load_checkpoint(candidate)
        except CheckpointError as e:
            errors.append(e)
            continue
        try:
            if accept is not None:
                accept(*loaded)
        except CheckpointError as e:
            errors.append(CheckpointError(f"{candidate}: {e}"))
            continue
        if errors:
            what = "the previous checkpoint" if candidate == prev_path(path) else "the complete save left by an interruption"
            warn(f"warning: {'; '.join(map(str, errors))}; resuming from {what} {candidate.name} instead")
            if candidate != path and path.exists():
                os.replace(path, path.with_name(path.name + ".corrupt"))
        return (*loaded, candidate)
    if len(errors) == 1:
        raise errors[0]
    raise CheckpointError("no usable checkpoint: " + "; and ".join(map(str, errors)))


def restore_params(net, params: dict, xp) -> None:
    live = net.parameters()
    missing, extra = sorted(set(live) - set(params)), sorted(set(params) - set(live))
    if missing or extra:
        raise CheckpointError(f"checkpoint lacks parameters {missing[:4]} and has others {extra[:4]}: another "
                              "architecture, or a damaged name?")
    for layer in net.layers:
        for k in layer.params:
            v = params[f"{layer.name}.{k}"]
            if v.shape != layer.params[k].shape:
                raise CheckpointError(f"checkpoint {layer.name}.{k} has shape {v.shape}, "
                                      f"the network expects {layer.params[k].shape}")
            layer.params[k] = to_device(v.astype(layer.params[k].dtype), xp)
