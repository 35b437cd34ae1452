"""What a ``Config`` builds: the data and its loaders, the training step (network, loss,
rule, optimiser), the run folder, the loop's plan and the run's description.

``assemble(cfg, comm)`` builds all of it for ``Trainer``; ``build_step`` builds the step
alone for benchmarks and tests, on batches of their own. This module and
``gait_ref.config`` are the only readers of a ``Config``: the loop reads the ``LoopPlan``.
"""
from __future__ import annotations

import hashlib
import platform
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .architectures import build
from .backend import backend_name, blas_info, get_backend
from .config import Config, square_network
from .data import ArraySet, BatchLoader, Subset, load_task
from .data.shards import shards_under
from .distributed import LOCAL, options_that_differ
from .hostmem import describe as describe_host_memory
from .hostmem import keep_freed_memory
from .losses import make_loss
from .optim import SGD, Adam
from .rules import make_rule
from .runfolder import RunFolder
from .step import TrainStep
from .stopping import StopRequested



@dataclass(frozen=True)
class LoopPlan:
    """The options the training loop reads: how long, and when it records, measures,
    checks, saves and stops."""

    epochs: int
    max_steps: int | None
    batch_size: int                # global: every rank's rows together
    lr: float
    lr_schedule: str               # constant, cosine (``train.epoch_lr``)
    log_every: int
    angles_every: int
    checkpoint_every: int
    cond_every: int                # conditioning report of the square layers every N steps (0: never)
    cond_max: float
    invertible: bool               # the network is square (a conditioning report exists)
    patience: int
    resume: bool
    overwrite: bool
    quiet: bool
    banner: str                    # the run's first line of output

    @classmethod
    def of(cls, cfg: Config, source: str, n_batches: int, ranks: int) -> "LoopPlan":
        spread = f" | {ranks} processes" if ranks > 1 else ""
        banner = (f"{cfg.task} | {cfg.arch} | {cfg.rule} | {cfg.backend} {cfg.dtype} | {n_batches} batches of "
                  f"{cfg.batch_size} per epoch{spread} | data: {source}")
        return cls(cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.lr, cfg.lr_schedule, cfg.log_every,
                   cfg.angles_every, cfg.checkpoint_every, cfg.cond_every, cfg.cond_max,
                   square_network(cfg.rule, cfg.square_net), cfg.patience, cfg.resume, cfg.overwrite, cfg.quiet,
                   banner)


@dataclass
class RunData:
    """The sets a run trains, validates and tests on, with their loaders (this rank's rows)."""

    source: str
    n_classes: int
    train_set: object
    eval_set: object
    val_set: object | None
    train_loader: BatchLoader
    eval_loader: BatchLoader
    val_loader: BatchLoader | None

    @property
    def in_shape(self) -> tuple:
        return self.train_loader.in_shape

    def loaders(self) -> list:
        return [ld for ld in (self.train_loader, self.eval_loader, self.val_loader) if ld is not None]

    def close(self) -> None:
        for loader in self.loaders():
            loader.close()


@dataclass
class Run:
    """Everything ``assemble`` builds for one training run."""

    xp: object
    data: RunData
    step: TrainStep
    folder: object                  # RunFolder, or NoRunFolder without --out
    plan: LoopPlan
    description: dict               # config.json (``describe``)
    verify_data: object             # (stop_requested) -> None: every shard checked before the first step


def assemble(cfg: Config, comm=LOCAL) -> Run:
    keep_freed_memory()                 # each step reuses the last step's host memory (gait_ref.hostmem)
    cfg = cfg.resolved()
    xp = comm.bind(get_backend(cfg.backend), run_dir=cfg.out)
    data = load_data(cfg, xp, comm)
    digest = data_digest(data)
    if comm.size > 1:
        check_ranks_agree(cfg, comm, data, digest)
    step = build_step(cfg, data.in_shape, data.n_classes, xp, comm)
    # the checkpoint records the data's digest beside the options: resuming on other data is a
    # change of the result (--allow-config-change data-digest), a moved folder is not
    folder = RunFolder.open(cfg.out, comm, {**cfg.to_dict(), "data_digest": digest},
                            cfg.allow_config_change, cfg.quiet, cfg.force_unlock)
    plan = LoopPlan.of(cfg, data.source, data.train_loader.batches_per_epoch(), comm.size)
    return Run(xp, data, step, folder, plan, describe(cfg, comm, xp, data, step.net),
               lambda stop_requested: verify_shards(cfg, comm, data, stop_requested))


