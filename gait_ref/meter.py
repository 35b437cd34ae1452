"""The train metrics between two records, kept on the device.

``add`` folds a step's results in without reading anything back (the sums stay device
scalars); ``record`` reads them once, returns the train record's fields and starts
again; ``state`` and ``load`` carry the sums through a checkpoint (the ``acc`` entry of
its meta), so a resumed run writes the records an uninterrupted one would.

Record fields (``metrics.jsonl``, split ``train``): ``loss`` (mean per-sample), ``top1``,
``step_time_s`` (device time of a step), ``data_wait_s`` (host time a step waited for its
batch), ``images_per_s`` (global images per second of wall time, waiting included) and,
for learned-feedback rules, ``feedback_loss`` per layer from the latest step that had one.
"""
from __future__ import annotations

import time

import numpy as np

from .backend import StepTimer, read_scalars, to_device

# the record fields that are timings: they differ between two runs of the same computation
TIMING_FIELDS = ("step_time_s", "data_wait_s", "images_per_s", "wall_time_s")


class TrainMeter:
    def __init__(self, xp):
        self.xp = xp
        self.timer = StepTimer(xp)          # started and stopped by the loop around each step
        self.feedback_loss = {}             # {layer: 0-d device array}: the latest step's
        self._start()

    def _start(self, loss=None, correct=None, n=0, steps=0, data_wait=0.0, time_s=0.0, wall_s=0.0):
        self.loss, self.correct = loss, correct         # device sums (float64), None before the first step
        self.n, self.steps, self.data_wait = n, steps, data_wait
        self.time_s, self.wall_s = time_s, wall_s       # carried over from a checkpoint
        self.t0 = time.perf_counter()

    def add(self, res, data_wait: float) -> None:
        """Fold in one step's ``StepResult`` (its sums stay on the device: nothing is read)."""
        self.loss = res.loss_sum.astype(np.float64) if self.loss is None else self.loss + res.loss_sum
        self.correct = res.correct.astype(np.float64) if self.correct is None else self.correct + res.correct
        self.n += res.n
        self.steps += 1
        self.data_wait += data_wait
        if res.feedback_loss:
            self.feedback_loss = res.feedback_loss

    def _sums(self) -> list:
        return [0.0 if self.loss is None else self.loss, 0.0 if self.correct is None else self.correct]

    def _totals(self, loss: float, correct: float) -> dict:
        """The checkpoint's ``acc``: the sums as numbers, the timer read (and folded in)."""
        self.time_s += self.timer.total_s()
        self.wall_s += time.perf_counter() - self.t0
        self.t0 = time.perf_counter()
        return {"loss": loss, "correct": correct, "n": self.n, "steps": self.steps, "data_wait": self.data_wait,
                "time": self.time_s, "wall": self.wall_s}

    def record(self) -> dict | None:
        """The train record's fields since the last record (one read of the device), or None
        when no step was added; then starts again."""
        if not self.steps:
            return None
        names = list(self.feedback_loss)
        loss, correct, *fb = read_scalars(self._sums() + [self.feedback_loss[k] for k in names])
        a = self._totals(loss, correct)
        rec = {"loss": a["loss"] / a["n"], "top1": a["correct"] / a["n"], "step_time_s": a["time"] / a["steps"],
               "data_wait_s": a["data_wait"] / a["steps"], "images_per_s": a["n"] / max(a["wall"], 1e-12)}
        if names:
            rec["feedback_loss"] = dict(zip(names, fb))
        self._start()
        return rec

    def state(self) -> dict:
        """The sums as plain numbers (one read), for a checkpoint; the meter goes on."""
        return self._totals(*read_scalars(self._sums()))

    def load(self, acc: dict) -> None:
        """Continue from a checkpoint's ``state()``."""
        scalar = lambda v: to_device(np.asarray(v, np.float64), self.xp)      # noqa: E731
        self._start(scalar(acc["loss"]), scalar(acc["correct"]), acc["n"], acc["steps"], acc.get("data_wait", 0.0),
                    acc["time"], acc.get("wall", acc["time"]))
