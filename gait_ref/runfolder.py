"""The run folder (``--out DIR``): one owner at a time, nothing of a previous run lost.

    .lock              held (a POSIX lock on the open file) by the one process writing
                       here; holds its pid, host and start time. The kernel releases it
                       when the process dies, so a stale lock is taken over, with a message.
                       A lock that this process can take while its record names a live
                       process on this host or any process on another host is refused
                       (``--force-unlock`` takes it over): the owner's POSIX lock is not
                       visible from here (a second mount, a file system without shared
                       locks, a .lock deleted by hand). The owner checks before each
                       write that .lock is still the file it locked, and stops if not.
    config.json        the resolved configuration, versions, backend, BLAS threads and the
                       network; on a resume with ``--allow-config-change``, a ``history``
                       of what changed at which step
    metrics.jsonl      one JSON record per line (written by the one owner)
    last.h5, last.prev.h5
                       checkpoints (``gait_ref.checkpoint``: checksummed; a complete one
                       exists at every instant)
    shard_verification.json
                       which HDF5 shards were verified, keyed by size and mtime

A run into a folder that holds a checkpoint needs ``--resume`` (continue) or
``--overwrite`` (start again, deleting it). A resume compares the checkpoint's
configuration with the new one: options that change the result are refused, with the
list of differences, unless ``--allow-config-change`` names them.

Every rank holds a ``RunFolder``: rank 0 writes, and on a resume reads and checks the
checkpoint, then tells the other ranks which file to read (or the error, so that every
rank raises it). A run without ``--out`` holds a ``NoRunFolder``, which writes nothing.
``read_records`` reads ``metrics.jsonl`` back; ``Position`` is what a checkpoint's meta
says about where the run is.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint, load_latest, prev_path, save_checkpoint, tmp_path
from .config import allowed_changes, config_changes
from .distributed import LOCAL, process_gone

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

CHECKPOINT = "last.h5"
METRICS = "metrics.jsonl"
RUN_FILES = (METRICS, CHECKPOINT, "last.prev.h5", "last.h5.tmp", "last.h5.corrupt", "config.json")   # a fresh run deletes these


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (in use, holds a run, changed options...)."""


def read_records(run_dir, split: str | None = None) -> list:
    """The records of ``run_dir``'s metrics.jsonl (those of ``split`` only, if given), in
    order; FileNotFoundError naming the file when there is none."""
    with open(Path(run_dir) / METRICS) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return recs if split is None else [r for r in recs if r.get("split") == split]


