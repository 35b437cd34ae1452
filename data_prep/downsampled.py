"""Pack the downsampled ImageNet pickles of Chrabaszcz et al. (2017).

    SRC/train_data_batch_1 .. train_data_batch_10, SRC/val_data
    (optionally SRC/map_clsloc.txt: "<wnid> <1-based index> <name>" lines)

Each pickle holds 'data': uint8 (N, 3 * S * S) planar RGB (all R, then G, then B,
each row-major) and 'labels': 1..1000. Images become NHWC uint8, labels 0-based.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np

from gait_ref.data import safe_pickle
from gait_ref.data.cifar import integer_labels
from gait_ref.data.idx import DataFormatError

from .common import (PrepError, assemble_manifest, finished, inputs_digest, pack_shard, prepare_destination,
                     run_jobs, source_stats, write_report)


def read_batch(path: Path):
    if not path.exists():
        raise PrepError(f"{path}: missing downsampled ImageNet batch")
    try:
        d = safe_pickle.load(path)                  # an allow-list: a crafted pickle cannot run code
        x = np.asarray(d["data"])
        y = integer_labels(d["labels"], path, 1, 1000)
    except DataFormatError as e:
        raise PrepError(str(e)) from None
    except (KeyError, ValueError, TypeError) as e:
        raise PrepError(f"{path}: not a downsampled ImageNet pickle ({type(e).__name__}: {e})") from None
    if x.dtype != np.uint8:
        raise PrepError(f"{path}: data of dtype {x.dtype}, expected uint8")
    S = math.isqrt(x.shape[1] // 3) if x.ndim == 2 else 0
    if x.ndim != 2 or 3 * S * S != x.shape[1] or len(y) != len(x):
        raise PrepError(f"{path}: data {x.shape}, labels {y.shape}; expected (N, 3*S*S) and (N,)")
    return x.reshape(-1, 3, S, S).transpose(0, 2, 3, 1), y - 1        # planar -> NHWC, 0-based


def _pack_job(job, dst, compression):
    name, path, lo, hi = job
    sources = source_stats([path])
    x, y = read_batch(Path(path))
    return pack_shard(dst, name, np.ascontiguousarray(x[lo:hi]), y[lo:hi], [], compression, sources)


def pack_downsampled(src, dst, shard_size=10000, workers=2, compression=None, quiet=False,
                     overwrite=False) -> dict:
    src, dst = Path(src), Path(dst)
    train = [src / f"train_data_batch_{i}" for i in range(1, 11)]
    missing = [p.name for p in train + [src / "val_data"] if not p.exists()]
    if missing:
        raise PrepError(f"{src}: missing {', '.join(missing)} (the pickles from image-net.org's "
                        "'Downsampled ImageNet 32x32/64x64')")
    inputs = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in train + [src / "val_data"]]
    prepare_destination(dst, {"command": "downsampled", "shard_size": shard_size, "compression": compression,
                              "inputs": inputs_digest(inputs)}, overwrite)
    split_shards, chunks, S = {}, {}, None
    for split, files in (("train", train), ("val", [src / "val_data"])):
        split_shards[split] = []
        for f in files:
            x, _ = read_batch(f)                       # sizes (cheap next to the packing itself)
            S = S or x.shape[1]
            for k, lo in enumerate(range(0, len(x), shard_size)):
                name = f"{split}-{f.name}-{k:03d}.h5"
                split_shards[split].append(name)
                chunks[name] = (name, str(f), lo, min(lo + shard_size, len(x)))
    done = finished(dst, chunks, workers)
    jobs = [job for name, job in chunks.items() if name not in done]
    run_jobs(partial(_pack_job, dst=dst, compression=compression), jobs, workers, "packing", quiet)
    names = {}
    cmap = src / "map_clsloc.txt"
    if cmap.exists():
        for line in cmap.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                names[int(parts[1]) - 1] = [parts[0], parts[2]]
    classes = [names.get(i, [f"class_{i}", f"class_{i}"]) for i in range(1000)]
    out = assemble_manifest(dst, split_shards, (S, S, 3), classes,
                            {"source": str(src), "resize": "box (Chrabaszcz et al. 2017)", "size": S})
    write_report(dst, out["report"], quiet)
    return out
