"""The HDF5 shard format shared by data_prep (writer) and the loader (reader).

A data set is a folder with ``manifest.json`` and shard files. Each shard holds

    images : uint8 (N, H, W, C)   attrs layout="NHWC"; chunks of one image, so a random
                                  batch reads only its own images
    labels : int64 (N,)           0-based class indices

and the manifest lists, per split, every shard with its image count, byte size and
SHA-256, plus the class index (wnid, name) once for the whole set and how images
were resized. Shards are written to a temporary name and renamed into place, so a
shard file that exists is complete.

Reading (``ShardSet``): ``verify()`` checks every shard of a split once, before training
(size, SHA-256, labels in range), and caches what it verified keyed by each file's size,
modification time and inode, so a restart re-hashes only what changed. The cache trusts
those three: a file rewritten in place to the same size with its modification time put
back is not re-hashed (``--verify-data always`` re-hashes every shard at every start).
Reads keep a bounded LRU of open files (ImageNet at 1024 images a shard is 1,301 files,
more than a common ``ulimit -n`` of 1024) and refuse a shard that changed since it was
verified: when it is opened, and at every epoch for every shard (``check_unchanged``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataFormatError(f"{path}: not a {FORMAT} manifest")
    for key, kind in (("splits", dict), ("image_shape", list), ("classes", list)):
        if not isinstance(m.get(key), kind):
            raise DataFormatError(f"{path}: missing or malformed '{key}' (pack the data again with data_prep)")
    if len(m["image_shape"]) != 3 or not all(isinstance(v, int) and v > 0 for v in m["image_shape"]):
        raise DataFormatError(f"{path}: image_shape {m['image_shape']} is not [H, W, C]")
    for split, entries in m["splits"].items():
        for e in entries if isinstance(entries, list) else [None]:
            if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("count"), int)
                    and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)):
                raise DataFormatError(f"{path}: malformed entry in split '{split}': {str(e)[:120]}")
            if Path(e["file"]).name != e["file"]:
                raise DataFormatError(f"{path}: shard name {e['file']!r} must be a plain file name in the folder")
    return m


def _stat_key(path: Path):
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def shards_under(data):
    """The ShardSet a data set reads from (through any Subset views), or None (arrays)."""
    while data is not None and not isinstance(data, ShardSet):
        data = getattr(data, "data", None)
    return data


class ShardSet:
    """Read access to one split of a packed data set: images by global index.

    ``max_open`` bounds the open HDF5 files (least recently used closed first)."""

    def __init__(self, root, split: str, max_open: int = 64):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        entries = self.manifest["splits"].get(split)
        if not entries:
            raise DataFormatError(f"{self.root}/manifest.json: no '{split}' split "
                                  f"(has {sorted(self.manifest['splits'])})")
        self.entries, self.split, self.max_open = entries, split, int(max_open)
        self.offsets = np.cumsum([0] + [e["count"] for e in entries])
        H, W, C = self.manifest["image_shape"]
        self.image_shape = (H, W, C)
        self.in_shape = (C, H, W)
        self.classes = self.manifest["classes"]
        self.n_classes = len(self.classes)
        self.verified = {}            # file -> (size, mtime_ns, inode) checked by verify()
        self._files: OrderedDict = OrderedDict()

    def __len__(self):
        return int(self.offsets[-1])

    def digest(self) -> str:
        """SHA-256 of what the manifest says this split holds (each shard's name, count and
        SHA-256, the image shape and the classes): the same data wherever its folder is."""
        what = {"split": self.split, "shards": [[e["file"], e["count"], e["sha256"]] for e in self.entries],
                "image_shape": list(self.image_shape), "classes": self.classes}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    # ---- verification ----------------------------------------------------------------------------
    def _check_shard(self, e: dict) -> None:
        """Size, SHA-256 and label range of one shard; DataFormatError naming it."""
        path = self.root / e["file"]
        if not path.exists():
            raise DataFormatError(f"shard {path}: missing")
        if path.stat().st_size != e["bytes"]:
            raise DataFormatError(f"shard {path}: {path.stat().st_size} bytes, manifest says {e['bytes']} (truncated?)")
        if sha256_file(path) != e["sha256"]:
            raise DataFormatError(f"shard {path}: checksum mismatch with manifest.json (modified or corrupt)")
        with self._h5(path) as f:
            self._check_layout(f, e, path)
            labels = f["labels"][()]
        bad = np.flatnonzero((labels < 0) | (labels >= self.n_classes))
        if len(bad):
            raise DataFormatError(f"shard {path}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside "
                                  f"0..{self.n_classes - 1} (the manifest lists {self.n_classes} classes)")

    def verify(self, cache_file=None, workers: int = 4, quiet: bool = True, should_stop=None) -> int:
        """Check every shard of the split before it is read (see ``_check_shard``); shards
        whose (size, mtime) match ``cache_file``'s record are not re-hashed. Returns how
        many shards were hashed. The cache is written atomically after each run.
        ``should_stop()`` is asked after each shard: when it answers true, the shards not
        yet started are left unverified (``self.verified`` lacks them) and the cache keeps
        the ones that were."""
        cache_file = None if cache_file is None else Path(cache_file)
        cache = {}
        if cache_file is not None and cache_file.exists():
            try:
                cache = json.loads(cache_file.read_text()).get(str(self.root.resolve()), {})
            except (json.JSONDecodeError, AttributeError, OSError):
                cache = {}                                      # a damaged cache only costs time
        todo, done = [], {}
        for e in self.entries:
            path = self.root / e["file"]
            key = list(_stat_key(path)) if path.exists() else None
            rec = cache.get(e["file"])
            if key and rec and rec.get("stat") == key and rec.get("sha256") == e["sha256"]:
                done[e["file"]] = tuple(key)
            else:
                todo.append(e)
        if todo:
            from tqdm import tqdm
            total = sum(e["bytes"] for e in todo)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {self.split} shards",
                       disable=quiet or total < (1 << 30), leave=False)
            with ThreadPoolExecutor(max(1, int(workers))) as pool:     # hashlib releases the GIL
                futures = [pool.submit(self._check_shard, e) for e in todo]
                try:
                    for e, f in zip(todo, futures):
                        f.result()
                        done[e["file"]] = _stat_key(self.root / e["file"])
                        bar.update(e["bytes"])
                        if should_stop is not None and should_stop():
                            break
                finally:
                    for f in futures:                    # not started: left for the next run
                        f.cancel()
            bar.close()
        self.verified = done
        if cache_file is not None:
            _update_cache(cache_file, str(self.root.resolve()),
                          {e["file"]: {"stat": list(done[e["file"]]), "sha256": e["sha256"]} for e in self.entries
                           if e["file"] in done})
        return len(todo)

    # ---- reading ------------------------------------------------------------------------------------
    def _h5(self, path: Path):
        try:
            return h5py.File(path, "r")
        except OSError as err:
            if getattr(err, "errno", None) == errno.EMFILE or "Too many open files" in str(err):
                raise DataFormatError(f"shard {path}: too many open files (EMFILE): this process reached its "
                                      f"limit (`ulimit -n`); raise it or lower the open-shard bound "
                                      f"(max_open={self.max_open})") from None
            raise DataFormatError(f"shard {path}: not a readable HDF5 file ({err})") from None

    def _check_layout(self, f, e: dict, path: Path) -> None:
        for key in ("images", "labels"):
            if key not in f:
                raise DataFormatError(f"shard {path}: missing dataset '{key}'")
        H, W, C = self.image_shape
        if f["images"].shape != (e["count"], H, W, C) or f["labels"].shape != (e["count"],) \
                or f["images"].dtype != np.uint8:
            raise DataFormatError(f"shard {path}: images {f['images'].dtype} {f['images'].shape}, labels "
                                  f"{f['labels'].shape}; expected uint8 ({e['count']}, {H}, {W}, {C}) "
                                  f"and ({e['count']},)")

    def _open(self, i: int):
        if i in self._files:
            self._files.move_to_end(i)
            return self._files[i]
        e = self.entries[i]
        path = self.root / e["file"]
        if not path.exists():
            raise DataFormatError(f"shard {path}: missing")
        key = _stat_key(path)
        if key[0] != e["bytes"]:
            raise DataFormatError(f"shard {path}: {key[0]} bytes, manifest says {e['bytes']} (truncated?)")
        if e["file"] in self.verified and tuple(self.verified[e["file"]]) != key:
            raise DataFormatError(f"shard {path}: modified since it was verified at the start of the run")
        while len(self._files) >= self.max_open:
            self._files.popitem(last=False)[1].file.close()
        f = self._h5(path)
        self._check_layout(f, e, path)
        self._files[i] = _OpenShard(f)
        return self._files[i]

    def open_files(self) -> int:
        return len(self._files)

    def check_unchanged(self) -> None:
        """DataFormatError naming the first verified shard whose size, modification time or
        inode changed since its verification (the loader asks at every epoch: a shard
        already open would otherwise be read as it now is, silently)."""
        for name, key in self.verified.items():
            path = self.root / name
            try:
                now = _stat_key(path)
            except FileNotFoundError:
                raise DataFormatError(f"shard {path}: deleted during the run") from None
            if now != tuple(key):
                raise DataFormatError(f"shard {path}: modified during the run (since it was verified); the run "
                                      "stops rather than read it. Check the data, then --resume")

    def read(self, idx: np.ndarray):
        """Images and labels of ``idx``, in its order: images (len(idx), C, H, W) uint8 as a
        channels-last view (the shards' NHWC memory; no host transpose)."""
        idx = np.asarray(idx)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        x = np.empty((len(idx),) + self.image_shape, np.uint8)
        y = np.empty(len(idx), np.int64)
        pos = 0
        for s in np.unique(shard_of):
            local = sorted_idx[shard_of == s] - self.offsets[s]
            shard = self._open(int(s))
            n = len(local)
            dest = order[pos:pos + n]
            shard.read_images(local, x, dest)
            y[dest] = shard.labels[local]
            pos += n
        return x.transpose(0, 3, 1, 2), y                 # NHWC memory, NCHW shape

    def read_all(self, quiet: bool = True):
        """The whole split, shard by shard: (images (N, C, H, W) channels-last view, labels)."""
        from tqdm import tqdm
        x = np.empty((len(self),) + self.image_shape, np.uint8)
        y = np.empty(len(self), np.int64)
        for i in tqdm(range(len(self.entries)), desc=f"loading {self.split} into memory", unit="shard",
                      disable=quiet, leave=False):
            shard = self._open(i)
            lo, hi = self.offsets[i], self.offsets[i + 1]
            shard.images.read_direct(x, dest_sel=np.s_[lo:hi])
            y[lo:hi] = shard.labels
        return x.transpose(0, 3, 1, 2), y

    def close(self):
        for shard in self._files.values():
            shard.file.close()
        self._files.clear()

    def __getstate__(self):                               # worker processes reopen their own files
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()
        return state


class _OpenShard:
    """An open shard: its file, its images dataset and all its labels (read once).

    Images are read one chunk (= one image) at a time: raw chunk reads where the shard is
    stored without compression (h5py's fancy indexing is two orders of magnitude slower:
    about 1,100 against 200,000 images/s of 64 px here), else one ``read_direct`` each."""

    def __init__(self, f):
        self.file, self.images = f, f["images"]
        self.labels = f["labels"][()]
        self.raw = (self.images.chunks == (1,) + self.images.shape[1:]
                    and self.images.id.get_create_plist().get_nfilters() == 0)

    def read_images(self, local, out, dest) -> None:
        """out[dest[j]] = images[local[j]] for every j."""
        d = self.images
        if self.raw:
            shape = d.shape[1:]
            for i, j in zip(local.tolist(), dest.tolist()):
                mask, chunk = d.id.read_direct_chunk((i, 0, 0, 0))
                out[j] = np.frombuffer(chunk, np.uint8).reshape(shape)
        else:
            for i, j in zip(local.tolist(), dest.tolist()):
                d.read_direct(out, source_sel=np.s_[i:i + 1], dest_sel=np.s_[j:j + 1])


def _update_cache(cache_file: Path, root: str, record: dict) -> None:
    """Merge ``record`` for data set ``root`` into the verification cache (atomic write)."""
    data = {}
    if cache_file.exists():
        try:
            data = json.loads(cache_file.read_text())
        except (json.JSONDecodeError, OSError):
            data = {}
    data = data if isinstance(data, dict) else {}
    data[root] = {**data.get(root, {}), **record}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, cache_file)
