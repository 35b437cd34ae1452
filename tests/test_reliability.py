"""Nothing lost, nothing run that shouldn't be: checkpoints, run folders, options, data
files, under kills, corruption, concurrent runs and hostile input."""
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from gait_ref import checkpoint
from gait_ref.checkpoint import CheckpointError, load_checkpoint, load_latest, save_checkpoint
from gait_ref.config import Config
from gait_ref.data import DataFormatError, load_task
from gait_ref.data.cifar import load_cifar10, write_cifar_batch
from gait_ref.distributed import process_gone
from gait_ref.train import Trainer

from .helpers import make_shards
from .test_cli import ROOT, main, records, run_cli, strip_timings

COMMON = ["--task", "synthetic", "--rule", "gait", "--batch-size", 50, "--log-every", 3]


def one_line_error(res, *fragments):
    assert res.exit_code == 2, res.output
    for f in fragments:
        assert f in res.output, (f, res.output)
    assert "Traceback" not in res.output


# ---- checkpoints -----------------------------------------------------------------------------------
def test_a_complete_checkpoint_exists_at_every_instant_of_a_save(tmp_path, monkeypatch):
    """After every file-system operation inside save_checkpoint, what --resume reads is a
    complete, checksum-clean checkpoint (the old one or the new one), never nothing."""
    path = tmp_path / "last.h5"
    save_checkpoint(path, {"a.W": np.zeros(3)}, {"t": 1}, {"step": 1})
    seen = []

    def checked(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.append(load_latest(path, warn=lambda m: None)[2]["step"])
            return out
        return wrapper

    for name in ("link", "replace"):
        monkeypatch.setattr(checkpoint.os, name, checked(getattr(os, name)))
    save_checkpoint(path, {"a.W": np.ones(3)}, {"t": 2}, {"step": 2})
    assert seen[0] == 1 and seen[-1] == 2 and set(seen) <= {1, 2}
    assert load_checkpoint(tmp_path / "last.prev.h5")[2]["step"] == 1


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path):
    """last.h5 missing (the old save's crash window) or damaged: --resume warns and continues
    from last.prev.h5, and the run ends exactly as an uninterrupted one."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*COMMON, "--max-steps", 30, "--out", a).exit_code == 0
    assert run_cli(*COMMON, "--max-steps", 20, "--checkpoint-every", 8, "--out", b).exit_code == 0
    (b / "last.h5").unlink()
    res = run_cli(*COMMON, "--max-steps", 30, "--out", b, "--resume")
    assert res.exit_code == 0 and "resuming from the previous checkpoint last.prev.h5" in res.output
    assert strip_timings(records(a)) == strip_timings(records(b))
    res = run_cli(*COMMON, "--max-steps", 30, "--out", b)            # a new run would delete it: refused
    one_line_error(res, "holds a checkpoint", "--resume", "--overwrite")


def test_flipped_bytes_are_caught_by_the_checksums(tmp_path):
    out = tmp_path / "r"
    assert run_cli(*COMMON, "--max-steps", 20, "--checkpoint-every", 8, "--out", out).exit_code == 0
    with h5py.File(out / "last.h5", "r") as f:                  # a byte inside Adam's second moment
        d = f["optimizer"]["v::fc2.W"]
        offset = d.id.get_offset() + d.id.get_storage_size() // 2
    raw = bytearray((out / "last.h5").read_bytes())
    raw[offset] ^= 0x40
    (out / "last.h5").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checksum mismatch in dataset optimizer/v/fc2.W"):
        load_checkpoint(out / "last.h5")
    res = run_cli(*COMMON, "--max-steps", 30, "--out", out, "--resume")
    assert res.exit_code == 0 and "checksum mismatch in dataset optimizer/v/fc2.W" in res.output
    assert "resuming from the previous checkpoint" in res.output


SGD = ["--optimizer", "sgd", "--momentum", 0.9, "--lr", 1e-3]


@pytest.mark.parametrize("optimizer", [SGD, []], ids=["sgd", "adam"])
@pytest.mark.parametrize("damaged", ["optimizer/u::fc1.W", "params/fc2.W"])
def test_a_damaged_dataset_name_falls_back_and_is_never_kept(tmp_path, optimizer, damaged):
    """One flipped bit in a dataset's name: the metadata lists every dataset with its digest,
    so the name is caught and --resume continues from last.prev.h5, ending as an
    uninterrupted run. The damaged file is renamed aside, so the next save does not keep it
    as last.prev.h5. (Before: SGD resumed silently with fc1's momentum reset; Adam died on a
    KeyError; a parameter's name read as another architecture, with no fallback.)"""
    if damaged.startswith("optimizer/u") and not optimizer:
        damaged = "optimizer/m::fc1.W"
    args = [*COMMON, *optimizer, "--checkpoint-every", 4]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*args, "--max-steps", 14, "--out", a).exit_code == 0
    assert run_cli(*args, "--max-steps", 10, "--out", b).exit_code == 0
    group, name = damaged.split("/")
    with h5py.File(b / "last.h5", "r+") as f:
        f[group].move(name, name[:-1] + chr(ord(name[-1]) ^ 1))        # W -> V: one bit of the name
    res = run_cli(*args, "--max-steps", 14, "--out", b, "--resume")
    assert res.exit_code == 0, res.output
    assert "is not the one its metadata lists" in res.output or "listed in its metadata are missing" in res.output
    assert "resuming from the previous checkpoint last.prev.h5" in res.output
    assert strip_timings(records(a)) == strip_timings(records(b))
    assert (b / "last.h5.corrupt").exists()
    for f in ("last.h5", "last.prev.h5"):
        load_checkpoint(b / f)                                         # both verify: the damaged file is in neither


