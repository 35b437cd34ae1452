"""The training loop: when to step, record, evaluate, save, stop, and what divergence is.

What a run is made of is built by ``gait_ref.assembly`` from a ``Config``: the data and
loaders, the training step (``gait_ref.step``: network, loss, rule, optimiser), the run
folder (``gait_ref.runfolder``) and the loop's plan. The train metrics accumulate in
``gait_ref.meter``, the ranks agree on a stop in ``gait_ref.stopping``. This module
decides when each happens.

Host-device traffic per training step, on a device backend: one host-to-device copy
(the batch, images and labels packed together) and one device-to-host read (the
previous step's finiteness checks, read after this step's work is queued, so the host
never waits for the step it has just launched). Losses, correct counts and timings
accumulate on the device and are read once per metrics record. Logging steps (a
record, an angle measurement, a conditioning check, a checkpoint, an evaluation) read
more.

Metrics records (``metrics.jsonl``): ``split`` train records every ``--log-every``
steps (fields: ``gait_ref.meter``); ``test`` records at every epoch's end (and at a
``--max-steps`` stop), ``val`` records with ``--val-holdout``.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from .assembly import assemble
from .backend import read_scalars, to_numpy
from .distributed import LOCAL, replicas_differ
from .linalg import InverseFailure
from .meter import TrainMeter
from .orthogonality import orthogonality_report
from .runfolder import Position
from .step import topk_correct
from .stopping import StopFlag, StopRequested, on_stop_signals


class DivergenceError(RuntimeError):
    """Training diverged: a non-finite loss, output, update or weight, or a singular square layer."""


def epoch_lr(epoch: int, lr: float, epochs: int, schedule: str = "constant") -> float:
    """The forward learning rate of ``epoch``: constant, or cosine annealing from ``lr`` to
    1e-5 over ``epochs`` (PyTorch's CosineAnnealingLR with T_max = epochs, as Ernoult et
    al.), set per epoch."""
    if schedule == "constant":
        return lr
    lo = min(1e-5, lr)
    return lo + (lr - lo) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def _progress(total, desc, quiet):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, leave=False,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


class Trainer:
    def __init__(self, cfg, comm=LOCAL):
        run = assemble(cfg, comm)
        self.comm, self.xp, self.plan = comm, run.xp, run.plan
        self.data, self.folder, self.train_step = run.data, run.folder, run.step
        self.description, self.verify_data = run.description, run.verify_data
        self.net, self.rule = run.step.net, run.step.rule
        self.pos = Position()
        self.meter = TrainMeter(self.xp)
        self.stop = StopFlag(comm)
        self.stopped_early = False
        self.saved_once = False
        self._evaluating = False          # for the out-of-memory message
        self.wall_before, self.t_start = 0.0, time.perf_counter()  # wall time, across resumes

    def epoch_lr(self, epoch: int) -> float:
        return epoch_lr(epoch, self.plan.lr, self.plan.epochs, self.plan.lr_schedule)

    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    def log(self, record: dict) -> None:
        self.folder.log(record)

    # ---- save and resume ------------------------------------------------------------------------------
    def save(self):
        """Checkpoint (rank 0 writes, after checking that every rank's replica is identical)."""
        if self.folder.checkpoint is None:
            return
        if self.comm.size > 1:
            differ = replicas_differ(self.comm, self.train_step.parameters().values())
            if differ:
                raise RuntimeError(f"step {self.pos.step}: the weights of rank(s) {differ} differ from rank 0's "
                                   "(the all-reduce gave the ranks different sums)")
        meta = {**self.pos.meta(), "acc": self.meter.state(), "wall_time_s": self.wall_time()}
        self.folder.save(*self.train_step.state(), meta)
        self.saved_once = True

    def _resume(self):
        _, changes = self.folder.resume(self._restore)
        self.saved_once = True
        return changes

    def _restore(self, params, state, meta) -> None:
        """Apply a checkpoint: what the step trains, where the run is, the train metrics."""
        self.train_step.load(params, state, self.xp)
        self.pos = Position.from_meta(meta)
        self.meter.load(meta["acc"])
        self.wall_before = meta["wall_time_s"]

    # ---- checks ---------------------------------------------------------------------------------------
    def check_conditioning(self):
        if not self.plan.invertible:
            return {}
        rep = orthogonality_report(self.net)
        for name, r in rep.items():
            if not r.get("finite", True):
                raise DivergenceError(f"step {self.pos.step}: the weights of layer {name} are not finite")
            if not r["cond"] < self.plan.cond_max:
                raise DivergenceError(f"step {self.pos.step}: layer {name} is (nearly) singular, condition number "
                                      f"{r['cond']:.3g} > {self.plan.cond_max:g}")
        return rep

    def _check(self, step_no: int, result) -> None:
        """Read a step's finiteness checks; DivergenceError naming the first that failed."""
        if result is None:
            return
        with self.comm.waiting(f"step {step_no}'s all-reduce"):   # with NCCL, the host waits here
            flags = to_numpy(result.checks)
        failed = result.first_failure(flags)
        if failed:
            self.check_conditioning()          # a singular square layer is the usual cause: name it
            raise DivergenceError(f"step {step_no}: {failed}")

    # ---- evaluation and early stopping ------------------------------------------------------------------
    def evaluate(self, loader=None):
        """Mean per-sample loss, top-1 (and top-5 with more than 5 classes) on the test set
        (or ``loader``'s set)."""
        xp, net, loss_fn = self.xp, self.net, self.train_step.loss
        loader = self.data.eval_loader if loader is None else loader
        self._evaluating = True
        k5 = self.data.n_classes > 5
        sums = [xp.zeros((), dtype=xp.float64) for _ in range(3)]
        widths = net.read_widths(top=getattr(loss_fn, "n_classes", None))   # what the loss reads
        for _, x, y in loader.epoch(0):
            if self.stop.agree():        # run() saved a checkpoint before every evaluation
                self._stop(saved=True)
            out = net.forward(x, widths).output
            l, _ = loss_fn.value_and_grad(out, y, n_total=1)     # 'mean' over 1 row: the sum over rows
            logits = loss_fn.logits(out)
            sums[0] = sums[0] + l.astype(xp.float64)
            sums[1] = sums[1] + topk_correct(logits, y, 1)
            if k5:
                sums[2] = sums[2] + topk_correct(logits, y, 5)
        loss, top1, top5 = read_scalars(self.comm.allreduce_sum(sums))
        self._evaluating = False
        n = len(loader.data)
        rec = {"loss": loss / n, "top1": top1 / n}
        if k5:
            rec["top5"] = top5 / n
        return rec

    def _log_eval(self, last_train):
        pos, plan = self.pos, self.plan
        if self.data.val_loader is not None:
            val = {"epoch": pos.epoch, "step": pos.step, "split": "val", **self.evaluate(self.data.val_loader)}
            self.log(val)
            if val["top1"] > pos.best_val["top1"]:
                pos.best_val = {"top1": val["top1"], "epoch": pos.epoch}
            elif plan.patience and pos.epoch - pos.best_val["epoch"] >= plan.patience:
                self.stopped_early = True
        rec = {"epoch": pos.epoch, "step": pos.step, "split": "test", **self.evaluate(),
               "wall_time_s": self.wall_time()}
        rep = self.check_conditioning()
        if rep:
            rec["ortho_error"] = {k: v["ortho_error"] for k, v in rep.items()}
        self.log(rec)
        if self.stopped_early:
            self.log({"epoch": pos.epoch, "step": pos.step, "split": "early_stop",
                      "best_val_epoch": pos.best_val["epoch"], "best_val_top1": pos.best_val["top1"]})
        pos.pending_eval = False
        if not plan.quiet and self.comm.is_root:
            tr = f"train loss {last_train['loss']:.4g} top1 {last_train['top1']:.4f} | " if last_train else ""
            t5 = f" top5 {rec['top5']:.4f}" if "top5" in rec else ""
            print(f"epoch {pos.epoch} step {pos.step} | {tr}test loss {rec['loss']:.4g} top1 {rec['top1']:.4f}{t5}",
                  flush=True)

    def _flush_train(self, extra=None):
        """Write the train record of the steps since the last one (None if there were none)."""
        rec = self.meter.record()
        if rec is None:
            return None
        rec = {"epoch": self.pos.epoch, "step": self.pos.step, "split": "train", **rec, **(extra or {})}
        self.log(rec)
        return rec

    def _out_of_memory(self, e) -> str:
        """Where memory ran out, what the device holds and the option to lower."""
        plan = self.plan
        what = (f"while evaluating after step {self.pos.step} (batches of {self.data.eval_loader.batch_size} images): "
                "lower --eval-batch-size" if self._evaluating else
                f"in training step {self.pos.step} (a batch of {plan.batch_size} images): lower --batch-size, or use "
                "--distributed mpi to spread it over more devices")
        held = ""
        if self.xp is not np:
            free, total = self.xp.cuda.Device().mem_info
            held = f"; the device has {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
        return f"out of memory {what}{held} ({type(e).__name__}: {' '.join(str(e).split())[:160]})"

    # ---- stopping on a signal -----------------------------------------------------------------------------
    def _stop(self, saved: bool = False):
        """Checkpoint the completed step (unless ``saved``: an evaluation, which run() starts
        only after a checkpoint of the same step) and end the run with ``StopRequested``.
        Nothing is logged or evaluated here: the checkpoint holds the train metrics
        accumulated so far, and ``--resume`` writes the records an uninterrupted run would
        have written, evaluating again where the evaluation was stopped."""
        if not saved:
            self.save()
        when = "during the evaluation after" if saved else "after"
        kept = self.folder.checkpoint
        where = f"the checkpoint of step {self.pos.step} is in {kept}; continue with --resume" if kept else \
            "nothing saved (no --out)"
        raise StopRequested(f"stopped by {self.stop.name} {when} step {self.pos.step}: {where}", self.stop.agreed)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self, on_step=None):
        """Train. ``on_step(step, logged)`` is called after every step (tests and benchmarks
        count device traffic with it); ``logged`` says the step logged, measured or saved."""
        self.folder.acquire()
        try:
            with on_stop_signals(self.stop.request):
                return self._run(on_step)
        except MemoryError as e:          # CuPy's OutOfMemoryError is one
            raise RuntimeError(self._out_of_memory(e)) from None
        finally:
            self.folder.release()
            self.data.close()

    def _run(self, on_step):
        plan, changes = self.plan, None
        if plan.resume:
            changes = self._resume()
        else:
            self.folder.start_fresh(plan.overwrite)
        pos = self.pos                      # (a resume replaced it)
        self.folder.write_config(self.description, changes, pos.step)
        self.verify_data(lambda: self.stop.requested)   # before any reader starts or data is loaded into memory
        max_steps = plan.max_steps or math.inf
        per_epoch = self.data.train_loader.batches_per_epoch()
        if not plan.quiet and self.comm.is_root:
            print(plan.banner, flush=True)
        if self.stop.agree():               # a signal during start-up (data loading, imports: run.py records it)
            where = f"the checkpoint of step {pos.step} stands" if plan.resume else "nothing was trained"
            raise StopRequested(f"stopped by {self.stop.name} before step {pos.step + 1}: {where}", self.stop.agreed)
        try:
            if pos.pending_eval:                                   # resumed between a save and its evaluation
                self._log_eval(None)
            last = None
            while pos.epoch < plan.epochs and pos.step < max_steps and not self.stopped_early:
                last = self._run_epoch(max_steps, on_step)
                if self.stop.agreed:
                    self._stop()
                if pos.batch >= per_epoch:   # the epoch finished
                    last = self._flush_train() or last
                    pos.epoch, pos.batch = pos.epoch + 1, 0
                    pos.pending_eval = True
                    self.save()                                    # before evaluating: a bad eval loses nothing
                    self._log_eval(last)
                    if on_step is not None:                        # the epoch's last step, its records done
                        on_step(pos.step, True)
            if pos.batch:  # stopped mid-epoch by --max-steps
                # checkpoint first: a resumed run drops the end-of-run records below and goes
                # on exactly as an uninterrupted run would
                self.save()
                last = self._flush_train() or last
                self._log_eval(last)
        except (DivergenceError, np.linalg.LinAlgError, InverseFailure) as e:
            msg = str(e) if isinstance(e, DivergenceError) else f"step {pos.step}: {e}"
            if not isinstance(e, DivergenceError):       # the condition number, if it says more
                try:
                    self.check_conditioning()
                except DivergenceError as d:
                    msg = str(d)
            kept = self.folder.checkpoint
            if kept is not None and self.saved_once and kept.exists():
                msg += f"; the last good checkpoint is kept in {kept}"
            raise DivergenceError(msg) from None
        return self

    def _run_epoch(self, max_steps, on_step):
        plan, pos, meter = self.plan, self.pos, self.meter
        self.train_step.opt.lr = self.epoch_lr(pos.epoch)
        per_epoch = self.data.train_loader.batches_per_epoch()
        last, pending = None, None
        shares = np.array_split(np.arange(plan.batch_size), self.comm.size)
        start = int(shares[self.comm.rank][0]) if len(shares[self.comm.rank]) else 0
        bar = _progress((per_epoch - pos.batch) * plan.batch_size, f"epoch {pos.epoch}",
                        plan.quiet or not self.comm.is_root)
        batches = self.data.train_loader.epoch(pos.epoch, pos.batch)
        try:
            while True:
                t_wait = time.perf_counter()
                item = next(batches, None)
                if item is None:
                    break
                b, x, y = item
                wait = time.perf_counter() - t_wait
                pos.step += 1
                measure = bool(plan.angles_every) and (pos.step - 1) % plan.angles_every == 0
                meter.timer.start()
                res = self.train_step(x, y, step=pos.step, epoch=pos.epoch, n_total=plan.batch_size, start=start,
                                      measure=measure)
                meter.timer.stop()
                self._check(pos.step - 1, pending)            # the previous step's checks: it is done by now
                self.comm.heartbeat(pos.step)
                pending = res
                pos.batch = b + 1
                meter.add(res, wait)
                bar.update(res.n)
                cond = plan.invertible and plan.cond_every and pos.step % plan.cond_every == 0
                record = bool(res.measured) or pos.step % plan.log_every == 0
                save = bool(plan.checkpoint_every) and pos.step % plan.checkpoint_every == 0
                end = pos.step >= max_steps or pos.batch >= per_epoch
                stop = self.stop.agree()                       # a signal on any rank stops every rank
                reads = bool(cond or record or save or end or stop)
                if reads:                                      # the host reads: check this step first
                    self._check(pos.step, pending)
                    pending = None
                if cond:
                    self.check_conditioning()
                if record:
                    last = self._flush_train(dict(res.measured))
                    if not plan.quiet and last:
                        bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
                if save:
                    self.save()
                if on_step is not None and pos.batch < per_epoch:
                    on_step(pos.step, reads)
                if pos.step >= max_steps or stop:
                    break
            self._check(pos.step, pending)
        finally:
            batches.close()
            bar.close()
        return last
