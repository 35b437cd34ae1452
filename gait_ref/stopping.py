"""Stopping on a scheduler's notice: checkpoint at the next step boundary, then exit.

A cluster ends jobs with a signal and a grace period: Slurm sends SIGTERM when a job is
cancelled, preempted or reaches its time limit, and SIGKILL ``KillWait`` seconds later
(30 s by default); ``sbatch --signal=USR1@120`` sends SIGUSR1 two minutes before the limit.
On either signal the trainer finishes the step in progress, checks it, writes a
checkpoint and ends with ``StopRequested`` (an evaluation stops at its next batch: the
trainer checkpoints before every evaluation, and a resume evaluates again); ``run.py`` then exits with status
128 + signal number (143 for SIGTERM), and ``--resume`` goes on exactly as if
nothing had happened. Without this, a job resumes from its last periodic checkpoint
(by default the last epoch's end).

With several processes, every rank must stop after the same step (the checkpoint is a
collective): the trainer takes the largest of the ranks' flags after every step (one host
all-reduce of one number), so a signal that reaches one rank stops them all.

Loader worker processes ignore these signals (and SIGINT): the main process closes them.

``install()`` (first thing in ``run.py``) and ``recording()`` (around its ``main``) record a
signal that arrives before the trainer's loop, during imports, data loading or shard
verification, instead of letting it kill the process without a word: the verification
stops between shards (keeping what it verified in its cache) and the run ends with
``StopRequested`` before its first step.
"""
from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
_received = {"signum": 0}          # the last stop signal this process received (0: none)


def _record(signum, frame=None) -> None:
    _received["signum"] = signum


def received() -> int:
    """The stop signal this process has received (0: none), recorded by ``install`` or a
    trainer's handler."""
    return _received["signum"]


def install() -> dict:
    """From now on, record SIGTERM and SIGUSR1 (``received``) instead of dying on them;
    returns the handlers they had. Handlers can only be set from the main thread; elsewhere
    this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {getattr(signal, name): signal.signal(getattr(signal, name), _record) for name in STOP_SIGNALS}


@contextlib.contextmanager
def recording():
    """``install()`` while the context is open; then the earlier handlers are put back and
    the record is cleared."""
    previous = install()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received["signum"] = 0


class StopFlag:
    """A stop requested by a signal on this rank (``request``, the signal handler) and the
    ranks' agreement on it (``agree``, once per step: every rank gets the same answer)."""

    def __init__(self, comm):
        self.comm = comm
        self.requested = received()  # the signal this rank received (0: none), before this flag too
        self.agreed = 0              # the signal every rank agreed to stop on (0: none yet)

    def request(self, signum: int) -> None:
        self.requested = signum

    def agree(self) -> bool:
        """Whether any rank has been signalled to stop. The local flag is only read here: a
        signal handled while the ranks agree (the handler runs when the all-reduce returns)
        must not be overwritten by their answer, and counts at the next agreement."""
        agreed = self.comm.max_int(self.requested)
        if agreed:
            self.agreed = agreed
        return bool(agreed)

    @property
    def name(self) -> str:
        return signal.Signals(self.agreed).name


class StopRequested(Exception):
    """Training stopped on a signal after a completed step (checkpointed when it has a run
    folder). ``signum`` is the signal's number: the process's exit status is 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def on_stop_signals(callback):
    """Call ``callback(signum)`` on SIGTERM or SIGUSR1 while the context is open (the
    previous handlers are put back after, and the record of a signal received before is
    cleared: this context has taken it). Signal handlers can only be set from the main
    thread; elsewhere (a trainer run from a worker thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for name in STOP_SIGNALS:
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, lambda signum, frame: callback(signum))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received["signum"] = 0
