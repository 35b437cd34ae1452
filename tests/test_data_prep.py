"""data_prep on generated ImageNet-format trees of real JPEG files."""
import json
import pickle

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from data_prep.__main__ import cli
from data_prep.imagenet_tree import PrepError, pack_tree
from gait_ref.data import ShardSet
from gait_ref.data.shards import sha256_file


def _photo(rng, w, h):
    """A smooth image (JPEG-friendly) with some texture."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def make_tree(root, val="folders"):
    rng = np.random.default_rng(0)
    spec = {"n02000001": [("a.JPEG", (40, 30), "RGB"), ("b.JPEG", (25, 50), "RGB"), ("c.JPEG", (30, 30), "L")],
            "n01000002": [("d.JPEG", (33, 21), "CMYK"), ("e.JPEG", (20, 20), "RGB"), ("f.JPEG", (20, 20), "corrupt")]}
    files = {}
    for wnid, items in spec.items():
        (root / "train" / wnid).mkdir(parents=True)
        for name, (w, h), mode in items:
            p = root / "train" / wnid / name
            im = Image.fromarray(_photo(rng, w, h))
            if mode == "corrupt":
                im.save(p, quality=90)
                p.write_bytes(p.read_bytes()[:300])     # truncated JPEG
            else:
                im.convert(mode).save(p, quality=90)
            files[str(p)] = wnid
    (root / "val").mkdir()
    for i, wnid in enumerate(sorted(spec)):
        if val == "folders":
            (root / "val" / wnid).mkdir()
            p = root / "val" / wnid / f"v{i}.JPEG"
        else:
            p = root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG"
        Image.fromarray(_photo(rng, 36, 28)).save(p, quality=90)
        files[str(p)] = wnid
    if val == "flat":
        (root / "val_labels.txt").write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {w}\n"
                                                     for i, w in enumerate(sorted(spec))))
    (root / "LOC_synset_mapping.txt").write_text("n01000002 goldfish\nn02000001 great white shark\n")
    return files


def direct(path, size):
    """The oracle: decode with PIL, convert to RGB, shorter side to size (bicubic), centre crop."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    l, t = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((l, t, l + size, t + size)))