def test_a_checkpoint_that_does_not_restore_falls_back(tmp_path):
    """A checkpoint that verifies but does not fit the run (here an optimiser state with a
    moment missing, as a writer bug would leave it) is passed over like a damaged one."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = [*COMMON, "--checkpoint-every", 4]
    assert run_cli(*args, "--max-steps", 14, "--out", a).exit_code == 0
    assert run_cli(*args, "--max-steps", 10, "--out", b).exit_code == 0
    params, state, meta = load_checkpoint(b / "last.h5")
    del state["m/fc1.W"]
    save_checkpoint(b / "broken.h5", params, state, meta)
    os.replace(b / "broken.h5", b / "last.h5")
    res = run_cli(*args, "--max-steps", 14, "--out", b, "--resume")
    assert res.exit_code == 0 and "does not restore into this run (Adam state does not fit the parameters: missing " \
        "['m/fc1.W']" in res.output, res.output
    assert strip_timings(records(a)) == strip_timings(records(b))


def test_the_complete_save_of_an_interrupted_run_is_resumed(tmp_path):
    """Killed after its first save's file was written and synced, before the rename: only
    last.h5.tmp exists. It is complete and verifies, so --resume takes it."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = [*COMMON, "--checkpoint-every", 4]
    assert run_cli(*args, "--max-steps", 10, "--out", a).exit_code == 0
    assert run_cli(*args, "--max-steps", 4, "--out", b).exit_code == 0
    os.replace(b / "last.h5", b / "last.h5.tmp")
    res = run_cli(*args, "--max-steps", 10, "--out", b, "--resume")
    assert res.exit_code == 0 and "resuming from the complete save left by an interruption last.h5.tmp" in res.output
    assert strip_timings(records(a)) == strip_timings(records(b))


def _spawn(args, **kw):
    return subprocess.Popen([sys.executable, "run.py", *map(str, args), "--quiet"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_random_kills_lose_nothing(tmp_path):
    """SIGKILL at random moments of a run that checkpoints every step (each kill lands after
    the process wrote checkpoints of its own); each time --resume continues, and the
    finished run's records equal an uninterrupted run's."""
    args = ["--task", "synthetic", "--rule", "bp", "--batch-size", 20, "--log-every", 7, "--max-steps", 400,
            "--checkpoint-every", 1]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*args, "--out", a).exit_code == 0
    rng = np.random.default_rng(0)
    steps_at_kill = []
    for k in range(5):
        before = load_latest(b / "last.h5")[2]["step"] if k else 0
        p = _spawn([*args, "--out", b, *(["--resume"] if k else [])])
        deadline = time.time() + 60
        while time.time() < deadline:                            # this process's own checkpoints
            try:
                if load_latest(b / "last.h5", warn=lambda m: None)[2]["step"] > before + 2:
                    break
            except (CheckpointError, OSError):
                pass
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 0.3)))
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate()
        assert p.returncode == -signal.SIGKILL, (k, p.returncode, err[-2000:])   # killed mid-run, not finished
        steps_at_kill.append(load_latest(b / "last.h5", warn=lambda m: None)[2]["step"])
    assert steps_at_kill == sorted(steps_at_kill) and steps_at_kill[-1] < 400
    res = run_cli(*args, "--out", b, "--resume")
    assert res.exit_code == 0, res.output
    assert strip_timings(records(a)) == strip_timings(records(b))


