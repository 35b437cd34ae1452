"""The training loop: epochs, logging cadence, evaluation, checkpoints, divergence.

The maths of one step lives in ``gait_ref.step``, the run folder (lock, config,
metrics, checkpoints) in ``gait_ref.runfolder``, the reductions over processes in
``gait_ref.distributed``. This module decides when each happens.

Host-device traffic per training step, on a device backend: one host-to-device copy
(the batch, images and labels packed together) and one device-to-host read (the
previous step's finiteness checks, read after this step's work is queued, so the host
never waits for the step it has just launched). Losses, correct counts and timings
accumulate on the device and are read once per metrics record. Logging steps (a
record, an angle measurement, a conditioning check, a checkpoint, an evaluation) read
more.

Metrics records (``metrics.jsonl``): ``split`` train records every ``--log-every``
steps with the mean per-sample loss, top-1, ``step_time_s`` (device time of a step),
``data_wait_s`` (host time a step waited for its batch) and ``images_per_s`` (global
images per second of wall time, waiting included); ``test`` records at every epoch's
end (and at a ``--max-steps`` stop).
"""
from __future__ import annotations

import math
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .architectures import build
from .backend import StepTimer, backend_name, get_backend, read_scalars, to_device, to_numpy
from .checkpoint import restore_params
from .config import TARGET_RULES, Config
from .data import BatchLoader, load_task
from .distributed import LOCAL
from .hostmem import describe as describe_host_memory
from .hostmem import keep_freed_memory
from .linalg import InverseFailure
from .losses import make_loss
from .optim import SGD, Adam
from .orthogonality import orthogonality_report
from .rules import make_rule
from .runfolder import CHECKPOINT, RunFolder
from .step import TrainStep, topk_correct
from .stopping import StopRequested, on_stop_signals


class DivergenceError(RuntimeError):
    """Training diverged: a non-finite loss, output, update or weight, or a singular square layer."""


