"""Pack an ImageNet-style JPEG tree.

    SRC/train/<wnid>/*.JPEG
    SRC/val/<wnid>/*.JPEG                 or  SRC/val/*.JPEG with --val-labels FILE
    SRC/LOC_synset_mapping.txt (optional: "<wnid> <name>" lines, for class names)

--val-labels accepts "<file name> <wnid>" lines (whitespace or comma separated; a
Kaggle LOC_val_solution.csv works: its first field is the image id and the first
token of the second is the wnid). Classes are the sorted train/<wnid> folders.

Resize (``--resize``):
  center-crop  scale the shorter side to S (PIL bicubic, with antialiasing), then take
               the central S x S crop; the usual ImageNet evaluation transform.
  box          resize the whole image to S x S with PIL's box filter, ignoring the
               aspect ratio, as Chrabaszcz et al. (2017) made downsampled ImageNet.
Grayscale, CMYK, palette or alpha images are converted to RGB and reported (16-bit
images are scaled to 8 bits first, not clipped, a block of rows at a time); unreadable,
corrupt or truncated files and broken symbolic links are skipped and reported, and so is
an image of more than ``MAX_IMAGE_PIXELS`` pixels (a decompression bomb: a small file
that decodes to gigabytes; ImageNet's largest images have about 10^7). ``--size`` is at
most ``MAX_SIZE`` and a shard, held in memory while it is packed, at most
``MAX_SHARD_BYTES``.
"""
from __future__ import annotations

import csv
import re
import warnings
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from .common import (PrepError, assemble_manifest, finished, inputs_digest, pack_shard, prepare_destination,
                     run_jobs, source_stats, write_report)

EXTS = {".jpeg", ".jpg", ".png"}
RESIZES = ("center-crop", "box")
MAX_IMAGE_PIXELS = 1 << 26        # 67 Mpx (PIL's default is 89 Mpx, with a warning only up to twice that)
MAX_SIZE = 2048                   # --size
MAX_SHARD_BYTES = 4 << 30         # a shard's images in memory while packed
SCALE_ROWS = 64                   # rows of a 16-bit image scaled at once
__all__ = ["PrepError", "pack_tree", "load_image", "RESIZES"]


def load_image(path, size: int, resize: str):
    """(uint8 (S, S, 3) array or None, report dict or None) for one file."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)     # a skip, not a warning
            im_file = Image.open(path)
        with im_file as im:
            im.load()
            mode = im.mode
            note = None
            if mode.startswith("I;16") or mode == "I":      # 16-bit (or 32-bit int) gray: scale, don't clip
                im = Image.fromarray(_to_8_bits(np.asarray(im), mode), "L")
                note = {"kind": "converted", "file": str(path),
                        "reason": f"mode {mode} scaled to 8 bits and converted to RGB"}
                im = im.convert("RGB")
            elif mode != "RGB":
                note = {"kind": "converted", "file": str(path), "reason": f"mode {mode} converted to RGB"}
                im = im.convert("RGB")
            out = resize_image(im, size, resize)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None, {"kind": "skipped", "file": str(path), "reason": f"{type(e).__name__}: {e}"}
    return out, note


def _to_8_bits(a: np.ndarray, mode: str) -> np.ndarray:
    """A 16-bit (or 32-bit int) gray image scaled to 0..255 (rounded, not clipped at 255),
    ``SCALE_ROWS`` rows at a time: float64 temporaries of a block, not of the image."""
    top = 65535.0 if mode.startswith("I;16") or a.max() <= 65535 else float(a.max())
    out = np.empty(a.shape, np.uint8)
    for r in range(0, len(a), SCALE_ROWS):
        out[r:r + SCALE_ROWS] = np.clip(np.round(a[r:r + SCALE_ROWS] * (255.0 / top)), 0, 255)
    return out


def resize_image(im: Image.Image, size: int, resize: str) -> np.ndarray:
    if resize == "box":
        return np.asarray(im.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _images_in(folder: Path, report: list):
    """The image files in ``folder``, sorted; broken symbolic links go to ``report``."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in EXTS:
            continue
        if p.is_symlink() and not p.exists():
            report.append({"kind": "skipped", "file": str(p), "reason": "broken symbolic link"})
        elif p.is_file():
            files.append(p)
    return files


def read_val_labels(path: Path) -> dict:
    if not path.exists():
        raise PrepError(f"{path}: validation labels file not found")
    labels = {}
    with open(path, newline="") as f:
        for row in csv.reader(f) if path.suffix == ".csv" else (line.split() for line in f):
            if len(row) < 2 or row[0] in ("ImageId",):
                continue
            name, wnid = row[0].strip(), row[1].split()[0]
            labels[Path(name).stem] = wnid
    if not labels:
        raise PrepError(f"{path}: no '<file> <wnid>' lines found")
    return labels


