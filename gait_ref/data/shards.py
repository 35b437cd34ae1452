"""The HDF5 shard format shared by data_prep (writer) and the loader (reader).

A data set is a folder with ``manifest.json`` and shard files. Each shard holds

    images : uint8 (N, H, W, C)   attrs layout="NHWC"; chunks of one image, so a random
                                  batch reads only its own images
    labels : int64 (N,)           0-based class indices

and the manifest lists, per split, every shard with its image count, byte size and
SHA-256, plus the class index (wnid, name) once for the whole set and how images
were resized. Shards are written to a temporary name and renamed into place, so a
shard file that exists is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from .idx import DataFormatError

FORMAT = "gait_ref-shards"
VERSION = 1


def sha256_file(path, block=1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_shard(path, images: np.ndarray, labels: np.ndarray, compression: str | None = None) -> dict:
    """Atomically write one shard; returns its manifest entry."""
    path = Path(path)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path.name}: images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        d = f.create_dataset("images", data=images, chunks=(1,) + images.shape[1:], compression=compression)
        d.attrs["layout"] = "NHWC"
        f.create_dataset("labels", data=np.asarray(labels, np.int64))
        f.attrs["format"], f.attrs["version"] = FORMAT, VERSION
    os.replace(tmp, path)
    return {"file": path.name, "count": int(len(images)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(root, manifest: dict) -> None:
    root = Path(root)
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / "manifest.json")


def read_manifest(root) -> dict:
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise DataFormatError(f"{path}: no manifest.json; pack the data first with `python -m data_prep`")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT:
        raise DataFormatError(f"{path}: not a {FORMAT} manifest")
    return m


class ShardSet:
    """Read access to one split of a packed data set: images by global index."""

    def __init__(self, root, split: str, verify: str = "full"):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        entries = self.manifest["splits"].get(split)
        if not entries:
            raise DataFormatError(f"{self.root}/manifest.json: no '{split}' split "
                                  f"(has {sorted(self.manifest['splits'])})")
        self.entries, self.split, self.verify = entries, split, verify
        self.offsets = np.cumsum([0] + [e["count"] for e in entries])
        H, W, C = self.manifest["image_shape"]
        self.in_shape = (C, H, W)
        self.classes = self.manifest["classes"]
        self.n_classes = len(self.classes)
        self._files = {}

    def __len__(self):
        return int(self.offsets[-1])

    def _open(self, i: int):
        if i in self._files:
            return self._files[i]
        e = self.entries[i]
        path = self.root / e["file"]
        if not path.exists():
            raise DataFormatError(f"shard {path}: missing")
        if path.stat().st_size != e["bytes"]:
            raise DataFormatError(f"shard {path}: {path.stat().st_size} bytes, manifest says {e['bytes']} (truncated?)")
        if self.verify == "full" and sha256_file(path) != e["sha256"]:
            raise DataFormatError(f"shard {path}: checksum mismatch with manifest.json (modified or corrupt)")
        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise DataFormatError(f"shard {path}: not a readable HDF5 file ({err})") from None
        for key in ("images", "labels"):
            if key not in f:
                raise DataFormatError(f"shard {path}: missing dataset '{key}'")
        H, W, C = self.manifest["image_shape"]
        if f["images"].shape != (e["count"], H, W, C) or f["labels"].shape != (e["count"],):
            raise DataFormatError(f"shard {path}: images {f['images'].shape}, labels {f['labels'].shape}; "
                                  f"expected ({e['count']}, {H}, {W}, {C}) and ({e['count']},)")
        self._files[i] = f
        return f

    def read(self, idx: np.ndarray):
        """Images (len(idx), C, H, W) uint8 and labels, in the order of ``idx``."""
        idx = np.asarray(idx)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        H, W, C = self.manifest["image_shape"]
        x = np.empty((len(idx), H, W, C), np.uint8)
        y = np.empty(len(idx), np.int64)
        pos = 0
        for s in np.unique(shard_of):
            local = sorted_idx[shard_of == s] - self.offsets[s]
            f = self._open(int(s))
            n = len(local)
            dest = order[pos:pos + n]
            x[dest] = f["images"][local]                  # increasing indices: one hyperslab read
            y[dest] = f["labels"][local]
            pos += n
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y   # NHWC -> NCHW

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()