# ---- the run folder -------------------------------------------------------------------------------
def _spawn_until_its_first_checkpoint(out):
    """A long run into ``out``, checkpointing every 5 steps, once its first checkpoint exists."""
    p = _spawn([*COMMON, "--max-steps", 100000, "--checkpoint-every", 5, "--out", out])
    deadline = time.time() + 60
    while not (out / "last.h5").exists() and time.time() < deadline:
        time.sleep(0.05)
    return p


def test_two_runs_cannot_share_a_folder_and_a_dead_owners_lock_is_taken_over(tmp_path):
    out = tmp_path / "r"
    p = _spawn_until_its_first_checkpoint(out)
    try:
        res = run_cli(*COMMON, "--max-steps", 10, "--out", out, "--resume")
        one_line_error(res, f"in use by another run (pid {p.pid} on")
        res = run_cli(*COMMON, "--max-steps", 10, "--out", out, "--overwrite")
        one_line_error(res, "in use by another run")
        assert p.poll() is None                                    # the owner runs on, untouched
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    step = load_latest(out / "last.h5")[2]["step"]
    res = run_cli(*COMMON, "--max-steps", step + 3, "--out", out, "--resume")
    assert res.exit_code == 0 and f"taking over the stale lock of pid {p.pid}" in res.output


def test_a_lock_record_of_a_live_run_or_another_host_is_refused_unless_forced(tmp_path):
    """A second mount of the folder, a file system without shared locks, or a .lock deleted
    by hand lets this process take the POSIX lock while another run holds the folder: the
    record then names a live process on this host, or a process on another host. Such a
    lock is refused (--overwrite would delete that run's files); --force-unlock takes it."""
    import socket
    out = tmp_path / "r"
    assert run_cli(*COMMON, "--max-steps", 3, "--out", out).exit_code == 0
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for host, pid, where in ((socket.gethostname(), sleeper.pid, "on this host, where that process is running"),
                                 ("node-elsewhere", 4242, "on another host")):
            (out / ".lock").write_text(json.dumps({"pid": pid, "host": host, "started": "2026-12-06 05:00:00"}))
            res = run_cli(*COMMON, "--max-steps", 3, "--out", out, "--overwrite")
            one_line_error(res, f"its .lock names pid {pid} on {host}", where, "--force-unlock")
            assert (out / "last.h5").exists()                       # nothing was deleted
        res = run_cli(*COMMON, "--max-steps", 3, "--out", out, "--overwrite", "--force-unlock")
        assert res.exit_code == 0 and "--force-unlock: taking over the lock of pid 4242 on node-elsewhere" in res.output
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("kind", ["symlink", "folder"])
def test_a_lock_that_is_not_a_plain_file_is_refused_and_left_alone(tmp_path, kind):
    out, victim = tmp_path / "r", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    if kind == "symlink":
        (out / ".lock").symlink_to(victim)
    else:
        (out / ".lock").mkdir()
    one_line_error(run_cli(*COMMON, "--max-steps", 2, "--out", out), "is not a regular file")
    assert victim.read_text() == "precious" and not (out / "metrics.jsonl").exists()


def test_a_run_whose_lock_is_deleted_stops_before_it_writes_again(tmp_path):
    """A user who deletes a live run's .lock (taking it for stale) lets a second run lock a
    new file: the first run notices at its next write that .lock is no longer the file it
    locked, and stops without writing, naming the cause."""
    out = tmp_path / "r"
    p = _spawn_until_its_first_checkpoint(out)
    try:
        (out / ".lock").unlink()
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 2 and "its .lock was deleted or replaced while this run held it" in err, err
    assert load_latest(out / "last.h5")[2]["step"] % 5 == 0           # its last checkpoint stands


def test_overwrite_starts_again(tmp_path):
    out = tmp_path / "r"
    assert run_cli(*COMMON, "--max-steps", 6, "--out", out).exit_code == 0
    assert run_cli(*COMMON, "--max-steps", 3, "--out", out, "--overwrite").exit_code == 0
    assert [r["step"] for r in records(out) if r["split"] == "test"] == [3]


@pytest.mark.parametrize("bad", ["file", "unwritable"])
def test_unusable_out_is_a_one_line_error(tmp_path, bad):
    target = tmp_path / "f" if bad == "file" else Path("/proc/gait_ref_cannot_be_here")
    if bad == "file":
        target.write_text("x")
    one_line_error(run_cli(*COMMON, "--max-steps", 2, "--out", target), f"--out {target}")


