"""HDF5 checkpoints, written atomically (temp file + rename).

A checkpoint holds every parameter, the optimiser state, the trainer's RNG state,
the step/epoch/batch position of the data order, and how many metrics lines it
covers (lines written after it are dropped on resume, so a resumed run writes
exactly what an uninterrupted one would). The previous checkpoint is kept as
``last.prev.h5`` until the new one is complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from .backend import to_device, to_numpy
from .data.idx import DataFormatError


class CheckpointError(DataFormatError):
    pass


def save_checkpoint(path, params: dict, opt_state: dict, meta: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        g = f.create_group("params")
        for k, v in params.items():
            g.create_dataset(k, data=to_numpy(v))
        o = f.create_group("optimizer")
        for k, v in opt_state.items():   # 'm/fc1.W' would make nested groups: escape '/'
            o.create_dataset(k.replace("/", "::"), data=np.asarray(v))
        f.attrs["meta"] = json.dumps(meta)
        f.attrs["complete"] = True
    if path.exists():
        os.replace(path, path.with_name(path.stem + ".prev.h5"))
    os.replace(tmp, path)


def load_checkpoint(path):
    """(params as numpy, optimiser state, meta); a clear error for a bad file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise CheckpointError(f"{path}: incomplete checkpoint")
            params = {k: f["params"][k][()] for k in f["params"]}
            opt = {k.replace("::", "/"): f["optimizer"][k][()] for k in f["optimizer"]}
            meta = json.loads(f.attrs["meta"])
    except (OSError, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e}); "
                              f"the previous one, if any, is {path.stem}.prev.h5") from None
    opt = {k: (int(v) if np.ndim(v) == 0 and k == "t" else v) for k, v in opt.items()}
    return params, opt, meta


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
