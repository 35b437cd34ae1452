"""The training loop: data, network, rule, optimiser, metrics, checkpoints, resume.

One step: forward pass -> loss and dL/dy_L -> the rule's updates (on BP's scale) ->
(every --angles-every steps) BP's updates on the same forward pass and the angles ->
plus the orthogonality regulariser's gradient -> Adam. Metrics go to
``metrics.jsonl`` (one JSON object per line), checkpoints to ``last.h5``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .architectures import build
from .backend import backend_name, get_backend, synchronize, to_numpy
from .checkpoint import load_checkpoint, restore_params, save_checkpoint
from .config import TARGET_RULES, Config
from .data import BatchLoader, load_task
from .linalg import SingularLayerError
from .losses import make_loss
from .metrics import compare_updates
from .optim import SGD, Adam
from .orthogonality import add_ortho_grads, orthogonality_report
from .rules import make_rule


class DivergenceError(RuntimeError):
    """Training diverged: a non-finite loss or update, or a singular square layer."""


def _progress(total, desc, quiet):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, leave=False,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def topk_correct(logits, labels, k):
    """How many rows have their label among the k largest logits."""
    xp_logits = to_numpy(logits)
    lab = to_numpy(labels)
    top = np.argpartition(-xp_logits, kth=min(k, xp_logits.shape[1]) - 1, axis=1)[:, :k]
    return int((top == lab[:, None]).any(axis=1).sum())


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg = cfg.resolved()
        self.xp = get_backend(cfg.backend)
        if cfg.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype must be float32 or float64, got {cfg.dtype!r}")
        if cfg.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
        self.dtype = np.dtype(cfg.dtype)
        self.data = load_task(cfg.task, cfg.data, quiet=cfg.quiet)
        train, test = self.data.train, self.data.test
        if cfg.train_subset:
            from .data import ArraySet
            idx = np.arange(min(cfg.train_subset, len(train)))
            train = ArraySet(*train.read(idx), self.data.n_classes)
        self.invertible = cfg.rule in TARGET_RULES
        self.train_loader = BatchLoader(train, cfg.batch_size, self.xp, self.dtype, shuffle=True, seed=cfg.seed,
                                        image_size=cfg.image_size)
        self.net = build(cfg.arch, self.train_loader.in_shape, self.data.n_classes, self.invertible,
                         linear=cfg.linear)
        self.net.init(cfg.seed, cfg.init, self.xp, self.dtype)
        self.loss = make_loss(cfg.loss, self.data.n_classes, cfg.reduction)
        dtp = dict(alpha=cfg.dtp_alpha, beta=cfg.ldrl_beta, sigma=cfg.dtp_sigma, inverse_loss=cfg.inverse_loss,
                   feedback_lr=cfg.feedback_lr, ldrl_iters=cfg.ldrl_iters, feedback_form=cfg.feedback_form,
                   reduction=cfg.reduction)
        self.rule = make_rule(cfg.rule, self.net, seed=cfg.seed, gamma=cfg.gamma, form=cfg.target_form,
                              norm=cfg.gamma_norm, sqrt_dim=cfg.gamma_sqrt_dim, feedback_init=cfg.feedback_init,
                              n_classes=self.data.n_classes, dtp_options=dtp)
        self.learned_feedback = hasattr(self.rule, "feedback_step")
        self.bp = make_rule("bp", self.net)
        if cfg.optimizer == "sgd":
            self.opt = SGD(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            if cfg.weight_decay or cfg.momentum:
                raise ValueError("--weight-decay and --momentum apply to --optimizer sgd only")
            self.opt = Adam(lr=cfg.lr, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, eps=cfg.adam_eps,
                            eps_placement=cfg.adam_eps_placement)
        n_eval = len(test) if not cfg.eval_subset else min(cfg.eval_subset, len(test))
        self.eval_set = test if n_eval == len(test) else _Subset(test, n_eval)
        self.eval_loader = BatchLoader(self.eval_set, min(1000, n_eval), self.xp, self.dtype,
                                       shuffle=False, drop_last=False, image_size=cfg.image_size)
        self.rng = np.random.default_rng([cfg.seed, 3])  # for stochastic rules; checkpointed
        self.step, self.epoch, self.batch = 0, 0, 0
        self.out = Path(cfg.out) if cfg.out else None
        self.metrics_lines = 0
        self.acc = _fresh_acc()  # train metrics accumulated since the last train record
        self.wall_before, self.t_start = 0.0, time.perf_counter()  # wall time, across resumes

    # ---- bookkeeping ----------------------------------------------------------------------
    def _meta(self):
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "acc": self.acc,
                "wall_time_s": self.wall_time(),
                "metrics_lines": self.metrics_lines, "rng": self.rng.bit_generator.state,
                "config": self.cfg.to_dict()}

    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    def save(self):
        if self.out:
            state = self.opt.state_dict()
            if self.learned_feedback:
                state.update({f"rule/{k}": v for k, v in self.rule.state_dict().items()})
            save_checkpoint(self.out / "last.h5", self.net.parameters(), state, self._meta())

    def _resume(self):
        params, opt_state, meta = load_checkpoint(self.out / "last.h5")
        restore_params(self.net, params, self.xp)
        self.opt.load_state_dict({k: v for k, v in opt_state.items() if not k.startswith("rule/")}, self.xp)
        if self.learned_feedback:
            self.rule.load_state_dict({k[5:]: v for k, v in opt_state.items() if k.startswith("rule/")}, self.xp)
        self.step, self.epoch, self.batch = meta["step"], meta["epoch"], meta["batch"]
        self.rng.bit_generator.state = meta["rng"]
        self.acc = meta["acc"]
        self.wall_before = meta["wall_time_s"]
        self.metrics_lines = meta["metrics_lines"]
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        tmp = path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(lines[:self.metrics_lines]))
        os.replace(tmp, path)

    def log(self, record: dict):
        if not self.out:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.metrics_lines += 1

    def write_config(self):
        info = {"config": self.cfg.to_dict(), "gait_ref": __version__, "python": platform.python_version(),
                "numpy": np.__version__, "backend": backend_name(self.xp), "data_source": self.data.source,
                "n_classes": self.data.n_classes, "in_shape": list(self.train_loader.in_shape),
                "network": self.net.describe().splitlines()}
        if backend_name(self.xp) == "cupy":
            info["cupy"] = self.xp.__version__
        tmp = self.out / "config.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.out / "config.json")

    # ---- one step ----------------------------------------------------------------------------
    def train_step(self, x, y, measure_angles: bool):
        net, xp = self.net, self.xp
        tr = net.forward(x)
        loss, gy = self.loss.value_and_grad(tr.output, y)
        if not math.isfinite(loss):
            raise DivergenceError(f"step {self.step}: loss is {loss}")
        extra = {}
        train_forward, train_feedback = True, False
        if self.learned_feedback:  # alternating: even epochs train the feedback, odd ones the forward
            alternating = self.cfg.schedule == "alternating"
            train_forward = not alternating or self.epoch % 2 == 1
            train_feedback = not alternating or self.epoch % 2 == 0
            if train_feedback and self.rule.feedback_first:       # L-DRL: feedback first, forward frozen
                extra["feedback_loss"] = self.rule.feedback_step(tr, self.rng)
            # the forward updates are not needed in a feedback-only epoch, unless measured
            grads, info = (self.rule.compute(tr, gy, labels=y) if train_forward or measure_angles
                           else (None, {}))
            if train_feedback and not self.rule.feedback_first:   # DTP/SDTP: targets, then inverses
                extra["feedback_loss"] = self.rule.feedback_step(tr, self.rng)
        else:
            grads, info = self.rule.compute(tr, gy)
        if measure_angles:
            bp_grads, _ = self.bp.compute(tr, gy)
            cmp = compare_updates(net, grads, bp_grads)
            extra["angles_deg"] = {k: v["angle_deg"] for k, v in cmp.items()}
            extra["norm_ratio"] = {k: v["norm_ratio"] for k, v in cmp.items()}
            if "target_distance" in info:
                extra["target_distance"] = {l.name: d for l, d in zip(net.layers, info["target_distance"])}
            if self.learned_feedback:
                extra["jacobian_error"] = self.rule.jacobian_errors(tr)
        elif "feedback_loss" in extra and (self.step % self.cfg.log_every):
            del extra["feedback_loss"]                      # logged with the train records only
        if train_forward:
            add_ortho_grads(net, grads, self.cfg.ortho_lambda, self.cfg.ortho_form)
            flat = {f"{l.name}.{k}": g[k] for l, g in zip(net.layers, grads) for k in g}
            for name, g in flat.items():
                if not bool(xp.isfinite(g).all()):
                    raise DivergenceError(f"step {self.step}: non-finite update for {name}")
            self.opt.step(net.parameters(), flat)
        logits = self.loss.logits(tr.output)
        return loss, topk_correct(logits, y, 1), extra

    def check_conditioning(self):
        if not self.invertible:
            return {}
        rep = orthogonality_report(self.net)
        for name, r in rep.items():
            if not r["cond"] < self.cfg.cond_max:
                raise DivergenceError(f"step {self.step}: layer {name} is (nearly) singular, condition number "
                                      f"{r['cond']:.3g} > {self.cfg.cond_max:g}")
        return rep

    def evaluate(self):
        n, loss, top1, top5 = 0, 0.0, 0, 0
        k5 = self.data.n_classes > 5
        for _, x, y in self.eval_loader.epoch(0):
            out = self.net.forward(x).output
            l, _ = self.loss.value_and_grad(out, y)
            logits = self.loss.logits(out)
            loss += l * (len(y) if self.cfg.reduction == "mean" else 1)
            top1 += topk_correct(logits, y, 1)
            top5 += topk_correct(logits, y, 5) if k5 else 0
            n += len(y)
        rec = {"loss": loss / n, "top1": top1 / n}
        if k5:
            rec["top5"] = top5 / n
        return rec

    # ---- the loop -------------------------------------------------------------------------------
    def run(self):
        cfg = self.cfg
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            if cfg.resume:
                self._resume()
            else:
                for name in ("metrics.jsonl", "last.h5", "last.prev.h5"):
                    (self.out / name).unlink(missing_ok=True)
            self.write_config()
        elif cfg.resume:
            raise ValueError("--resume needs --out DIR (where the checkpoint is)")
        max_steps = cfg.max_steps or math.inf
        per_epoch = self.train_loader.batches_per_epoch()
        if not cfg.quiet:
            print(f"{cfg.task} | {cfg.arch} | {cfg.rule} | {cfg.backend} {cfg.dtype} | "
                  f"{per_epoch} batches of {cfg.batch_size} per epoch | data: {self.data.source}", flush=True)
        last = None
        try:
            while self.epoch < cfg.epochs and self.step < max_steps:
                last = self._run_epoch(max_steps)
                if self.batch >= per_epoch:  # the epoch finished
                    last = self._flush_train() or last
                    self.epoch, self.batch = self.epoch + 1, 0
                    self._log_eval(last)
                    self.save()
        except (SingularLayerError, DivergenceError) as e:
            msg = str(e) if isinstance(e, DivergenceError) else f"step {self.step}: {e}"
            raise DivergenceError(msg + ("; the last good checkpoint is kept in " + str(self.out / "last.h5")
                                         if self.out else "")) from None
        if self.batch:  # stopped mid-epoch by --max-steps
            # checkpoint first: a resumed run drops the end-of-run records below and goes
            # on exactly as an uninterrupted run would
            self.save()
            last = self._flush_train() or last
            self._log_eval(last)
        return self

    def _flush_train(self, extra=None):
        """Write the train metrics accumulated since the last train record."""
        acc = self.acc
        if not acc["steps"]:
            return None
        rec = {"epoch": self.epoch, "step": self.step, "split": "train",
               "loss": acc["loss"] / acc["steps"], "top1": acc["correct"] / acc["n"],
               "step_time_s": acc["time"] / acc["steps"], "images_per_s": acc["n"] / max(acc["time"], 1e-12)}
        rec.update(extra or {})
        self.log(rec)
        self.acc = _fresh_acc()
        return rec

    def _log_eval(self, last_train):
        rec = {"epoch": self.epoch, "step": self.step, "split": "test", **self.evaluate(),
               "wall_time_s": self.wall_time()}
        rep = self.check_conditioning()
        if rep:
            rec["ortho_error"] = {k: v["ortho_error"] for k, v in rep.items()}
        self.log(rec)
        if not self.cfg.quiet:
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

    def _run_epoch(self, max_steps):
        cfg, xp = self.cfg, self.xp
        self.opt.lr = self.epoch_lr(self.epoch)
        acc = self.acc
        last = None
        bar = _progress((self.train_loader.batches_per_epoch() - self.batch) * cfg.batch_size,
                        f"epoch {self.epoch}", cfg.quiet)
        try:
            for b, x, y in self.train_loader.epoch(self.epoch, self.batch):
                self.step += 1
                measure = bool(cfg.angles_every) and (self.step - 1) % cfg.angles_every == 0
                t0 = time.perf_counter()
                loss, correct, extra = self.train_step(x, y, measure)
                synchronize(xp)
                dt = time.perf_counter() - t0
                self.batch = b + 1
                n = len(y)
                sample_loss = loss / (n if cfg.reduction == "sum" else 1)
                acc["loss"] += sample_loss
                acc["correct"] += correct
                acc["n"] += n
                acc["time"] += dt
                acc["steps"] += 1
                bar.update(n)
                bar.set_postfix(loss=f"{sample_loss:.3f}", refresh=False)
                if self.invertible and cfg.cond_every and self.step % cfg.cond_every == 0:
                    self.check_conditioning()
                if extra or self.step % cfg.log_every == 0:
                    last = self._flush_train(extra)
                    acc = self.acc
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                if self.step >= max_steps:
                    break
        finally:
            bar.close()
        return last


def _fresh_acc():
    return {"loss": 0.0, "correct": 0, "n": 0, "time": 0.0, "steps": 0}


class _Subset:
    def __init__(self, data, n):
        self.data, self.n = data, n
        self.in_shape, self.n_classes = data.in_shape, data.n_classes

    def __len__(self):
        return self.n

    def read(self, idx):
        return self.data.read(idx)