def test_resume_refuses_options_that_change_the_result(tmp_path):
    out = tmp_path / "r"
    assert run_cli(*COMMON, "--max-steps", 6, "--out", out).exit_code == 0
    res = run_cli(*COMMON, "--max-steps", 9, "--out", out, "--resume", "--lr", 1e-3, "--seed", 3)
    one_line_error(res, "--lr 0.0001 -> 0.001", "--seed 0 -> 3", "--allow-config-change lr,seed")
    # cosmetic options (and more steps) are free
    assert run_cli(*COMMON[:-2], "--log-every", 5, "--max-steps", 9, "--out", out, "--resume").exit_code == 0
    res = run_cli(*COMMON, "--max-steps", 12, "--out", out, "--resume", "--lr", 1e-3, "--allow-config-change", "lr")
    assert res.exit_code == 0, res.output
    change = [r for r in records(out) if r["split"] == "config_change"]
    assert change == [{"epoch": 0, "step": 9, "split": "config_change", "changes": {"lr": [1e-4, 1e-3]}}]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["lr"] == 1e-3 and cfg["history"] == [{"step": 9, "changes": {"lr": [1e-4, 1e-3]}}]
    assert cfg["blas"] and all("num_threads" in b for b in cfg["blas"])


def test_more_epochs_are_free_unless_the_schedule_depends_on_them(tmp_path):
    out = tmp_path / "r"
    base = ["--task", "synthetic", "--rule", "bp", "--batch-size", 500, "--out", out]
    assert run_cli(*base, "--epochs", 1).exit_code == 0
    assert run_cli(*base, "--epochs", 2, "--resume").exit_code == 0
    out2 = tmp_path / "c"
    base[-1] = out2
    assert run_cli(*base, "--epochs", 1, "--optimizer", "sgd", "--lr-schedule", "cosine").exit_code == 0
    res = run_cli(*base, "--epochs", 2, "--optimizer", "sgd", "--lr-schedule", "cosine", "--resume")
    one_line_error(res, "--epochs 1 -> 2")


# ---- data ----------------------------------------------------------------------------------------------
def test_a_corrupt_val_shard_stops_the_run_before_its_first_step(tmp_path):
    make_shards(tmp_path / "d", n_train=32, n_val=16, size=8, per_shard=8)
    p = tmp_path / "d" / "val-00001.h5"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 1
    p.write_bytes(bytes(raw))
    out = tmp_path / "r"
    res = run_cli("--task", "imagenet", "--data", tmp_path / "d", "--arch", "mlp-64x1", "--rule", "bp",
                  "--batch-size", 8, "--out", out)
    one_line_error(res, "val-00001.h5: checksum mismatch")
    assert not (out / "metrics.jsonl").exists() or records(out) == []


def test_a_shard_changed_during_the_run_stops_it_at_the_next_epoch(tmp_path):
    """A shard overwritten with random bytes (same size) while the run has it open was read
    as it then was, and the run ended with status 0; now every epoch checks every verified
    shard's size, modification time and inode, and the run stops naming the shard."""
    make_shards(tmp_path / "d", n_train=32, n_val=16, size=8, per_shard=8)
    shard = tmp_path / "d" / "train-00001.h5"
    t = Trainer(Config(task="imagenet", data=str(tmp_path / "d"), arch="mlp-64x1", rule="bp", batch_size=8, epochs=3,
                       quiet=True, out=str(tmp_path / "r")))

    def overwrite(step, logged):
        if step == 4:                                              # epoch 0's last step: every shard is open
            shard.write_bytes(np.random.default_rng(0).integers(0, 256, shard.stat().st_size, np.uint8).tobytes())
    with pytest.raises(DataFormatError, match=r"train-00001.h5: modified during the run"):
        t.run(on_step=overwrite)
    assert max(r["epoch"] for r in records(tmp_path / "r")) == 1                   # epoch 1 never trained


def test_the_verification_cache_trusts_size_mtime_and_inode_and_always_rehashes_on_request(tmp_path):
    """What the cache trusts, shown: a shard rewritten in place to the same size with its
    modification time put back passes a cached start; --verify-data always catches it. A
    run without --out caches nothing, so no run trusts another's verification."""
    from gait_ref.data.packaged import cache_dir
    make_shards(tmp_path / "d", n_train=32, n_val=16, size=8, per_shard=8)
    args = ["--task", "imagenet", "--data", tmp_path / "d", "--arch", "mlp-64x1", "--rule", "bp", "--batch-size", 8]
    global_cache = cache_dir() / "shard-verification.json"
    before = global_cache.stat().st_mtime_ns if global_cache.exists() else None
    assert run_cli(*args, "--max-steps", 2).exit_code == 0
    assert (global_cache.stat().st_mtime_ns if global_cache.exists() else None) == before
    out = tmp_path / "r"
    assert run_cli(*args, "--max-steps", 2, "--out", out).exit_code == 0
    shard = tmp_path / "d" / "train-00002.h5"
    st = shard.stat()
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 1
    with open(shard, "r+b") as f:                                  # in place: the same inode
        f.write(bytes(raw))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_cli(*args, "--max-steps", 3, "--out", out, "--resume").exit_code == 0        # trusted, as documented
    res = run_cli(*args, "--max-steps", 4, "--out", out, "--resume", "--verify-data", "always")
    one_line_error(res, "train-00002.h5: checksum mismatch")