def test_pack_tree_round_trip(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = make_tree(src)
    out = pack_tree(src, dst, size=16, shard_size=2, workers=1)
    m = json.loads((dst / "manifest.json").read_text())
    assert m["classes"] == [["n01000002", "goldfish"], ["n02000001", "great white shark"]]
    assert m["layout"] == "NHWC" and m["image_shape"] == [16, 16, 3]
    assert sum(e["count"] for e in m["splits"]["train"]) == 5 and sum(e["count"] for e in m["splits"]["val"]) == 2
    for e in m["splits"]["train"] + m["splits"]["val"]:
        assert sha256_file(dst / e["file"]) == e["sha256"]
    # every packed image equals a direct decode + resize of its file, with the right label
    train = ShardSet(dst, "train")
    x, y = train.read(np.arange(len(train)))
    good = [p for p in sorted(files) if "/train/" in p and not p.endswith("f.JPEG")]
    order = sorted(good, key=lambda p: (sorted(set(files.values())).index(files[p]), p))
    for i, p in enumerate(order):
        np.testing.assert_array_equal(x[i].transpose(1, 2, 0), direct(p, 16))
        assert y[i] == sorted(set(files.values())).index(files[p])
    # bad inputs are reported, never silently dropped
    log = (dst / "prep_log.txt").read_text()
    assert "skipped" in log and "f.JPEG" in log
    assert "mode L converted" in log and "mode CMYK converted" in log
    assert "skipped" in capsys.readouterr().out
    assert len([r for r in out["report"] if r["kind"] == "skipped"]) == 1


def test_resume_gives_identical_shards_and_skips_finished(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    pack_tree(src, dst, size=12, shard_size=2, workers=1, quiet=True)
    before = {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in dst.glob("*.h5")}
    # simulate a run killed while writing train-00001: its shard and sidecar are gone,
    # a temp file is left behind, the manifest was never written
    (dst / "train-00001.h5").unlink()
    (dst / "train-00001.h5.json").unlink()
    (dst / "manifest.json").unlink()
    (dst / "train-00001.h5.tmp").write_bytes(b"partial")
    pack_tree(src, dst, size=12, shard_size=2, workers=2, quiet=True)
    after = {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in dst.glob("*.h5")}
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    for name in before:
        if name != "train-00001.h5":
            assert after[name][1] == before[name][1]      # finished shards were not redone
    assert (dst / "manifest.json").exists()


def test_flat_val_with_labels_file_and_errors(tmp_path):
    src = tmp_path / "src"
    make_tree(src, val="flat")
    with pytest.raises(PrepError, match="needs --val-labels"):
        pack_tree(src, tmp_path / "a", size=8, workers=1, quiet=True)
    with pytest.raises(PrepError, match="nope.txt: validation labels file not found"):
        pack_tree(src, tmp_path / "a", size=8, workers=1, quiet=True, val_labels=src / "nope.txt")
    pack_tree(src, tmp_path / "b", size=8, workers=1, quiet=True, val_labels=src / "val_labels.txt")
    val = ShardSet(tmp_path / "b", "val")
    assert sorted(val.read(np.arange(2))[1].tolist()) == [0, 1]
    (src / "train" / "n03000003").mkdir()
    with pytest.raises(PrepError, match="n03000003: empty class folder"):
        pack_tree(src, tmp_path / "c", size=8, workers=1, quiet=True, val_labels=src / "val_labels.txt")


def test_downsampled_pickles(tmp_path):
    rng = np.random.default_rng(5)
    S = 8
    raw = {}
    for name in [f"train_data_batch_{i}" for i in range(1, 11)] + ["val_data"]:
        data = rng.integers(0, 256, (3, 3 * S * S)).astype(np.uint8)
        labels = rng.integers(1, 1001, 3).tolist()
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "mean": np.zeros(3 * S * S)}, f)
        raw[name] = (data, labels)
    dst = tmp_path / "out"
    res = CliRunner().invoke(cli, ["downsampled", str(tmp_path), str(dst), "--workers", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    train = ShardSet(dst, "train")
    assert len(train) == 30 and train.in_shape == (3, S, S) and train.n_classes == 1000
    x, y = train.read(np.arange(3))
    d, lab = raw["train_data_batch_1"]
    np.testing.assert_array_equal(x, d.reshape(3, 3, S, S))            # planar RGB -> (C, H, W)
    np.testing.assert_array_equal(y, np.asarray(lab) - 1)              # 1-based -> 0-based
    (tmp_path / "val_data").unlink()
    res = CliRunner().invoke(cli, ["downsampled", str(tmp_path), str(tmp_path / "o2"), "--quiet"])
    assert res.exit_code == 2 and "missing val_data" in res.output


def test_rerun_with_other_options_is_refused_and_damaged_shards_are_repacked(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    pack_tree(src, dst, size=12, shard_size=2, workers=1, quiet=True)
    with pytest.raises(PrepError, match=r"packed with other options or inputs \(shard_size 2 -> 3\).*--overwrite"):
        pack_tree(src, dst, size=12, shard_size=3, workers=1, quiet=True)
    with pytest.raises(PrepError, match=r"size 12 -> 16"):
        pack_tree(src, dst, size=16, shard_size=2, workers=1, quiet=True)
    intact = {p.name: sha256_file(p) for p in dst.glob("*.h5")}
    # a deleted shard (its sidecar left) and a damaged one of the same size: both packed again
    (dst / "train-00000.h5").unlink()
    raw = bytearray((dst / "val-00000.h5").read_bytes())
    raw[-10] ^= 0xFF
    (dst / "val-00000.h5").write_bytes(bytes(raw))
    pack_tree(src, dst, size=12, shard_size=2, workers=1, quiet=True)
    assert {p.name: sha256_file(p) for p in dst.glob("*.h5")} == intact
    res = CliRunner().invoke(cli, ["imagenet", str(src), str(dst), "--size", "12", "--shard-size", "3", "--workers",
                                   "1", "--quiet", "--overwrite"])
    assert res.exit_code == 0, res.output
    m = json.loads((dst / "manifest.json").read_text())
    assert [e["count"] for e in m["splits"]["train"]] == [2, 3]   # d, e (f is corrupt) | a, b, c
    assert not (dst / "train-00002.h5").exists()
    assert len(ShardSet(dst, "train")) == 5


def test_16_bit_images_broken_links_and_bad_outputs(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    v = np.array([[0, 257, 4096], [30000, 65535, 128]], np.uint16).repeat(4, 0).repeat(4, 1)   # 8 x 12
    Image.fromarray(v).save(src / "train" / "n01000002" / "g.png")
    (src / "train" / "n01000002" / "h.JPEG").symlink_to(src / "nowhere.JPEG")
    dst = tmp_path / "dst"
    pack_tree(src, dst, size=8, resize="box", shard_size=10, workers=1, quiet=True)
    log = (dst / "prep_log.txt").read_text()
    assert "broken symbolic link" in log and "h.JPEG" in log
    assert "g.png\tmode I;16 scaled to 8 bits and converted to RGB" in log
    train = ShardSet(dst, "train")
    x, y = train.read(np.arange(len(train)))
    g = x[2].transpose(1, 2, 0)                                      # goldfish: d, e, g (f is corrupt)
    want = np.asarray(Image.fromarray(np.round(v / 257).astype(np.uint8)).resize((8, 8), Image.Resampling.BOX))
    np.testing.assert_array_equal(g[..., 0], want)                   # scaled, not clipped to 255
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", "/proc/gait_ref_cannot_be_here"):
        res = CliRunner().invoke(cli, ["imagenet", str(src), str(out), "--quiet"])
        assert res.exit_code == 2 and str(out) in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1


def test_a_malformed_manifest_is_a_clear_error(tmp_path):
    from gait_ref.data import DataFormatError
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    pack_tree(src, dst, size=8, workers=1, quiet=True)
    m = json.loads((dst / "manifest.json").read_text())
    for key in ("splits", "image_shape"):
        bad = {k: v for k, v in m.items() if k != key}
        (dst / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(DataFormatError, match=f"manifest.json: missing or malformed '{key}'"):
            ShardSet(dst, "train")


def test_a_decompression_bomb_is_a_logged_skip(tmp_path, monkeypatch):
    """An image of more pixels than the limit (PIL warns up to twice its limit, which scrolled
    by unnoticed) is skipped and logged like a corrupt file; the pack goes on."""
    from data_prep import imagenet_tree
    monkeypatch.setattr(imagenet_tree, "MAX_IMAGE_PIXELS", 40)
    for side, kind in ((8, "DecompressionBombWarning"), (10, "DecompressionBombError")):   # 64 and 100 pixels
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / f"big{side}.png")
        arr, note = imagenet_tree.load_image(tmp_path / f"big{side}.png", 4, "box")
        assert arr is None and note["kind"] == "skipped" and note["reason"].startswith(kind), note
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "small.png")
    arr, note = imagenet_tree.load_image(tmp_path / "small.png", 4, "box")
    assert arr.shape == (4, 4, 3) and note is None


def test_16_bit_images_are_scaled_without_a_float64_copy_of_the_image(tmp_path):
    """A 16-bit image is scaled a block of rows at a time: the numpy memory this takes stays
    below one float64 copy of the image (a 273 KB PNG took 3.6 GB per worker before)."""
    import tracemalloc

    from data_prep.imagenet_tree import load_image
    h, w = 1024, 2048
    v = (np.arange(h * w, dtype=np.uint64) % 65536).astype(np.uint16).reshape(h, w)
    Image.fromarray(v).save(tmp_path / "deep.png")
    tracemalloc.start()
    arr, note = load_image(tmp_path / "deep.png", 8, "box")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert arr.shape == (8, 8, 3) and "scaled to 8 bits" in note["reason"]
    assert peak < h * w * 8, peak


def test_size_and_shard_memory_are_bounded(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    res = CliRunner().invoke(cli, ["imagenet", str(src), str(tmp_path / "d"), "--size", "100000", "--quiet"])
    assert res.exit_code == 2 and "--size" in res.output and "Traceback" not in res.output
    with pytest.raises(PrepError, match=r"--shard-size 1024 at --size 2048 holds 12.0 GiB .* lower --shard-size"):
        pack_tree(src, tmp_path / "d", size=2048, shard_size=1024, workers=1, quiet=True)


def test_a_rerun_notices_a_source_replaced_under_the_same_name(tmp_path):
    """A finished shard is skipped on a rerun only while the files it was packed from are as
    they were: a source image replaced under the same name makes its shard packed again."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    pack_tree(src, dst, size=8, shard_size=2, workers=1, quiet=True)
    before = {p.name: sha256_file(p) for p in dst.glob("train-*.h5")}
    a = src / "train" / "n02000001" / "a.JPEG"
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(a, quality=90)
    pack_tree(src, dst, size=8, shard_size=2, workers=1, quiet=True)
    after = {p.name: sha256_file(p) for p in dst.glob("train-*.h5")}
    changed = [n for n in before if before[n] != after[n]]
    assert len(changed) == 1, changed                          # a.JPEG's shard, and only it


def test_overwrite_deletes_only_what_a_packer_wrote_and_a_corrupt_record_is_one_line(tmp_path):
    """--overwrite used to delete every *.h5 in the destination: a run folder's checkpoints
    there went with the shards. A damaged prep_options.json was a traceback."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    pack_tree(src, dst, size=8, workers=1, quiet=True)
    for keep in ("last.h5", "last.prev.h5", "notes.txt"):
        (dst / keep).write_text("mine")
    (dst / "prep_options.json").write_text("{not json")
    res = CliRunner().invoke(cli, ["imagenet", str(src), str(dst), "--size", "8", "--quiet"])
    assert res.exit_code == 2 and "prep_options.json: unreadable" in res.output and "--overwrite" in res.output
    assert len(res.output.strip().splitlines()) == 1
    pack_tree(src, dst, size=8, workers=1, quiet=True, overwrite=True)
    assert all((dst / keep).read_text() == "mine" for keep in ("last.h5", "last.prev.h5", "notes.txt"))
    assert ShardSet(dst, "train").verify() > 0


def test_a_file_name_cannot_forge_a_log_record(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    forged = src / "train" / "n02000001" / "x\nskipped\tforged\tnot a record.JPEG"
    forged.write_bytes(b"not an image")
    pack_tree(src, dst, size=8, workers=1, quiet=True)
    lines = (dst / "prep_log.txt").read_text().splitlines()
    assert all(line.split("\t")[0] in ("skipped", "converted") and len(line.split("\t")) == 3 for line in lines)
    assert not any(line.startswith("skipped\tforged") for line in lines)
    assert any("x\\nskipped\\tforged\\tnot a record.JPEG" in line for line in lines), lines