def data_digest(data: RunData) -> str:
    """One SHA-256 of the sets the run trains, validates and tests on (their contents, not
    where they are: a moved folder has the same digest)."""
    sets = [s for s in (data.train_set, data.eval_set, data.val_set) if s is not None]
    return hashlib.sha256(" ".join(s.digest() for s in sets).encode()).hexdigest()


def check_ranks_agree(cfg: Config, comm, data: RunData, digest: str) -> None:
    """RuntimeError naming every option (and the data) that differs between the ranks and
    which ranks hold which value: ranks started with different options would train apart
    silently, or hang where their step counts differ. The output folder and the data's
    path may differ; the data's contents may not."""
    mine = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "data")}
    mine["data"] = f"sha256 {digest[:16]}"
    differ = options_that_differ(comm, mine)
    if differ:
        listed = "; ".join(f"--{k.replace('_', '-')}: " + ", ".join(f"{v} on rank{'s' if len(r) > 1 else ''} "
                                                                    f"{','.join(map(str, r))}" for v, r in held.items())
                           for k, held in differ.items())
        if "data" in differ:                            # where each rank read it (every rank is here)
            listed += " (" + ", ".join(f"rank {r}: {s}" for r, s in enumerate(comm.allgather_object(data.source))) + ")"
        raise RuntimeError(f"the ranks were started with different options or data: {listed}. Start every rank "
                           "with the same command")


def load_data(cfg: Config, xp, comm=LOCAL) -> RunData:
    """The task's sets: training (less a validation hold-out, or a subset), evaluation (the
    test set, or its first --eval-subset images) and validation; their loaders."""
    if not comm.is_root:                 # rank 0 fetches packaged data into the cache first
        comm.barrier(timeout=False)
    task = load_task(cfg.task, cfg.data, quiet=cfg.quiet or not comm.is_root)
    if comm.is_root:
        comm.barrier(timeout=False)
    train, test = task.train, task.test
    val = None
    if cfg.val_holdout:                 # the last N training images, never trained on
        if cfg.val_holdout >= len(train):
            raise ValueError(f"--val-holdout {cfg.val_holdout} leaves none of the {len(train)} training images")
        val = Subset(train, len(train) - cfg.val_holdout, len(train))
        train = Subset(train, 0, len(train) - cfg.val_holdout)
    if cfg.train_subset:
        idx = np.arange(min(cfg.train_subset, len(train)))
        train = ArraySet(*train.read(idx), task.n_classes)
    n_eval = len(test) if not cfg.eval_subset else min(cfg.eval_subset, len(test))
    test = test if n_eval == len(test) else Subset(test, 0, n_eval)
    dtype, part = np.dtype(cfg.dtype), (comm.rank, comm.size)
    train_loader = BatchLoader(train, cfg.batch_size, xp, dtype, shuffle=True, seed=cfg.seed,
                               image_size=cfg.image_size, workers=cfg.loader_workers, in_memory=cfg.in_memory,
                               part=part, quiet=cfg.quiet)
    eval_loader = BatchLoader(test, min(cfg.eval_batch_size, n_eval), xp, dtype, shuffle=False, drop_last=False,
                              image_size=cfg.image_size, part=part,
                              in_memory=cfg.in_memory if cfg.in_memory == "device" else None)
    val_loader = None if val is None else BatchLoader(val, min(cfg.eval_batch_size, len(val)), xp, dtype, shuffle=False,
                                                      drop_last=False, image_size=cfg.image_size, part=part)
    return RunData(task.source, task.n_classes, train, test, val, train_loader, eval_loader, val_loader)