def test_resuming_on_other_data_is_a_change_of_the_result_but_a_moved_folder_is_not(tmp_path):
    """The checkpoint records the data's digest: --resume --data OTHER (same image shape)
    continued silently on another data set; now it is refused like a changed option. The
    same data in another folder resumes."""
    import shutil
    make_shards(tmp_path / "a", n_train=32, n_val=16, size=8, per_shard=8, seed=0)
    make_shards(tmp_path / "b", n_train=32, n_val=16, size=8, per_shard=8, seed=1)
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    args = ["--task", "imagenet", "--arch", "mlp-64x1", "--rule", "bp", "--batch-size", 8, "--out", tmp_path / "r"]
    assert run_cli(*args, "--data", tmp_path / "a", "--max-steps", 2).exit_code == 0
    res = run_cli(*args, "--data", tmp_path / "b", "--max-steps", 4, "--resume")
    one_line_error(res, "--data-digest", "--allow-config-change data-digest")
    assert run_cli(*args, "--data", tmp_path / "moved", "--max-steps", 4, "--resume").exit_code == 0


def test_non_finite_square_weights_are_named_not_an_svd_failure(tmp_path):
    """The conditioning check after a failed step ran an SVD of non-finite weights and ended
    with numpy's 'SVD did not converge', naming no step and no layer."""
    from gait_ref.train import DivergenceError
    t = Trainer(Config(task="synthetic", rule="gait", max_steps=1, quiet=True))
    t.net.layers[1].params["W"][0, 0] = np.nan
    with pytest.raises(DivergenceError, match=r"^step 0: the weights of layer fc2 are not finite$"):
        t.check_conditioning()


def test_a_checkpoint_replaced_by_a_folder_falls_back(tmp_path):
    out = tmp_path / "r"
    assert run_cli(*COMMON, "--max-steps", 4, "--checkpoint-every", 2, "--out", out).exit_code == 0
    (out / "last.h5").unlink()
    (out / "last.h5").mkdir()
    res = run_cli(*COMMON, "--max-steps", 6, "--checkpoint-every", 2, "--out", out, "--resume")
    assert res.exit_code == 0 and "resuming from the previous checkpoint last.prev.h5" in res.output, res.output
    assert load_latest(out / "last.h5")[2]["step"] == 6


@pytest.mark.parametrize("text,message", [("lr = \n", "not valid TOML"), ("out = 5\n", "--out must be a folder, got 5"),
                                          ("data = 5\n", "--data must be a folder, got 5")])
