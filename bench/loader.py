"""Loader throughput against the training step rate (issue: a loader that feeds a GPU).

    python bench/loader.py [--backend numpy|cupy|emulated] [--images 16384] [--workers 0,1,2,4]
                           [--batch 256] [--repeats 2] [--data SHARDS] [--per-shard 1024]
    python bench/loader.py --pack-only DIR --images 36000 --per-shard 32   # just write the shards

Packs synthetic 64 px ImageNet-like shards of 1024 images (or reads --data), then times
one pass of BatchLoader over them, in random order as in training, for each reader
setting: 0 = one reader thread in this process, N = N worker processes. Settings are
interleaved (A, B, A, B, ...) and each is reported as the median images/s. Then times
one GAIT-prop training step of the conv7 network at 64 px on the same backend (the
step whose rate the loader has to keep up with). Prints the BLAS libraries and thread
counts in use.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gait_ref.architectures import build  # noqa: E402
from gait_ref.backend import get_backend, synchronize, to_device  # noqa: E402
from gait_ref.data import BatchLoader, ShardSet  # noqa: E402
from gait_ref.data.shards import FORMAT, VERSION, write_manifest, write_shard  # noqa: E402
from gait_ref.losses import SoftmaxCrossEntropy  # noqa: E402
from gait_ref.optim import Adam  # noqa: E402
from gait_ref.rules import make_rule  # noqa: E402
from gait_ref.step import TrainStep  # noqa: E402
from gait_ref.backend import blas_info  # noqa: E402


def pack_synthetic(root: Path, n: int, size: int = 64, per_shard: int = 1024, classes: int = 1000) -> Path:
    """Random uint8 images in shards of ``per_shard`` (what data_prep writes for ImageNet)."""
    rng = np.random.default_rng(0)
    entries = []
    for i, lo in enumerate(range(0, n, per_shard)):
        m = min(per_shard, n - lo)
        x = rng.integers(0, 256, (m, size, size, 3), dtype=np.uint8)
        entries.append(write_shard(root / f"train-{i:05d}.h5", x, rng.integers(0, classes, m)))
    write_manifest(root, {"format": FORMAT, "version": VERSION, "layout": "NHWC", "image_shape": [size, size, 3],
                          "classes": [[f"n{i:08d}", str(i)] for i in range(classes)],
                          "splits": {"train": entries, "val": entries[:1]}})
    return root


def loader_rate(data, xp, batch, workers) -> float:
    """Images/s of one epoch through BatchLoader (reading, to the device, normalising)."""
    loader = BatchLoader(data, batch, xp, np.float32, seed=1, workers=workers)
    try:
        it = loader.epoch(0)
        next(it)                                   # start-up (worker processes) not counted
        n, t = 0, time.perf_counter()
        for _, x, _ in it:
            n += len(x)
        synchronize(xp)
        return n / (time.perf_counter() - t)
    finally:
        loader.close()


def step_rate(xp, batch, repeats=3) -> float:
    """Images/s of GAIT-prop training steps of conv7 at 64 px (1000 classes)."""
    net = build("conv7", (3, 64, 64), 1000, invertible=True)
    net.init(0, "orthogonal", xp, np.float32)
    step = TrainStep(net, SoftmaxCrossEntropy(1000), make_rule("gait", net), Adam(lr=4.9e-5, beta2=0.99),
                     ortho_lambda=1.0)
    rng = np.random.default_rng(0)
    x = to_device(rng.random((batch, 3, 64, 64)).astype(np.float32), xp)
    y = to_device(rng.integers(0, 1000, batch), xp)
    step(x, y, step=1, epoch=0)
    synchronize(xp)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        step(x, y, step=i + 2, epoch=0)
        synchronize(xp)
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


@click.command()
@click.option("--backend", default="numpy", type=click.Choice(["numpy", "cupy", "emulated"]))
@click.option("--images", default=16384, show_default=True)
@click.option("--workers", default=f"0,1,2,{os.cpu_count()}", show_default=True)
@click.option("--batch", default=256, show_default=True)
@click.option("--repeats", default=2, show_default=True)
@click.option("--data", type=click.Path(exists=True), help="Existing shards (default: synthetic ones).")
@click.option("--per-shard", default=1024, show_default=True, help="Images per synthetic shard.")
@click.option("--pack-only", type=click.Path(), help="Write the synthetic shards into this folder and stop.")
def main(backend, images, workers, batch, repeats, data, per_shard, pack_only):
    if pack_only:
        Path(pack_only).mkdir(parents=True, exist_ok=True)
        pack_synthetic(Path(pack_only), images, per_shard=per_shard)
        print(f"{images} synthetic 64 px images in {-(-images // per_shard)} shards in {pack_only}")
        return
    xp = get_backend(backend)
    print(f"backend {backend}; {os.cpu_count()} CPUs; BLAS: " +
          "; ".join(f"{d['internal_api']} {d['version']} ({d['architecture']}) {d['num_threads']} threads"
                    for d in blas_info()))
    settings = sorted({int(w) for w in workers.split(",")})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(data) if data else pack_synthetic(Path(tmp), images, per_shard=per_shard)
        shards = ShardSet(root, "train")
        shards.verify()
        print(f"{len(shards)} images of {shards.image_shape} in {len(shards.entries)} shards; batch {batch}")
        rates = {w: [] for w in settings}
        for _ in range(repeats):                       # interleaved: A, B, C, A, B, C
            for w in settings:
                rates[w].append(loader_rate(shards, xp, batch, w))
        for w in settings:
            what = "1 reader thread" if w == 0 else f"{w} worker process{'es' if w > 1 else ''}"
            print(f"loader, {what:>20}: {np.median(rates[w]):9.0f} images/s  (runs: "
                  + ", ".join(f"{r:.0f}" for r in rates[w]) + ")")
    rate = step_rate(xp, batch)
    best = max(settings, key=lambda w: np.median(rates[w]))
    print(f"GP training step, conv7 64 px, batch {batch}, {backend}: {rate:9.0f} images/s")
    print(f"best loader setting ({best}) / step rate: {np.median(rates[best]) / rate:.1f}x")


if __name__ == "__main__":
    main()