def make_optimizer(cfg: Config):
    if cfg.optimizer == "sgd":
        return SGD(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.weight_decay or cfg.momentum:
        raise ValueError("--weight-decay and --momentum apply to --optimizer sgd only")
    return Adam(lr=cfg.lr, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, eps=cfg.adam_eps,
                eps_placement=cfg.adam_eps_placement)


def build_step(cfg: Config, in_shape, n_classes: int, xp=np, comm=LOCAL) -> TrainStep:
    """The training step ``cfg`` describes for inputs of ``in_shape`` (C, H, W or D) and
    ``n_classes`` classes: the network (square for the target rules or --square-net),
    initialised from the seed, its loss, the rule and the optimiser."""
    cfg = cfg.resolved()
    net = build(cfg.arch, in_shape, n_classes, square_network(cfg.rule, cfg.square_net), linear=cfg.linear)
    net.init(cfg.seed, cfg.init, xp, np.dtype(cfg.dtype))
    loss = make_loss(cfg.loss, n_classes, cfg.reduction)
    dtp = dict(alpha=cfg.dtp_alpha, beta=cfg.ldrl_beta, sigma=cfg.dtp_sigma, inverse_loss=cfg.inverse_loss,
               feedback_lr=cfg.feedback_lr, feedback_adam=(cfg.feedback_adam_beta2, cfg.feedback_adam_eps),
               ldrl_iters=cfg.ldrl_iters, feedback_form=cfg.feedback_form, sdtp_step=cfg.sdtp_step,
               reduction=cfg.reduction, linear_top=cfg.linear_top_inverse)
    rule = make_rule(cfg.rule, net, seed=cfg.seed, gamma=cfg.gamma, form=cfg.target_form, norm=cfg.gamma_norm,
                     sqrt_dim=cfg.gamma_sqrt_dim, feedback_init=cfg.feedback_init, n_classes=n_classes,
                     dtp_options=dtp, inverse_solver=cfg.inverse_solver)
    return TrainStep(net, loss, rule, make_optimizer(cfg), ortho_lambda=cfg.ortho_lambda, ortho_form=cfg.ortho_form,
                     ortho_every=cfg.ortho_every, schedule=cfg.schedule, seed=cfg.seed, comm=comm,
                     cond_max=cfg.cond_max)


def verify_shards(cfg: Config, comm, data: RunData, stop_requested=lambda: 0) -> None:
    """Verify every shard the run will read before the first step. With --out the result is
    cached in the run folder (``--verify-data always``: re-hash every shard, every start);
    without, nothing is cached, so no run trusts another's verification. Rank 0 hashes;
    the others read its cache (or hash too, without one).
    ``stop_requested()`` (a signal number, 0 for none) is asked between shards: a stop
    signal ends the verification at the next shard, keeps what was verified in the cache,
    and ends the run with StopRequested on every rank."""
    cache = Path(cfg.out) / "shard_verification.json" if cfg.out else None
    if cfg.verify_data == "always" and cache is not None and comm.is_root:
        cache.unlink(missing_ok=True)                   # nothing verified before is trusted
    for found in map(shards_under, (data.train_set, data.eval_set)):     # (the val set is in train's)
        if found is not None:
            if comm.is_root:
                found.verify(cache, quiet=cfg.quiet, should_stop=stop_requested)
            comm.barrier(timeout=False)             # hashing a large set takes a while
            signum = comm.max_int(stop_requested())
            if signum:
                raise StopRequested(f"stopped by {signal.Signals(signum).name} while verifying the data, before the "
                                    f"first step: {len(found.verified)} of {len(found.entries)} {found.split} shards "
                                    "verified (kept in the cache); start again to go on", signum)
            if not comm.is_root:
                found.verify(cache, quiet=True)     # reads rank 0's cache: no re-hashing (with a cache)


def describe(cfg: Config, comm, xp, data: RunData, net) -> dict:
    """config.json: the resolved configuration, versions, backend, data, world size, BLAS
    threads, host memory setting and the network."""
    info = {"config": cfg.to_dict(), "gait_ref": __version__, "python": platform.python_version(),
            "numpy": np.__version__, "backend": backend_name(xp), "data_source": data.source,
            "n_classes": data.n_classes, "in_shape": list(data.in_shape), "world_size": comm.size,
            "blas": blas_info(), "host_malloc": describe_host_memory(), "network": net.describe().splitlines()}
    if backend_name(xp) != "numpy":
        info["cupy"] = xp.__version__
    return info