def test_malformed_config_files_are_one_line(tmp_path, text, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    res = run_cli("--config", cfg, "--task", "synthetic", "--max-steps", 1)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    cfg.write_bytes(b"\xff\xfe = 1\n")
    res = run_cli("--config", cfg, "--task", "synthetic", "--max-steps", 1)
    assert res.exit_code == 2 and "not UTF-8 text" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("args,message", [
    (["--adam-eps", "1e300"], "--adam-eps 1e+300 is inf in float32"),
    (["--lr", "1e-50"], "--lr 1e-50 is 0.0 in float32"),
    (["--loader-workers", "100000"], "--loader-workers must be in 0..256, got 100000")])
def test_values_a_run_cannot_use_are_refused(args, message):
    one_line_error(run_cli("--task", "synthetic", *args, "--max-steps", 1), message)
    if "float32" in message:                                        # float64 holds them
        assert run_cli("--task", "synthetic", *args, "--dtype", "float64", "--max-steps", 1).exit_code == 0


def test_the_epoch_is_saved_before_it_is_evaluated(tmp_path, monkeypatch):
    """An evaluation that fails (bad val data, a kill) does not lose the epoch: the checkpoint
    is written first, and --resume evaluates, then goes on as an uninterrupted run."""
    args = dict(task="synthetic", rule="bp", batch_size=500, epochs=2, quiet=True)
    Trainer(Config(**args, out=str(tmp_path / "a"))).run()
    calls = []
    real = Trainer.evaluate

    def failing(self):
        calls.append(self.pos.step)
        raise DataFormatError("val shard unreadable")
    monkeypatch.setattr(Trainer, "evaluate", failing)
    with pytest.raises(DataFormatError):
        Trainer(Config(**args, out=str(tmp_path / "b"))).run()
    meta = load_checkpoint(tmp_path / "b" / "last.h5")[2]
    assert calls == [8] and meta["step"] == 8 and meta["pending_eval"]
    monkeypatch.setattr(Trainer, "evaluate", real)
    Trainer(Config(**args, out=str(tmp_path / "b"), resume=True)).run()
    assert strip_timings(records(tmp_path / "a")) == strip_timings(records(tmp_path / "b"))


def _cifar(tmp_path, labels_of=None, payload=None):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = rng.integers(0, 10, 8)
        if labels_of == name:
            y[5] = payload
        write_cifar_batch(d / name, rng.integers(0, 256, (8, 3072)), y)
    return tmp_path


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickles_are_refused_before_they_run_code(tmp_path):
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    root = _cifar(tmp_path)
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(DataFormatError, match=r"data_batch_1: refused to load posix.system"):
        load_cifar10(root)
    from data_prep.downsampled import read_batch
    from data_prep.imagenet_tree import PrepError
    with open(tmp_path / "train_data_batch_1", "wb") as f:
        pickle.dump({"data": np.zeros((1, 12), np.uint8), "labels": [_Evil()]}, f)
    with pytest.raises(PrepError, match=r"train_data_batch_1: refused to load posix.system"):
        read_batch(tmp_path / "train_data_batch_1")
    assert not marker.exists()
    res = run_cli("--task", "cifar10", "--data", root, "--max-steps", 1)
    one_line_error(res, "data_batch_1: refused to load posix.system")
    assert not marker.exists()


class _Phantom:
    """numpy.ndarray(shape, dtype, buffer, offset, strides) called from the pickle: 750,000
    'images' over one byte (zero strides)."""

    def __reduce__(self):
        return np.ndarray, ((250000, 3072), np.dtype(np.uint8), b"\0", 0, (0, 0))


class _Claims:
    """numpy's own recipe (_reconstruct, then the state) with a shape the data does not hold."""

    def __init__(self, shape, raw):
        self.shape, self.raw = shape, raw

    def __reduce__(self):
        return (np.zeros(1).__reduce__()[0], (np.ndarray, (0,), b"b"),                  # numpy's _reconstruct
                (1, self.shape, np.dtype(np.uint8), False, self.raw))


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


def test_crafted_pickles_cannot_make_arrays_larger_than_their_file(tmp_path):
    """The allow-list stops code; these stop memory: an array built over a buffer with zero
    strides (132-byte files trained on 750,000 phantom images), numpy's recipe with a shape
    its data does not fill, one large bytes object replayed through the memo into many
    arrays, and shared references that made the check of the result exponential. Each is a
    one-line DataFormatError naming the file; data_prep's reader refuses them alike."""
    from data_prep.downsampled import read_batch
    from data_prep.imagenet_tree import PrepError
    from gait_ref.data import safe_pickle
    raw = bytes(range(256)) * 400                                    # 100 KiB, pickled once, referenced 50 times
    shared = {}
    for level in range(3):
        shared = {str(i).encode(): shared for i in range(1000)}         # 10^9 paths to one empty dict, 4 deep
    cases = {"phantom": ({b"data": _Phantom(), b"labels": [0]}, "builds an array directly"),
             "claims": ({b"data": _Claims((100000, 3072), b"\1" * 10), b"labels": [0]}, "whose data is 10 bytes"),
             "replayed": ({b"data": [_Claims((1, len(raw)), raw) for _ in range(50)]},
                          "more than the file's remaining"),
             "shared": ({b"data": shared}, None)}
    for name, (obj, message) in cases.items():
        path = _dump(tmp_path / name, obj)
        if message is None:
            assert isinstance(safe_pickle.load(path, encoding="bytes"), dict)     # visited once each: instant
            continue
        assert path.stat().st_size < 200_000
        with pytest.raises(DataFormatError, match=message):
            safe_pickle.load(path, encoding="bytes")
        with pytest.raises(PrepError, match=message):
            read_batch(path)
    (tmp_path / "c").mkdir()
    root = _cifar(tmp_path / "c")
    _dump(root / "cifar-10-batches-py" / "data_batch_2", cases["phantom"][0])
    one_line_error(run_cli("--task", "cifar10", "--data", root, "--max-steps", 1), "data_batch_2: builds an array")


@pytest.mark.parametrize("label,message", [(2 ** 70, "label 1180591620717411303424 at index 5 is outside 0..9"),
                                           (3.7, "label 3.7 at index 5 is not an integer")])
def test_cifar_labels_are_integers_in_range_before_any_conversion(tmp_path, label, message):
    """A float label was truncated silently; 2**70 ended in an OverflowError traceback."""
    root = _cifar(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")                    # our own file: plain pickle is fine
    batch[b"labels"] = [int(v) for v in batch[b"labels"]]
    batch[b"labels"][5] = label
    _dump(path, batch)
    one_line_error(run_cli("--task", "cifar10", "--data", root, "--max-steps", 1), f"data_batch_3: {message}")


@pytest.mark.parametrize("label", [12, -1])
def test_cifar_labels_are_range_checked(tmp_path, label):
    root = _cifar(tmp_path, labels_of="data_batch_3", payload=label)
    with pytest.raises(DataFormatError, match=rf"data_batch_3: label {label} at index 5 is outside 0..9"):
        load_task("cifar10", root)


# ---- options and divergence ---------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--adam-eps", "0"], "--adam-eps must be > 0, got 0.0"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1), got 1.0"),
    (["--optimizer", "sgd", "--momentum", "-0.5"], "--momentum must be in [0, 1), got -0.5"),
    (["--rule", "ldrl", "--feedback-lr", "0.1,0"], "--feedback-lr must be > 0, got 0.0"),
])
def test_numeric_options_are_range_checked(args, message):
    one_line_error(run_cli("--task", "synthetic", *args, "--max-steps", 1), message)