def class_names(src: Path, wnids) -> list:
    names = {}
    for cand in ("LOC_synset_mapping.txt", "words.txt", "synset_words.txt"):
        p = src / cand
        if p.exists():
            for line in p.read_text().splitlines():
                m = re.match(r"(n\d+)\s+(.*)", line)
                if m:
                    names[m.group(1)] = m.group(2).strip()
            break
    return [[w, names.get(w, w)] for w in wnids]


def list_items(src: Path, val_labels=None, report=None):
    """{'train': [(path, label)], 'val': [...]} and the class index; files skipped while
    listing (broken links) are appended to ``report``."""
    report = [] if report is None else report
    train_dir = src / "train"
    if not train_dir.is_dir():
        raise PrepError(f"{src}: no train/ folder (expected train/<wnid>/*.JPEG)")
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not wnids:
        raise PrepError(f"{train_dir}: no class folders")
    index = {w: i for i, w in enumerate(wnids)}
    items = {"train": []}
    for w in wnids:
        files = _images_in(train_dir / w, report)
        if not files:
            raise PrepError(f"{train_dir / w}: empty class folder (no .JPEG/.jpg/.png files)")
        items["train"] += [(str(p), index[w]) for p in files]
    val_dir = src / "val"
    if val_dir.is_dir():
        sub = sorted(p for p in val_dir.iterdir() if p.is_dir())
        if sub:
            val = []
            for d in sub:
                if d.name not in index:
                    raise PrepError(f"{d}: class {d.name} is not among the train classes")
                val += [(str(p), index[d.name]) for p in _images_in(d, report)]
        else:
            if val_labels is None:
                raise PrepError(f"{val_dir}: flat validation folder needs --val-labels FILE "
                                "(lines '<file> <wnid>', or Kaggle's LOC_val_solution.csv)")
            labels = read_val_labels(Path(val_labels))
            val = []
            for p in _images_in(val_dir, report):
                if p.stem not in labels:
                    raise PrepError(f"{p}: no label in {val_labels}")
                if labels[p.stem] not in index:
                    raise PrepError(f"{p}: label {labels[p.stem]} is not among the train classes")
                val.append((str(p), index[labels[p.stem]]))
        items["val"] = val
    return items, class_names(src, wnids)


def _pack_job(job, dst, size, resize, compression):
    shard_name, chunk = job
    sources = source_stats(path for path, _ in chunk)
    images, labels, report = [], [], []
    for path, label in chunk:
        arr, note = load_image(path, size, resize)
        if note:
            report.append(note)
        if arr is not None:
            images.append(arr)
            labels.append(label)
    x = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return pack_shard(dst, shard_name, x, np.asarray(labels, np.int64), report, compression, sources)


def pack_tree(src, dst, size=64, resize="center-crop", shard_size=1024, workers=2, compression=None,
              val_labels=None, quiet=False, overwrite=False) -> dict:
    src, dst = Path(src), Path(dst)
    if resize not in RESIZES:
        raise PrepError(f"--resize must be one of {RESIZES}, got {resize!r}")
    if not 1 <= size <= MAX_SIZE:
        raise PrepError(f"--size must be in 1..{MAX_SIZE}, got {size}")
    if shard_size * size * size * 3 > MAX_SHARD_BYTES:
        raise PrepError(f"--shard-size {shard_size} at --size {size} holds {shard_size * size * size * 3 / 2**30:.1f} "
                        f"GiB of images in memory per worker (at most {MAX_SHARD_BYTES / 2**30:.0f}): lower --shard-size")
    if not src.is_dir():
        raise PrepError(f"{src}: source folder not found")
    listing = []
    items, classes = list_items(src, val_labels, listing)
    prepare_destination(dst, {"command": "imagenet", "size": size, "resize": resize, "shard_size": shard_size,
                              "compression": compression,
                              "inputs": inputs_digest((s, p, y) for s, lst in items.items() for p, y in lst)},
                        overwrite)
    split_shards, chunks = {}, {}
    for split, lst in items.items():
        split_shards[split] = []
        for i in range(0, len(lst), shard_size):
            name = f"{split}-{i // shard_size:05d}.h5"
            split_shards[split].append(name)
            chunks[name] = lst[i:i + shard_size]
    done = finished(dst, chunks, workers)             # finished, intact shards are not redone
    jobs = [(name, chunk) for name, chunk in chunks.items() if name not in done]
    func = partial(_pack_job, dst=dst, size=size, resize=resize, compression=compression)
    run_jobs(func, jobs, workers, f"packing {src.name}", quiet)
    out = assemble_manifest(dst, split_shards, (size, size, 3), classes,
                            {"source": str(src), "resize": resize, "size": size})
    out["report"] = listing + out["report"]
    write_report(dst, out["report"], quiet)
    return out