@dataclass
class Position:
    """Where a run is, as its checkpoint's meta says: steps done, the epoch and the batches
    of it done, whether that epoch's end awaits its evaluation, and early stopping's best
    validation top-1 so far."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    pending_eval: bool = False       # checkpointed at an epoch's end, before its evaluation
    best_val: dict = field(default_factory=lambda: {"top1": -1.0, "epoch": -1})

    @classmethod
    def from_meta(cls, meta: dict) -> "Position":
        return cls(meta["step"], meta["epoch"], meta["batch"], meta.get("pending_eval", False),
                   meta.get("best_val", cls().best_val))

    def meta(self) -> dict:
        return dataclasses.asdict(self)


class NoRunFolder:
    """A run without ``--out``: nothing is written, locked or resumed."""

    checkpoint = None

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def start_fresh(self, overwrite: bool) -> None:
        pass

    def resume(self, restore) -> tuple:
        raise ValueError("--resume needs --out DIR (where the checkpoint is)")

    def write_config(self, info: dict, changes: dict | None = None, step: int = 0) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def save(self, params: dict, state: dict, meta: dict) -> None:
        pass


class RunFolder:
    """The run folder as every rank sees it: rank 0 writes, the others only read a
    checkpoint rank 0 chose. ``config`` is this run's resolved configuration (checked
    against a checkpoint's, and saved in each), ``allow`` its --allow-config-change."""

    def __init__(self, path, comm=LOCAL, config: dict | None = None, allow=None, quiet: bool = False,
                 force_unlock: bool = False):
        self.path = Path(path)
        self.comm, self.writes = comm, comm.is_root
        self.config, self.allow = config or {}, allow
        self.quiet, self.force_unlock = quiet, force_unlock
        self._lock_fd = self._lock_id = None
        self.metrics_lines = 0

    @classmethod
    def open(cls, path, comm=LOCAL, config: dict | None = None, allow=None, quiet: bool = False,
             force_unlock: bool = False):
        """The run folder of ``--out path``, or a ``NoRunFolder`` without one."""
        return NoRunFolder() if not path else cls(path, comm, config, allow, quiet, force_unlock)

    # ---- ownership ------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Create the folder and take its lock, or raise RunFolderError naming the owner
        (rank 0; the other ranks do not write here)."""
        if not self.writes:
            return
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path}: exists and is not a folder")
        lock = self.path / ".lock"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR):
                raise RunFolderError(f"--out {self.path}: {lock} is not a regular file (a link or a folder); the run "
                                     "folder's lock must be a plain file: remove it") from None
            raise RunFolderError(f"--out {self.path}: cannot write there ({e.strerror or e})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise RunFolderError(f"--out {self.path}: {lock} is not a regular file; the run folder's lock must be a "
                                 "plain file: remove it")
        owner = self._read_owner(fd)
        if fcntl is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise RunFolderError(f"--out {self.path}: in use by another run (pid {owner.get('pid', '?')} on "
                                         f"{owner.get('host', '?')}, started {owner.get('started', '?')}); wait for it "
                                         "to finish or choose another folder") from None
                raise RunFolderError(f"--out {self.path}: cannot lock {self.path / '.lock'} ({e.strerror})") from None
        if owner.get("pid") and not (owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()):
            try:
                self._take_over(owner)
            except RunFolderError:
                os.close(fd)
                raise
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        self._lock_fd, self._lock_id = fd, (st.st_dev, st.st_ino)

    def _take_over(self, owner: dict) -> None:
        """Take over the lock record of a run whose POSIX lock this process did not meet: a
        dead process on this host (a stale lock, with a message); a live one, or one on
        another host, only with --force-unlock (RunFolderError otherwise)."""
        holder = f"pid {owner['pid']} on {owner.get('host', '?')} (started {owner.get('started', '?')})"
        elsewhere = owner.get("host") != socket.gethostname()
        try:
            gone = not elsewhere and process_gone(int(owner["pid"]))
        except (TypeError, ValueError):
            gone = False
        if gone:
            self._say(f"taking over the stale lock of {holder}; it is no longer running")
            return
        if not self.force_unlock:
            why = "another host" if elsewhere else "this host, where that process is running"
            raise RunFolderError(f"--out {self.path}: its .lock names {holder}, on {why}, yet its lock was free "
                                 "here: that run's lock is not visible from this process (another mount of the folder, "
                                 "a network file system without shared locks, or a .lock deleted by hand). Wait for "
                                 "that run to end; if it has ended, start again with --force-unlock")
        self._say(f"--force-unlock: taking over the lock of {holder}")

    def check_lock(self) -> None:
        """RunFolderError unless .lock is still the file this process locked: deleted or
        replaced, it no longer keeps another run out, so this run writes nothing more."""
        if self._lock_id is None:
            return
        try:
            st = os.stat(self.path / ".lock", follow_symlinks=False)
            same = (st.st_dev, st.st_ino) == self._lock_id
        except FileNotFoundError:
            same = False
        if not same:
            raise RunFolderError(f"--out {self.path}: its .lock was deleted or replaced while this run held it, so "
                                 "another run may be writing here; this run stops without writing (its last "
                                 "checkpoint stands). Check the folder, then continue with --resume")

    @staticmethod
    def _read_owner(fd) -> dict:
        try:
            raw = os.pread(fd, 4096, 0)
            return json.loads(raw) if raw.strip() else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)               # closing the file drops the lock
            self._lock_fd = None

    def _say(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # ---- starting or resuming -------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def has_checkpoint(self) -> bool:
        return any(p.exists() for p in (self.checkpoint, tmp_path(self.checkpoint), prev_path(self.checkpoint)))

    def start_fresh(self, overwrite: bool) -> None:
        """A new run here: refuse to replace a checkpoint unless ``overwrite``."""
        if self.writes:
            self.check_lock()
            if self.has_checkpoint() and not overwrite:
                raise RunFolderError(f"--out {self.path} holds a checkpoint of an earlier run: continue it with "
                                     "--resume, or start again with --overwrite (which deletes it)")
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        self.comm.barrier()

    def resume(self, restore) -> tuple:
        """Continue from the checkpoint, on every rank: ``restore(params, optimiser state,
        meta)`` applies it to the run. Returns (meta, config changes). Rank 0 takes the
        newest file that verifies, has this run's configuration (or allowed changes) and
        restores (``checkpoint.load_latest``: last.h5, an interrupted save's last.h5.tmp,
        last.prev.h5, with a warning for each passed over); it keeps the metrics lines the
        file covers and records allowed changes, then broadcasts which file it took, or its
        error, which every rank raises."""
        if self.writes:
            try:
                meta, changes, path = self._load(restore)
            except Exception as e:
                self.comm.bcast_object(("error", str(e)))
                raise
            self.comm.bcast_object(("ok", str(path)))
            self.truncate_metrics(meta["metrics_lines"])
            if changes:
                self.log({"epoch": meta["epoch"], "step": meta["step"], "split": "config_change", "changes": changes})
        else:
            status, what = self.comm.bcast_object(None)
            if status == "error":
                raise RunFolderError(what)
            params, state, meta = load_checkpoint(what)
            restore(params, state, meta)
            changes = {}
        self.comm.barrier()
        return meta, changes

    def _load(self, restore) -> tuple:
        if not self.has_checkpoint():
            raise RunFolderError(f"--resume: {self.path} holds no checkpoint (last.h5 or last.prev.h5) to resume from")
        changes = {}

        def accept(params, state, meta):
            changes.clear()
            changes.update(self.check_config(meta.get("config", {}), self.config, self.allow))  # refused: no fallback
            try:
                restore(params, state, meta)
            except (CheckpointError, KeyError, ValueError, TypeError, IndexError) as e:
                raise CheckpointError(f"does not restore into this run ({e})") from None
        params, state, meta, path = load_latest(self.checkpoint, warn=self._say, accept=accept)
        return meta, changes, path

    @staticmethod
    def check_config(old: dict, new: dict, allow) -> dict:
        """The changes between the checkpoint's configuration and this run's that alter the
        result and were allowed; RunFolderError listing those that were not."""
        result, _ = config_changes(old, new)
        allowed = allowed_changes(allow)
        refused = {k: v for k, v in result.items() if k not in allowed}
        if refused:
            listed = "; ".join(f"--{k.replace('_', '-')} {v[0]!r} -> {v[1]!r}" for k, v in refused.items())
            names = ",".join(k.replace("_", "-") for k in refused)
            raise RunFolderError(f"--resume with options that change the result: {listed}. Resume with the "
                                 f"checkpoint's options, or pass --allow-config-change {names} to accept them")
        return result

    # ---- files ------------------------------------------------------------------------------------------------
    def write_config(self, info: dict, changes: dict | None = None, step: int = 0) -> None:
        """config.json (atomically), keeping its history: the allowed changes of options,
        and a resume on another number of processes or BLAS thread counts (which change
        the order of summation, so the run is no longer bit-for-bit an uninterrupted one)."""
        if not self.writes:
            return
        self.check_lock()
        path = self.path / "config.json"
        old = {}
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (ValueError, OSError):
                old = {}
        history = old.get("history", [])
        if changes:
            history.append({"step": step, "changes": changes})
        moved = {}
        if "world_size" in old and old["world_size"] != info.get("world_size"):
            moved["world_size"] = [old["world_size"], info.get("world_size")]
        threads = [[b.get("num_threads") for b in i.get("blas", [])] for i in (old, info)]
        if "blas" in old and threads[0] != threads[1]:
            moved["blas_threads"] = threads
        if moved:
            history.append({"step": step, "resumed_on": moved})
        tmp = path.with_name("config.json.tmp")
        tmp.write_text(json.dumps({**info, "history": history}, indent=1))
        os.replace(tmp, path)

    def truncate_metrics(self, n_lines: int) -> None:
        """Keep the first ``n_lines`` of metrics.jsonl (what the checkpoint covers)."""
        self.check_lock()
        path = self.path / METRICS
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        tmp = path.with_name(METRICS + ".tmp")
        tmp.write_text("".join(lines[:n_lines]))
        os.replace(tmp, path)
        self.metrics_lines = min(n_lines, len(lines))

    def log(self, record: dict) -> None:
        if not self.writes:
            return
        self.check_lock()
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.metrics_lines += 1

    def save(self, params: dict, state: dict, meta: dict) -> None:
        """A checkpoint (rank 0 writes it; every rank waits for it) with this run's
        configuration and the number of metrics lines it covers."""
        if self.writes:
            self.check_lock()
            save_checkpoint(self.checkpoint, params, state,
                            {**meta, "config": self.config, "metrics_lines": self.metrics_lines})
        self.comm.barrier()