@pytest.mark.parametrize("toml,message", [
    ("epochs = 0", "--epochs must be >= 1, got 0"),
    ("max_steps = 0", "--max-steps must be >= 1, got 0"),
    ("log_every = 0", "--log-every must be >= 1, got 0"),
    ('batch_size = "64"', "--batch-size must be >= 1, got '64'"),
])
def test_config_files_are_checked_like_the_command_line(tmp_path, toml, message):
    f = tmp_path / "c.toml"
    f.write_text(f'task = "synthetic"\n{toml}\n')
    one_line_error(CliRunner().invoke(main, ["--config", str(f)]), message)


def test_divergence_names_the_layer_and_checks_the_weights_after_the_step(tmp_path, monkeypatch):
    # an optimiser step that leaves a weight non-finite although every gradient is finite (an
    # --lr of 1e300 did this in float32 before, where it became inf; such values are now refused)
    from gait_ref.train import DivergenceError
    t = Trainer(Config(task="synthetic", rule="bp", max_steps=5, quiet=True, out=str(tmp_path / "w")))
    step = t.train_step.opt.step

    def overflowing(params, grads):
        step(params, grads)
        params["fc1.W"][0, 0] = np.inf
    monkeypatch.setattr(t.train_step.opt, "step", overflowing)
    with pytest.raises(DivergenceError, match=r"^step 1: the weights fc1.W after the step is not finite$"):
        t.run()
    res = run_cli("--task", "synthetic", "--rule", "bp", "--lr", "1e30", "--adam-eps", "1e-30", "--max-steps", 50,
                  "--checkpoint-every", 1, "--log-every", 1, "--out", tmp_path / "d")
    one_line_error(res, "is not finite", "the last good checkpoint is kept in")
    assert "the output of layer" in res.output or "the update of" in res.output or "the weights" in res.output