def _progress(total, desc, quiet):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, leave=False,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def blas_info() -> list:
    """Which BLAS/LAPACK libraries and thread counts this process runs (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return []
    return [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "architecture", "filepath")}
            for d in threadpool_info()]


class Trainer:
    def __init__(self, cfg: Config, comm=LOCAL):
        keep_freed_memory()                 # each step reuses the last step's host memory (gait_ref.hostmem)
        self.cfg = cfg = cfg.resolved()
        self.comm = comm
        self.xp = comm.bind(get_backend(cfg.backend), run_dir=cfg.out)
        self.dtype = np.dtype(cfg.dtype)
        if not comm.is_root:                 # rank 0 fetches packaged data into the cache first
            comm.barrier(timeout=False)
        self.data = load_task(cfg.task, cfg.data, quiet=cfg.quiet or not comm.is_root)
        if comm.is_root:
            comm.barrier(timeout=False)
        train, test = self.data.train, self.data.test
        self.val_set = None
        if cfg.val_holdout:                 # the last N training images, never trained on
            if cfg.val_holdout >= len(train):
                raise ValueError(f"--val-holdout {cfg.val_holdout} leaves none of the {len(train)} training images")
            self.val_set = _Subset(train, len(train) - cfg.val_holdout, len(train))
            train = _Subset(train, 0, len(train) - cfg.val_holdout)
        if cfg.train_subset:
            from .data import ArraySet
            idx = np.arange(min(cfg.train_subset, len(train)))
            train = ArraySet(*train.read(idx), self.data.n_classes)
        self.train_set = train
        n_eval = len(test) if not cfg.eval_subset else min(cfg.eval_subset, len(test))
        self.eval_set = test if n_eval == len(test) else _Subset(test, 0, n_eval)
        self.out = RunFolder(cfg.out, quiet=cfg.quiet) if cfg.out and comm.is_root else None
        self.invertible = cfg.rule in TARGET_RULES or cfg.square_net
        part = (comm.rank, comm.size)
        self.train_loader = BatchLoader(train, cfg.batch_size, self.xp, self.dtype, shuffle=True, seed=cfg.seed,
                                        image_size=cfg.image_size, workers=cfg.loader_workers,
                                        in_memory=cfg.in_memory, part=part, quiet=cfg.quiet)
        self.eval_loader = BatchLoader(self.eval_set, min(1000, n_eval), self.xp, self.dtype, shuffle=False,
                                       drop_last=False, image_size=cfg.image_size, part=part,
                                       in_memory=cfg.in_memory if cfg.in_memory == "device" else None)
        self.val_loader = None if self.val_set is None else BatchLoader(
            self.val_set, min(1000, len(self.val_set)), self.xp, self.dtype, shuffle=False, drop_last=False,
            image_size=cfg.image_size, part=part)
        self.best_val = {"top1": -1.0, "epoch": -1}      # early stopping (--patience); checkpointed
        self.stopped_early = False
        self.stop_signum = 0                # set by SIGTERM / SIGUSR1 on this rank (gait_ref.stopping)
        self.stop_agreed = 0                # the signal every rank agreed to stop on
        self.net = build(cfg.arch, self.train_loader.in_shape, self.data.n_classes, self.invertible,
                         linear=cfg.linear)
        self.net.init(cfg.seed, cfg.init, self.xp, self.dtype)
        self.loss = make_loss(cfg.loss, self.data.n_classes, cfg.reduction)
        dtp = dict(alpha=cfg.dtp_alpha, beta=cfg.ldrl_beta, sigma=cfg.dtp_sigma, inverse_loss=cfg.inverse_loss,
                   feedback_lr=cfg.feedback_lr, feedback_adam=(cfg.feedback_adam_beta2, cfg.feedback_adam_eps),
                   ldrl_iters=cfg.ldrl_iters, feedback_form=cfg.feedback_form, sdtp_step=cfg.sdtp_step,
                   reduction=cfg.reduction)
        self.rule = make_rule(cfg.rule, self.net, seed=cfg.seed, gamma=cfg.gamma, form=cfg.target_form,
                              norm=cfg.gamma_norm, sqrt_dim=cfg.gamma_sqrt_dim, feedback_init=cfg.feedback_init,
                              n_classes=self.data.n_classes, dtp_options=dtp, inverse_solver=cfg.inverse_solver)
        if cfg.optimizer == "sgd":
            self.opt = SGD(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            if cfg.weight_decay or cfg.momentum:
                raise ValueError("--weight-decay and --momentum apply to --optimizer sgd only")
            self.opt = Adam(lr=cfg.lr, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, eps=cfg.adam_eps,
                            eps_placement=cfg.adam_eps_placement)
        self.step_fn = TrainStep(self.net, self.loss, self.rule, self.opt, ortho_lambda=cfg.ortho_lambda,
                                 ortho_form=cfg.ortho_form, ortho_every=cfg.ortho_every, schedule=cfg.schedule,
                                 seed=cfg.seed, comm=comm, cond_max=cfg.cond_max)
        self.step, self.epoch, self.batch = 0, 0, 0
        self.pending_eval = False          # a checkpoint saved at an epoch's end, before its evaluation
        self.saved_once = False
        self.timer = StepTimer(self.xp)
        self._reset_acc()
        self.wall_before, self.t_start = 0.0, time.perf_counter()  # wall time, across resumes
        self.last_feedback_loss = {}

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def _reset_acc(self):
        """Train metrics since the last train record: device sums, host counts."""
        self.acc = {"loss": None, "correct": None, "n": 0, "steps": 0, "data_wait": 0.0,
                    "t0": time.perf_counter()}

    def _acc_host(self) -> dict:
        """The accumulators as plain numbers (one read), for a record or a checkpoint."""
        a = self.acc
        loss, correct = read_scalars([0.0 if a["loss"] is None else a["loss"],
                                      0.0 if a["correct"] is None else a["correct"]])
        return {"loss": loss, "correct": correct, "n": a["n"], "steps": a["steps"], "data_wait": a["data_wait"],
                "time": self.timer.total_s() + a.get("time", 0.0), "wall": time.perf_counter() - a["t0"]
                + a.get("wall", 0.0)}

    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    def _meta(self):
        acc = self._acc_host()                  # reads the timer's total: keep it in the accumulators
        self.acc.update(time=acc["time"], wall=acc["wall"], t0=time.perf_counter())
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "acc": acc,
                "pending_eval": self.pending_eval, "best_val": self.best_val, "wall_time_s": self.wall_time(),
                "config": self.cfg.to_dict()}

    def _dev_scalar(self, v):
        return to_device(np.asarray(v, np.float64), self.xp)

    def save(self):
        """Checkpoint (rank 0 writes, after checking that every rank's replica is identical)."""
        if not self.cfg.out:
            return
        if self.comm.size > 1:
            self._check_replicas()
        meta = self._meta()
        if self.out is not None:
            state = self.opt.state_dict()
            if hasattr(self.rule, "state_dict"):                  # feedback layers, refinement state
                state.update({f"rule/{k}": v for k, v in self.rule.state_dict().items()})
            self.out.save(self.net.parameters(), state, meta)
        self.saved_once = True
        self.comm.barrier()

    def _check_replicas(self):
        """Every rank holds the same weights (the same summed updates, the same optimiser)."""
        import hashlib
        h = hashlib.sha256()
        for v in self.step_fn.parameters().values():
            h.update(to_numpy(v).tobytes())
        digests = self.comm.allgather_object(h.hexdigest())
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise RuntimeError(f"step {self.step}: the weights of rank(s) {differ} differ from rank 0's "
                               "(the all-reduce gave the ranks different sums)")

    def _resume(self):
        params, opt_state, meta, changes = self._load_checkpoint()
        restore_params(self.net, params, self.xp)
        self.opt.load_state_dict({k: v for k, v in opt_state.items() if not k.startswith("rule/")}, self.xp)
        if hasattr(self.rule, "load_state_dict"):
            self.rule.load_state_dict({k[5:]: v for k, v in opt_state.items() if k.startswith("rule/")}, self.xp)
        self.step, self.epoch, self.batch = meta["step"], meta["epoch"], meta["batch"]
        acc = meta["acc"]
        self.acc = {"loss": self._dev_scalar(acc["loss"]), "correct": self._dev_scalar(acc["correct"]),
                    "n": acc["n"], "steps": acc["steps"], "data_wait": acc.get("data_wait", 0.0),
                    "time": acc["time"], "wall": acc.get("wall", acc["time"]), "t0": time.perf_counter()}
        self.pending_eval = meta.get("pending_eval", False)
        self.best_val = meta.get("best_val", self.best_val)
        self.wall_before = meta["wall_time_s"]
        self.saved_once = True
        if self.out is not None:
            self.out.truncate_metrics(meta["metrics_lines"])
            if changes:
                self.log({"epoch": self.epoch, "step": self.step, "split": "config_change", "changes": changes})
        return changes

    def _load_checkpoint(self):
        """Rank 0 reads and checks the checkpoint; the other ranks read the file it chose."""
        from .checkpoint import load_checkpoint
        from .runfolder import RunFolderError
        if self.comm.is_root:
            try:
                params, state, meta, changes, path = self.out.load(self.cfg.to_dict(), self.cfg.allow_config_change)
            except Exception as e:
                self.comm.bcast_object(("error", str(e)))
                raise
            self.comm.bcast_object(("ok", str(path)))
            return params, state, meta, changes
        status, what = self.comm.bcast_object(None)
        if status == "error":
            raise RunFolderError(what)
        params, state, meta = load_checkpoint(what)
        return params, state, meta, {}

    def log(self, record: dict):
        if self.out is not None:
            self.out.log(record)

    def write_config(self, changes=None):
        if self.out is None:
            return
        xp = self.xp
        info = {"config": self.cfg.to_dict(), "gait_ref": __version__, "python": platform.python_version(),
                "numpy": np.__version__, "backend": backend_name(xp), "data_source": self.data.source,
                "n_classes": self.data.n_classes, "in_shape": list(self.train_loader.in_shape),
                "world_size": self.comm.size, "blas": blas_info(), "host_malloc": describe_host_memory(),
                "network": self.net.describe().splitlines()}
        if backend_name(xp) != "numpy":
            info["cupy"] = xp.__version__
        self.out.write_config(info, changes, self.step)

    # ---- checks ---------------------------------------------------------------------------------------
    def _verify_data(self):
        """Verify every shard this run will read before the first step (cached)."""
        from .data.packaged import cache_dir
        for data in (self.train_set, self.eval_set):                            # (the val set is in train's)
            while hasattr(data, "data") and not hasattr(data, "verify"):        # subsets: the set underneath
                data = data.data
            if hasattr(data, "verify"):
                cache = (Path(self.cfg.out) / "shard_verification.json" if self.cfg.out else
                         cache_dir() / "shard-verification.json")
                if self.comm.is_root:
                    data.verify(cache, quiet=self.cfg.quiet)
                self.comm.barrier(timeout=False)             # hashing a large set takes a while
                if not self.comm.is_root:
                    data.verify(cache, quiet=True)       # reads rank 0's cache: no re-hashing

    def check_conditioning(self):
        if not self.invertible:
            return {}
        rep = orthogonality_report(self.net)
        for name, r in rep.items():
            if not r["cond"] < self.cfg.cond_max:
                raise DivergenceError(f"step {self.step}: layer {name} is (nearly) singular, condition number "
                                      f"{r['cond']:.3g} > {self.cfg.cond_max:g}")
        return rep

    def _check(self, step_no: int, result) -> None:
        """Read a step's finiteness checks; DivergenceError naming the first that failed."""
        if result is None:
            return
        with self.comm.waiting(f"step {step_no}'s all-reduce"):   # with NCCL, the host waits here
            ok = to_numpy(result.checks)
        failed = result.first_failure(ok)
        if failed:
            self._diverged(f"step {step_no}: {failed}")

    def _diverged(self, msg: str):
        self.check_conditioning()          # a singular square layer is the usual cause: name it
        raise DivergenceError(msg)

    def evaluate(self, loader=None):
        """Mean per-sample loss, top-1 (and top-5 with more than 5 classes) on the test set
        (or ``loader``'s set)."""
        xp = self.xp
        loader = self.eval_loader if loader is None else loader
        k5 = self.data.n_classes > 5
        sums = [xp.zeros((), dtype=xp.float64) for _ in range(3)]
        widths = self.net.read_widths(top=getattr(self.loss, "n_classes", None))   # what the loss reads
        for _, x, y in loader.epoch(0):
            if self._agree_on_stop():        # run() saved a checkpoint before every evaluation
                self._stop(saved=True)
            out = self.net.forward(x, widths).output
            l, _ = self.loss.value_and_grad(out, y, n_total=1)     # 'mean' over 1 row: the sum over rows
            logits = self.loss.logits(out)
            sums[0] = sums[0] + l.astype(xp.float64)
            sums[1] = sums[1] + topk_correct(logits, y, 1)
            if k5:
                sums[2] = sums[2] + topk_correct(logits, y, 5)
        loss, top1, top5 = read_scalars(self.comm.allreduce_sum(sums))
        n = len(loader.data)
        rec = {"loss": loss / n, "top1": top1 / n}
        if k5:
            rec["top5"] = top5 / n
        return rec

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self, on_step=None):
        """Train. ``on_step(step, logged)`` is called after every step (tests and benchmarks
        count device traffic with it); ``logged`` says the step logged, measured or saved."""
        if self.out is not None:
            self.out.acquire()
        try:
            with on_stop_signals(self._request_stop):
                return self._run(on_step)
        finally:
            if self.out is not None:
                self.out.release()
            for loader in (self.train_loader, self.eval_loader, self.val_loader):
                if loader is not None:
                    loader.close()

    def _run(self, on_step):
        cfg = self.cfg
        changes = None
        if cfg.resume and not cfg.out:
            raise ValueError("--resume needs --out DIR (where the checkpoint is)")
        if cfg.out:
            if cfg.resume:
                changes = self._resume()
            elif self.out is not None:
                self.out.start_fresh(cfg.overwrite)
            self.comm.barrier()
            self.write_config(changes)
        self._verify_data()                 # before any reader starts or data is loaded into memory
        max_steps = cfg.max_steps or math.inf
        per_epoch = self.train_loader.batches_per_epoch()
        if not cfg.quiet and self.comm.is_root:
            ranks = f" | {self.comm.size} processes" if self.comm.size > 1 else ""
            print(f"{cfg.task} | {cfg.arch} | {cfg.rule} | {cfg.backend} {cfg.dtype} | "
                  f"{per_epoch} batches of {cfg.batch_size} per epoch{ranks} | data: {self.data.source}", flush=True)
        try:
            if self.pending_eval:                                  # resumed between a save and its evaluation
                self._log_eval(None)
            last = None
            while self.epoch < cfg.epochs and self.step < max_steps and not self.stopped_early:
                last = self._run_epoch(max_steps, on_step)
                if self.stop_agreed:
                    self._stop()
                if self.batch >= per_epoch:  # the epoch finished
                    last = self._flush_train() or last
                    self.epoch, self.batch = self.epoch + 1, 0
                    self.pending_eval = True
                    self.save()                                    # before evaluating: a bad eval loses nothing
                    self._log_eval(last)
                    if on_step is not None:                        # the epoch's last step, its records done
                        on_step(self.step, True)
            if self.batch:  # stopped mid-epoch by --max-steps
                # checkpoint first: a resumed run drops the end-of-run records below and goes
                # on exactly as an uninterrupted run would
                self.save()
                last = self._flush_train() or last
                self._log_eval(last)
        except (DivergenceError, np.linalg.LinAlgError, InverseFailure) as e:
            msg = str(e) if isinstance(e, DivergenceError) else f"step {self.step}: {e}"
            if not isinstance(e, DivergenceError):       # the condition number, if it says more
                try:
                    self.check_conditioning()
                except DivergenceError as d:
                    msg = str(d)
            kept = self.out.checkpoint if self.out is not None else None
            if kept is not None and self.saved_once and kept.exists():
                msg += f"; the last good checkpoint is kept in {kept}"
            raise DivergenceError(msg) from None
        return self

    def _request_stop(self, signum: int) -> None:
        """The signal handler (``gait_ref.stopping``): stop after the step in progress."""
        self.stop_signum = signum

    def _agree_on_stop(self) -> bool:
        """Whether any rank has been signalled to stop (every rank gets the same answer). The
        local flag is only read here: a signal handled while the ranks agree (it runs when
        the all-reduce returns) must not be overwritten by their answer, and counts next time."""
        agreed = self.comm.max_int(self.stop_signum)
        if agreed:
            self.stop_agreed = agreed
        return bool(agreed)

    def _stop(self, saved: bool = False):
        """Checkpoint the completed step (unless ``saved``: an evaluation, which run() starts
        only after a checkpoint of the same step) and end the run with ``StopRequested``.
        Nothing is logged or evaluated here: the checkpoint holds the train metrics
        accumulated so far, and ``--resume`` writes the records an uninterrupted run would
        have written, evaluating again where the evaluation was stopped."""
        name = signal.Signals(self.stop_agreed).name
        if not saved:
            self.save()
        when = "during the evaluation after" if saved else "after"
        where = (f"the checkpoint of step {self.step} is in {Path(self.cfg.out) / CHECKPOINT}; continue with --resume"
                 if self.cfg.out else "nothing saved (no --out)")
        raise StopRequested(f"stopped by {name} {when} step {self.step}: {where}", self.stop_agreed)

    def _flush_train(self, extra=None):
        """Write the train metrics accumulated since the last train record."""
        if not self.acc["steps"]:
            return None
        a = self._acc_host()
        rec = {"epoch": self.epoch, "step": self.step, "split": "train", "loss": a["loss"] / a["n"],
               "top1": a["correct"] / a["n"], "step_time_s": a["time"] / a["steps"],
               "data_wait_s": a["data_wait"] / a["steps"], "images_per_s": a["n"] / max(a["wall"], 1e-12)}
        if self.last_feedback_loss:
            names = list(self.last_feedback_loss)
            rec["feedback_loss"] = dict(zip(names, read_scalars(self.last_feedback_loss.values())))
        rec.update(extra or {})
        self.log(rec)
        self._reset_acc()
        return rec

    def _log_eval(self, last_train):
        if self.val_loader is not None:
            val = {"epoch": self.epoch, "step": self.step, "split": "val", **self.evaluate(self.val_loader)}
            self.log(val)
            if val["top1"] > self.best_val["top1"]:
                self.best_val = {"top1": val["top1"], "epoch": self.epoch}
            elif self.cfg.patience and self.epoch - self.best_val["epoch"] >= self.cfg.patience:
                self.stopped_early = True
        rec = {"epoch": self.epoch, "step": self.step, "split": "test", **self.evaluate(),
               "wall_time_s": self.wall_time()}
        rep = self.check_conditioning()
        if rep:
            rec["ortho_error"] = {k: v["ortho_error"] for k, v in rep.items()}
        self.log(rec)
        if self.stopped_early:
            self.log({"epoch": self.epoch, "step": self.step, "split": "early_stop",
                      "best_val_epoch": self.best_val["epoch"], "best_val_top1": self.best_val["top1"]})
        self.pending_eval = False
        if not self.cfg.quiet and self.comm.is_root:
            tr = f"train loss {last_train['loss']:.4g} top1 {last_train['top1']:.4f} | " if last_train else ""
            t5 = f" top5 {rec['top5']:.4f}" if "top5" in rec else ""
            print(f"epoch {self.epoch} step {self.step} | {tr}test loss {rec['loss']:.4g} top1 {rec['top1']:.4f}{t5}",
                  flush=True)

    def epoch_lr(self, epoch: int) -> float:
        """The forward learning rate of ``epoch``: constant, or cosine annealing from lr to
        1e-5 over the run (PyTorch's CosineAnnealingLR, as Ernoult et al.), set per epoch."""
        cfg = self.cfg
        if cfg.lr_schedule == "constant":
            return cfg.lr
        lo = min(1e-5, cfg.lr)
        return lo + (cfg.lr - lo) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2

    def _run_epoch(self, max_steps, on_step):
        cfg = self.cfg
        self.opt.lr = self.epoch_lr(self.epoch)
        last, pending = None, None
        shares = np.array_split(np.arange(cfg.batch_size), self.comm.size)
        start = int(shares[self.comm.rank][0]) if len(shares[self.comm.rank]) else 0
        bar = _progress((self.train_loader.batches_per_epoch() - self.batch) * cfg.batch_size,
                        f"epoch {self.epoch}", cfg.quiet or not self.comm.is_root)
        batches = self.train_loader.epoch(self.epoch, self.batch)
        try:
            while True:
                t_wait = time.perf_counter()
                item = next(batches, None)
                if item is None:
                    break
                b, x, y = item
                self.acc["data_wait"] += time.perf_counter() - t_wait
                self.step += 1
                measure = bool(cfg.angles_every) and (self.step - 1) % cfg.angles_every == 0
                self.timer.start()
                res = self.step_fn(x, y, step=self.step, epoch=self.epoch, n_total=cfg.batch_size, start=start,
                                   measure=measure)
                self.timer.stop()
                self._check(self.step - 1, pending)            # the previous step's checks: it is done by now
                self.comm.heartbeat(self.step)
                pending = res
                self.batch = b + 1
                a = self.acc
                a["loss"] = res.loss_sum.astype(np.float64) if a["loss"] is None else a["loss"] + res.loss_sum
                a["correct"] = res.correct.astype(np.float64) if a["correct"] is None else a["correct"] + res.correct
                a["n"] += res.n
                a["steps"] += 1
                if res.feedback_loss:
                    self.last_feedback_loss = res.feedback_loss
                bar.update(res.n)
                cond = self.invertible and cfg.cond_every and self.step % cfg.cond_every == 0
                log = bool(res.measured) or self.step % cfg.log_every == 0
                save = bool(cfg.checkpoint_every) and self.step % cfg.checkpoint_every == 0
                end = self.step >= max_steps or self.batch >= self.train_loader.batches_per_epoch()
                stop = self._agree_on_stop()                    # a signal on any rank stops every rank
                if cond or log or save or end or stop:           # the host reads: check this step first
                    self._check(self.step, pending)
                    pending = None
                if cond:
                    self.check_conditioning()
                if log:
                    extra = dict(res.measured)
                    last = self._flush_train(extra)
                    if not cfg.quiet and last:
                        bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
                if save:
                    self.save()
                if on_step is not None and self.batch < self.train_loader.batches_per_epoch():
                    on_step(self.step, bool(cond or log or save or end or stop))
                if self.step >= max_steps or stop:
                    break
            self._check(self.step, pending)
        finally:
            batches.close()
            bar.close()
        return last


class _Subset:
    """Images [lo, hi) of a data set."""

    def __init__(self, data, lo, hi):
        self.data, self.lo, self.n = data, int(lo), int(hi) - int(lo)
        self.in_shape, self.n_classes = data.in_shape, data.n_classes

    def __len__(self):
        return self.n

    def read(self, idx):
        return self.data.read(np.asarray(idx) + self.lo)
