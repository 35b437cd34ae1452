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
"""
from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopFlag:
    """A stop requested by a signal on this rank (``request``, the signal handler) and the
    ranks' agreement on it (``agree``, once per step: every rank gets the same answer)."""

    def __init__(self, comm):
        self.comm = comm
        self.requested = 0           # the signal this rank received (0: none)
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
    previous handlers are put back after). Signal handlers can only be set from the main
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