# ---- a scheduler's notice ---------------------------------------------------------------------------
def _metrics_lines(out):
    f = Path(out) / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def test_a_scheduler_signal_checkpoints_the_step_and_resume_loses_nothing(tmp_path, signame="SIGTERM"):
    """SIGTERM (Slurm's notice at cancellation, preemption or the time limit; SIGUSR1, from
    ``sbatch --signal``, is the distributed test's) sent to the whole process group, loader workers included, of a run
    that checkpoints only at epochs' ends: it finishes its step, checkpoints it, names it and
    exits with 128 + the signal's number, well inside a 30 s grace period, and its loader
    workers exit with it; --resume then writes exactly the records of a run never stopped."""
    shards = tmp_path / "shards"
    make_shards(shards, n_train=400, n_val=40, size=8, per_shard=50)
    args = ["--task", "imagenet", "--data", shards, "--arch", "conv7", "--rule", "gait", "--batch-size", 8,
            "--epochs", 2, "--log-every", 5, "--angles-every", 7, "--eval-subset", 16, "--loader-workers", 2]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*args, "--out", a).exit_code == 0
    p = _spawn([*args, "--out", b], start_new_session=True)
    try:
        deadline = time.time() + 120
        while _metrics_lines(b) < 3 and time.time() < deadline and p.poll() is None:   # mid-epoch 0
            time.sleep(0.05)
        assert p.poll() is None and _metrics_lines(b) >= 3, "the run made no progress"
        workers = [int(c) for c in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        t = time.time()
        os.killpg(p.pid, getattr(signal, signame))
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert time.time() - t < 30
    assert p.returncode == 128 + getattr(signal, signame), err
    step = load_latest(b / "last.h5")[2]["step"]
    assert 0 < step < 100                     # the signal comes at about step 15 of 50 in epoch 0
    # after a step or, on a machine slow enough to reach the end of the epoch first, during its evaluation
    assert re.search(f"stopped by {signame} (during the evaluation )?after step {step}: the checkpoint of step "
                     f"{step} is in ", err), err
    assert len(workers) >= 2 and all(process_gone(w) for w in workers), workers
    res = run_cli(*args, "--out", b, "--resume")
    assert res.exit_code == 0, res.output
    assert strip_timings(records(a)) == strip_timings(records(b))


def _catches(pid, signum) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (the SigCgt mask of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_a_signal_during_start_up_ends_the_run_with_a_message(tmp_path):
    """SIGTERM while run.py is still importing and loading (with ImageNet in host memory that
    takes minutes): recorded from the first lines of run.py on, it ends the run before its
    first step with a message and status 143, instead of killing it without a word (before,
    the handler came with the training loop)."""
    p = _spawn([*COMMON, "--max-steps", 100000, "--out", tmp_path / "r"])
    try:
        deadline = time.time() + 60
        while not _catches(p.pid, signal.SIGTERM) and time.time() < deadline and p.poll() is None:
            time.sleep(0.005)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM before step 1: nothing was trained" in err, \
        (p.returncode, err)


def test_a_signal_during_shard_verification_stops_it_and_keeps_what_was_verified(tmp_path):
    """A stop signal stops the verification at the next shard (not after the whole data
    set); the shards verified are in the cache, so the next run hashes only the rest."""
    from gait_ref.assembly import load_data, verify_shards
    from gait_ref.distributed import LOCAL
    from gait_ref.stopping import StopRequested
    make_shards(tmp_path / "d", n_train=64, n_val=8, size=4, per_shard=8)
    cfg = Config(task="imagenet", data=str(tmp_path / "d"), arch="mlp-64x1", rule="bp", batch_size=8,
                 out=str(tmp_path / "r")).resolved()
    (tmp_path / "r").mkdir()
    data = load_data(cfg, np)
    with pytest.raises(StopRequested, match=r"stopped by SIGTERM while verifying the data, before the first step: "
                                            r"1 of 8 train shards verified \(kept in the cache\)") as stop:
        verify_shards(cfg, LOCAL, data, stop_requested=lambda: int(signal.SIGTERM))
    assert stop.value.signum == signal.SIGTERM
    cache = json.loads((tmp_path / "r" / "shard_verification.json").read_text())
    assert [len(v) for v in cache.values()] == [1]
    assert data.train_set.verify(tmp_path / "r" / "shard_verification.json") == 7      # only the rest is hashed


def test_a_signal_during_an_evaluation_stops_it_and_resume_evaluates_again(tmp_path):
    """SIGTERM while the end of epoch 0 is being evaluated (an ImageNet evaluation can outlast
    a 30 s grace period): the evaluation stops at its next batch, the run ends with
    StopRequested naming the checkpoint saved before the evaluation, and --resume evaluates
    the epoch again and ends with the records of a run never stopped."""
    from gait_ref.stopping import StopRequested
    cfg = dict(task="synthetic", rule="bp", batch_size=20, epochs=2, log_every=7, quiet=True)
    Trainer(Config(**cfg, out=str(tmp_path / "a"))).run()
    tr = Trainer(Config(**cfg, out=str(tmp_path / "b")))
    evaluations = tr.data.eval_loader.epoch

    def signalled_evaluation(*args, **kw):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        os.kill(os.getpid(), signal.SIGTERM)                      # handled: sets the trainer's flag
        return evaluations(*args, **kw)

    tr.data.eval_loader.epoch = signalled_evaluation
    with pytest.raises(StopRequested, match=r"stopped by SIGTERM during the evaluation after step (\d+): "
                                            r"the checkpoint of step \1 is in .*last.h5; continue with --resume"):
        tr.run()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL      # the handler is put back
    meta = load_latest(tmp_path / "b" / "last.h5")[2]
    assert meta["pending_eval"] and meta["epoch"] == 1 and not any(r["split"] == "test" for r in records(tmp_path / "b"))
    Trainer(Config(**cfg, out=str(tmp_path / "b"), resume=True)).run()
    assert strip_timings(records(tmp_path / "a")) == strip_timings(records(tmp_path / "b"))
