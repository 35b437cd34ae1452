"""The run folder (``--out DIR``): one owner at a time, nothing of a previous run lost.

    .lock              held (a POSIX lock on the open file) by the one process writing
                       here; holds its pid, host and start time. The kernel releases it
                       when the process dies, so a stale lock is taken over, with a message.
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
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from .checkpoint import load_latest, prev_path, save_checkpoint
from .config import allowed_changes, config_changes

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

CHECKPOINT = "last.h5"
RUN_FILES = ("metrics.jsonl", CHECKPOINT, "last.prev.h5", "last.h5.tmp", "config.json")   # a fresh run deletes these


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (in use, holds a run, changed options...)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    def __init__(self, path, quiet: bool = False):
        self.path = Path(path)
        self.quiet = quiet
        self._lock_fd = None
        self.metrics_lines = 0

    # ---- ownership ------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Create the folder and take its lock, or raise RunFolderError naming the owner."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path}: exists and is not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"--out {self.path}: cannot write there ({e.strerror or e})") from None
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
            self._say(f"taking over the stale lock of pid {owner['pid']} on {owner.get('host', '?')} "
                      f"(started {owner.get('started', '?')}; it is no longer running)")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        self._lock_fd = fd

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
        return self.checkpoint.exists() or prev_path(self.checkpoint).exists()

    def start_fresh(self, overwrite: bool) -> None:
        """A new run here: refuse to replace a checkpoint unless ``overwrite``."""
        if self.has_checkpoint() and not overwrite:
            raise RunFolderError(f"--out {self.path} holds a checkpoint of an earlier run: continue it with --resume, "
                                 "or start again with --overwrite (which deletes it)")
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)

    def load(self, new_config: dict, allow) -> tuple:
        """(params, optimiser state, meta, config changes, file read) of the checkpoint to
        resume from, after the configuration check. Falls back to last.prev.h5 with a warning."""
        if not self.has_checkpoint():
            raise RunFolderError(f"--resume: {self.path} holds no checkpoint (last.h5 or last.prev.h5) to resume from")
        params, state, meta, path = load_latest(self.checkpoint, warn=self._say)
        changes = self.check_config(meta.get("config", {}), new_config, allow)
        return params, state, meta, changes, path

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
        """config.json (atomically), keeping the history of allowed changes."""
        path = self.path / "config.json"
        history = []
        if path.exists():
            try:
                history = json.loads(path.read_text()).get("history", [])
            except (ValueError, OSError):
                history = []
        if changes:
            history.append({"step": step, "changes": changes})
        tmp = path.with_name("config.json.tmp")
        tmp.write_text(json.dumps({**info, "history": history}, indent=1))
        os.replace(tmp, path)

    def truncate_metrics(self, n_lines: int) -> None:
        """Keep the first ``n_lines`` of metrics.jsonl (what the checkpoint covers)."""
        path = self.path / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        tmp = path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(lines[:n_lines]))
        os.replace(tmp, path)
        self.metrics_lines = min(n_lines, len(lines))

    def log(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.metrics_lines += 1

    def save(self, params: dict, state: dict, meta: dict) -> None:
        save_checkpoint(self.checkpoint, params, state, {**meta, "metrics_lines": self.metrics_lines})
