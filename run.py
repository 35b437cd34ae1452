#!/usr/bin/env python
"""gait_ref training CLI. `python run.py --help` lists every option.

    python run.py                                   # GAIT-prop on MNIST (from its package), CPU
    python run.py --task cifar10 --rule gait --data ~/cifar
    python run.py --backend cupy --task imagenet --data ~/imagenet-shards-64
"""
from __future__ import annotations

if __name__ == "__main__":            # a stop signal during the imports below is recorded, not fatal
    from gait_ref import stopping as _stopping
    _stopping.install()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from gait_ref.backend import BACKENDS, BackendError  # noqa: E402
from gait_ref.config import Config  # noqa: E402
from gait_ref.data import TASKS, DataFormatError  # noqa: E402
from gait_ref.rules import RULES  # noqa: E402
from gait_ref.stopping import recording  # noqa: E402


class PerLayer(click.ParamType):
    """A number, or comma-separated numbers: one per feedback layer, g_1 first."""

    name = "x[,x...]"

    def __init__(self, cast):
        self.cast = cast

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return [self.cast(v) for v in value]
        if not isinstance(value, str):
            return self.cast(value)
        try:
            parts = [self.cast(v) for v in value.split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a {self.cast.__name__} or a comma-separated list of them", param, ctx)
        return parts[0] if len(parts) == 1 else parts


def _read_config_file(path: str) -> dict:
    p = Path(path)
    if p.suffix not in (".toml", ".yaml", ".yml"):
        raise click.UsageError(f"{path}: config files must be .toml, .yaml or .yml")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".toml":
            import tomllib
            values = tomllib.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise click.UsageError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use TOML") from None
            values = yaml.safe_load(text) or {}
    except click.UsageError:
        raise
    except UnicodeDecodeError as e:
        raise click.UsageError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except Exception as e:            # tomllib.TOMLDecodeError, yaml.YAMLError: the parser's own words
        raise click.UsageError(f"{path}: not valid {p.suffix[1:].upper()} ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(values, dict):
        raise click.UsageError(f"{path}: holds a {type(values).__name__}, expected option = value pairs")
    return values


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--task", type=click.Choice(TASKS), help="Data set (default mnist, from its package).")
@click.option("--arch", help="Architecture preset: mlp-shallow, mlp-deep, mlp-<W>x<N> (e.g. mlp-784x4), "
                              "mlp-tower, conv7, bartunov-mlp, bartunov-lc, simple-vgg, vgg-<C1>-<C2>-... "
                              "Default: the task's (bartunov-mlp for dtp/sdtp/ldrl).")
@click.option("--rule", type=click.Choice(RULES), help="Learning rule (default gait: normalized GAIT-prop).")
@click.option("--target-form", type=click.Choice(["absolute", "difference"]),
              help="Target recursion of tp/itp/gait: the papers' absolute targets, or the exact difference form.")
@click.option("--inverse-solver", type=click.Choice(["auto", "refine", "lu"]),
              help="Exact inverses of tp/itp/gait: refine (GEMM-only refinement from a kept inverse, residual "
                   "checked every step), lu (a fresh LU every step), auto (refine in float32, lu in float64).")
@click.option("--ortho-every", type=click.IntRange(min=1),
              help="Apply the orthogonality regulariser every K steps with weight K * lambda (default 1).")
@click.option("--backend", type=click.Choice(BACKENDS),
              help="numpy (CPU, default), cupy (GPU), or emulated (cupy's device path on the CPU, strict; for tests).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), help="Default float32.")
@click.option("--seed", type=int)
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after this many training steps.")
@click.option("--batch-size", type=int)
@click.option("--lr", type=float, help="Forward learning rate.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), help="Forward optimiser (default: the preset's).")
@click.option("--momentum", type=float, help="SGD momentum.")
@click.option("--weight-decay", type=float, help="SGD L2 weight decay.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]),
              help="Forward learning rate per epoch: constant, or cosine annealing to 1e-5.")
@click.option("--gamma", type=float, help="GAIT-prop/ITP incremental factor (gamma0 for normalized gait).")
@click.option("--gamma-norm", type=click.Choice(["l2", "squared"]), help="Normalized GAIT-prop distance norm.")
@click.option("--gamma-sqrt-dim/--gamma-no-sqrt-dim", default=None,
              help="Normalized GAIT-prop: scale gamma0 by sqrt(D_l) (reference code) or not.")
@click.option("--feedback-init", type=click.Choice(["orthogonal", "normal", "glorot"]),
              help="FA/DFA feedback matrices (own seed stream).")
@click.option("--schedule", type=click.Choice(["parallel", "alternating"]),
              help="dtp/sdtp/ldrl: train forward and feedback weights every batch, or alternate epochs.")
@click.option("--inverse-loss", type=click.Choice(["denoising", "noise-preserving"]),
              help="dtp/sdtp: the feedback (inverse) loss.")
@click.option("--feedback-form", type=click.Choice(["bartunov", "ernoult"]),
              help="dtp/sdtp/ldrl: g(u) = f_below(T_V u + c) (Bartunov) or T_V f(unpool u) + c (Ernoult).")
@click.option("--dtp-alpha", type=float, help="DTP: step size of the penultimate target.")
@click.option("--sdtp-step", type=float, help="SDTP: top target p + s (onehot - p); 1 (default, "
              "the paper) is the label itself, s < 1 a control.")
@click.option("--linear-top-inverse", is_flag=True, default=None,
              help="dtp/sdtp/ldrl: a control: the top feedback layer without its nonlinearity, g(u) = T_V u + c.")
@click.option("--dtp-sigma", type=PerLayer(float),
              help="dtp/sdtp/ldrl: noise std for feedback training; one value or one per feedback layer.")
@click.option("--feedback-lr", type=PerLayer(float),
              help="dtp/sdtp/ldrl: feedback learning rate; one value or one per feedback layer (g_1 first).")
@click.option("--feedback-adam-beta2", type=float, help="dtp/sdtp: beta2 of the inverses' Adam (default 0.999).")
@click.option("--feedback-adam-eps", type=float, help="dtp/sdtp: eps of the inverses' Adam (default 1e-8).")
@click.option("--ldrl-beta", type=float, help="L-DRL: first target logits - beta dCE/dlogits.")
@click.option("--ldrl-iters", type=PerLayer(int),
              help="L-DRL: feedback iterations per batch; one value or one per feedback layer.")
@click.option("--ortho-lambda", type=float, help="Orthogonality regulariser strength.")
@click.option("--ortho-form", type=click.Choice(["full", "offdiag"]))
@click.option("--loss", type=click.Choice(["cross_entropy", "mse"]))
@click.option("--adam-beta1", type=float)
@click.option("--adam-beta2", type=float)
@click.option("--adam-eps", type=float)
@click.option("--adam-eps-placement", type=click.Choice(["tf", "hat"]))
@click.option("--init", type=click.Choice(["orthogonal", "glorot", "normal"]))
@click.option("--linear", is_flag=True, default=None, help="Identity activations (NeurIPS Fig. 2C).")
@click.option("--data", type=click.Path(), help="Folder with the data files the task needs "
              "(default for user data: $GAIT_REF_DATA/<task> or ~/.cache/gait_ref/<task>).")
@click.option("--image-size", type=click.IntRange(min=1),
              help="Train on S x S images, box-downscaled from the stored size (imagenet tasks; "
                   "default: the size of the shards).")
@click.option("--out", type=click.Path(), help="Run folder: config.json, metrics.jsonl, checkpoints.")
@click.option("--resume", is_flag=True, default=None,
              help="Continue from OUT/last.h5 (or OUT/last.prev.h5 if last.h5 is damaged).")
@click.option("--overwrite", is_flag=True, default=None,
              help="Start again in an OUT that holds a checkpoint, deleting it.")
@click.option("--force-unlock", is_flag=True, default=None,
              help="Take over OUT's lock although its record names a live run or another host (after checking "
                   "that run has ended: its lock may be invisible from here, e.g. another mount of the folder).")
@click.option("--verify-data", type=click.Choice(["cached", "always"]),
              help="Shard verification: cached (re-hash only shards whose size, mtime or inode changed; default) "
                   "or always (re-hash every shard at every start).")
@click.option("--allow-config-change", help="--resume: accept these changed options that alter the result "
              "(comma-separated, e.g. lr,batch-size); recorded in metrics.jsonl and config.json.")
@click.option("--angles-every", type=click.IntRange(min=0), help="Measure angles to BP every N steps.")
@click.option("--checkpoint-every", type=click.IntRange(min=0),
              help="Also checkpoint every N steps (default 0: at every epoch's end and at a --max-steps stop only).")
@click.option("--log-every", type=click.IntRange(min=1), help="Train metrics every N steps.")
@click.option("--eval-subset", type=click.IntRange(min=0), help="Evaluate on the first N test images only.")
@click.option("--eval-batch-size", type=click.IntRange(min=1),
              help="Images per evaluation batch (default 1000; lower it if evaluation runs out of device memory).")
@click.option("--train-subset", type=click.IntRange(min=0), help="Train on the first N images only.")
@click.option("--val-holdout", type=click.IntRange(min=0),
              help="Hold out the last N training images as a validation set, evaluated every epoch.")
@click.option("--patience", type=click.IntRange(min=0),
              help="With --val-holdout: stop when validation top-1 has not improved for P epochs (0: never).")
@click.option("--square-net", is_flag=True, default=None,
              help="Build the square (invertible) version of the architecture for any rule, e.g. BP on GP's network.")
@click.option("--quiet", is_flag=True, default=None, help="No progress output.")
@click.option("--loader-workers", type=click.IntRange(min=0),
              help="Processes reading HDF5 shards in parallel (default 0: one reader thread).")
@click.option("--in-memory", type=click.Choice(["host", "device"]),
              help="Load the whole uint8 data set into host RAM or device memory first.")
@click.option("--distributed", type=click.Choice(["none", "mpi"]),
              help="mpi: data-parallel over the ranks of `mpirun -n N python run.py ...` (one GPU per rank).")
@click.option("--comm-timeout", type=float,
              help="--distributed mpi: abort the job when no step completes for this many seconds (default 600).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML or YAML file with any of these options (command-line options win).")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration and exit.")
def main(config_file, print_config, **opts):
    """Train a network with BP, FA, DFA, TP, ITP, GAIT-prop, DTP, SDTP or L-DRL."""
    with recording():                 # a stop signal before the training loop ends the run with a message
        _main(config_file, print_config, **opts)


def _main(config_file, print_config, **opts):
    values = {}
    if config_file:
        values.update({k.replace("-", "_"): v for k, v in _read_config_file(config_file).items()})
    values.update({k: v for k, v in opts.items() if v is not None})
    try:
        cfg = Config.from_dict(values).resolved()
    except (ValueError, TypeError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if print_config:
        click.echo(json.dumps(cfg.to_dict(), indent=1))
        return
    from gait_ref.architectures import ArchitectureError
    from gait_ref.distributed import LOCAL
    from gait_ref.stopping import StopRequested
    from gait_ref.train import DivergenceError, Trainer
    comm = LOCAL
    try:
        if cfg.distributed == "mpi":
            from gait_ref.backend import use_device
            from gait_ref.distributed import MPIComm
            comm = MPIComm(cfg.comm_timeout)
            use_device(cfg.backend, comm.local_rank, comm.local_size)   # this rank's GPU, before anything allocates
        Trainer(cfg, comm).run()
    except StopRequested as e:          # every rank stopped after the same step, checkpointed
        if comm.is_root:
            click.echo(str(e), err=True)
        comm.close()
        sys.exit(128 + e.signum)
    except (BackendError, DataFormatError, ArchitectureError, DivergenceError, ValueError, RuntimeError) as e:
        _fail(comm, str(e), 2)
    except KeyboardInterrupt:
        _fail(comm, "interrupted; resume with --resume (from the last checkpoint)", 130)
    except Exception as e:  # an unexpected failure on one rank must not leave the others waiting
        if comm.size == 1:
            raise
        import traceback
        _fail(comm, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 1)
    comm.close()


def _fail(comm, message: str, code: int):
    """One process: print and exit. Several: print naming the rank, then end every rank."""
    if comm.size == 1:
        click.echo(f"error: {message}" if code != 130 else message, err=True)
        sys.exit(code)
    comm.abort(f"error on rank {comm.rank} of {comm.size}: {message}", code)


if __name__ == "__main__":
    main()
