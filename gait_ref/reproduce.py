"""Regenerate the results tables of docs/RESULTS.md.

    python -m gait_ref.reproduce run neurips|depth|imagenet20 [--quick] [--jobs 2] [--root runs]
    python -m gait_ref.reproduce report [--root runs] [--docs docs] [--table bartunov ...]

``run`` trains every run of a table through run.py (one subprocess per run, resumed
if it was interrupted, skipped if finished); ``report`` reads the runs' metrics.jsonl
and writes the tables (markdown) and figures. ``--quick`` runs the same pipeline for a
few steps on small batches (it is in the test suite).

Tables
  neurips     GAIT-prop NeurIPS 2020 Fig. 2A/B/C and Fig. 3: MNIST and Fashion-MNIST, the
              784-wide MLP with 4 hidden layers (and 1-3 on MNIST, Fig. 2A), BP / TP /
              GAIT-prop (vanilla, as in that paper), the linear network (no regulariser),
              the reducing-width network.
  depth       scaling paper: shallow and deep 1024-wide MLPs on Fashion-MNIST, BP / FA /
              vanilla GP / normalized GP, angles to BP during training, and normalized GP in
              float64 beside float32; deep BP and normalized GP also with seeds 1 and 2.
  imagenet20  the 20 real ImageNet photos of the foolbox wheel, packed by data_prep into
              64 px shards, trained by the 7-conv GP network (and BP), angles to BP.
  bartunov    Bartunov et al. 2018 Table 1, fully connected (7 x 240 tanh) on MNIST: BP, FA,
              DTP, SDTP (parallel schedule) and L-DRL, with the last 10,000 training images held
              out for validation, early stopping on validation (patience 10, at most 100 epochs),
              test error at the best validation epoch; BP and DTP also with seeds 1 and 2; DTP and
              SDTP also at lr 3e-4, the top of the paper's search range (the presets use 1e-4); SDTP
              also with the inverse's lr at 3e-4 and with its noise sigma at 0.01 and 0.3; DTP and SDTP
              with the alternating schedule (at most 200 epochs, patience 20); DTP and BP without
              early stopping (100 epochs, patience 100); SDTP at lr 1e-3 (above the paper's range);
              SDTP with --sdtp-step 1, 0.1, 0.01 and angles to BP; the locally connected network
              (bartunov-lc) with BP, DTP, FA, SDTP and L-DRL, as the FC rows.
  bartunov-search  Bartunov et al.'s random hyperparameter search for DTP and SDTP on the FC
              network (their Table 4 ranges; ``gait_ref.hparam_search``): 60 configurations
              per method, each screened for 12 epochs, scored by the mean validation error of
              the last 5; then each method's best configuration trained as in table bartunov
              (rows best-dtp, best-sdtp, which appear once their screen has finished).
  fmnist-gap  why GAIT-prop trails BP on Fashion-MNIST: the shallow MLP for 20 epochs, BP on the
              ordinary net and on GP's square net with GP's regulariser (lambda 100) and without
              it (the auxiliary units alone), GP with
              lambda 100 (the paper), 10, 1, 0, and lambda 100 applied lazily (--ortho-every 4); BP,
              BP with the regulariser and GP (lambda 100) also with seeds 1 and 2; and BP with the
              regulariser on the deep MLP, also with seeds 1 and 2 (its BP and GP rows are in table
              depth).
  neurips-depth  NeurIPS Fig. 2A: MNIST MLPs of 1-4 hidden layers of 784, BP / TP / GP (vanilla),
              10 epochs; and the linear network for 30 epochs (GP and TP also each at the other's lr).
  vgg         L-DRL with conv-pool feedback on MNIST (vgg-8-16): BP, FA, DTP, SDTP, L-DRL, 5 epochs
              (SGD rules at lr 0.003: the CIFAR preset's 0.08 diverges on MNIST).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from .runfolder import read_records

ROOT = Path(__file__).resolve().parents[1]

NEURIPS_EPOCHS = 2   # the paper trains 100; this machine has 2 CPU cores
DEPTH_EPOCHS = 20
FLOAT64_EPOCHS = 3   # the float64 twin of the deep normalized-GP run, for the precision comparison
IMAGENET20_EPOCHS = 60
TABLES = ("neurips", "depth", "imagenet20", "bartunov", "bartunov-search", "fmnist-gap", "neurips-depth", "vgg")


QUICK_ARGS = ["--max-steps", 6, "--eval-subset", 200, "--angles-every", 3, "--log-every", 3]


def table_runs(table: str, quick: bool, root: Path) -> dict:
    """{run name: run.py arguments} for one table. Rows that depend on other rows' results
    (table bartunov-search's best configurations) appear once those rows have finished."""
    runs = {}
    if table == "neurips":
        for task in ("mnist", "fashion-mnist"):
            for rule in ("bp", "tp", "gait-vanilla"):
                runs[f"{task}-784x4-{rule}"] = ["--task", task, "--arch", "mlp-784x4", "--rule", rule,
                                                "--epochs", NEURIPS_EPOCHS]
        for depth in (1, 2, 3):                                # Fig. 2A: depths (4 is above)
            for rule in ("bp", "tp", "gait-vanilla"):
                runs[f"mnist-784x{depth}-{rule}"] = ["--task", "mnist", "--arch", f"mlp-784x{depth}", "--rule", rule,
                                                     "--epochs", NEURIPS_EPOCHS]
        for rule in ("bp", "tp", "gait-vanilla"):
            runs[f"mnist-linear-{rule}"] = ["--task", "mnist", "--arch", "mlp-784x4", "--rule", rule, "--linear",
                                            "--ortho-lambda", 0, "--epochs", NEURIPS_EPOCHS]
            runs[f"mnist-tower-{rule}"] = ["--task", "mnist", "--arch", "mlp-tower", "--rule", rule,
                                           "--epochs", NEURIPS_EPOCHS]
    elif table == "depth":
        for arch in ("mlp-deep", "mlp-shallow"):
            for rule in ("bp", "fa", "gait-vanilla", "gait"):
                runs[f"{arch}-{rule}"] = ["--task", "fashion-mnist", "--arch", arch, "--rule", rule,
                                          "--epochs", DEPTH_EPOCHS, "--angles-every", 100]
        runs["mlp-deep-gait-float64"] = ["--task", "fashion-mnist", "--arch", "mlp-deep", "--rule", "gait",
                                         "--dtype", "float64", "--epochs", FLOAT64_EPOCHS, "--angles-every", 100]
        # the reference code's configuration of vanilla GP: absolute targets, float64
        runs["mlp-deep-gait-vanilla-absolute-float64"] = [
            "--task", "fashion-mnist", "--arch", "mlp-deep", "--rule", "gait-vanilla", "--target-form", "absolute",
            "--dtype", "float64", "--epochs", FLOAT64_EPOCHS, "--angles-every", 100]
        for name in ("mlp-deep-bp", "mlp-deep-gait"):         # the deep headline comparison, seeds 1 and 2
            for seed in (1, 2):
                runs[f"{name}-seed{seed}"] = runs[name] + ["--seed", seed]
    elif table == "imagenet20":
        shards = root / "imagenet20" / "shards"
        for rule in ("gait", "bp"):
            runs[f"conv7-{rule}"] = ["--task", "imagenet", "--data", shards, "--rule", rule, "--batch-size", 10,
                                     "--epochs", IMAGENET20_EPOCHS, "--angles-every", 4, "--lr", 1e-3]
    elif table == "bartunov":
        def fc(rule, seed, patience=10, epochs=100, arch="bartunov-mlp"):
            return ["--task", "mnist", "--arch", arch, "--rule", rule, "--val-holdout", 10000,
                    "--patience", patience, "--epochs", epochs, "--seed", seed]
        for rule in ("bp", "fa", "dtp", "sdtp", "ldrl"):
            for seed in ((0, 1, 2) if rule in ("bp", "dtp") else (0,)):
                runs[f"fc-{rule}" + (f"-seed{seed}" if seed else "")] = fc(rule, seed)
        for rule in ("dtp", "sdtp"):           # the top of the paper's search range for the model's Adam lr
            runs[f"fc-{rule}-lr3e-4"] = fc(rule, 0) + ["--lr", 3e-4]
        # SDTP's controls, inside the paper's search ranges: the inverse's Adam lr at the top
        # (with the model's), and the inverse-training noise at both ends of [0.01, 0.3]
        runs["fc-sdtp-fblr3e-4"] = fc("sdtp", 0) + ["--lr", 3e-4, "--feedback-lr", 3e-4]
        for sigma in (0.01, 0.3):
            runs[f"fc-sdtp-sigma{sigma}"] = fc("sdtp", 0) + ["--dtp-sigma", sigma]
        # the paper reports train errors near 0.06%, DTP's stop at 0.3-0.5%: DTP and BP without
        # early stopping (100 epochs; the test error is still read at the best validation epoch)
        for rule in ("bp", "dtp"):
            runs[f"fc-{rule}-patience100"] = fc(rule, 0, patience=100)
        for rule in ("bp", "dtp"):              # both to convergence on three seeds, like with like
            for seed in (1, 2):
                runs[f"fc-{rule}-patience100-seed{seed}"] = fc(rule, seed, patience=100)
        # the paper's alternating rows: inverses and forward weights in alternate epochs, so
        # twice the epochs and twice the patience (half the epochs leave the forward net as it was)
        for rule in ("dtp", "sdtp"):
            runs[f"fc-{rule}-alternating"] = fc(rule, 0, patience=20, epochs=200) + ["--schedule", "alternating"]
        # the search's best SDTP configurations sit at the top of the paper's model lr range
        # (table bartunov-search): SDTP beyond it, at Adam's usual 1e-3
        runs["fc-sdtp-lr1e-3"] = fc("sdtp", 0) + ["--lr", 1e-3]
        # SDTP's top target as a partial step toward the label (s = 1: the paper), with angles to BP:
        # separates the size of the jump through the learned 10 -> 240 inverse from its direction
        for step in (1, 0.1, 0.01):
            runs[f"fc-sdtp-step{step}"] = fc("sdtp", 0) + ["--sdtp-step", step, "--angles-every", 500]
        # controls for what the step changes (the measuring steps log each sample's jump
        # ||t - y|| at the top and bottom hidden layers, split by correct and wrong images):
        # a linear top inverse, with which the top layers' updates do not depend on the step;
        # and DTP's gradient step alpha up to a jump as large as SDTP's
        for step in (1, 0.1):
            runs[f"fc-sdtp-lineartop-step{step}"] = fc("sdtp", 0) + ["--linear-top-inverse", "--sdtp-step", step,
                                                                    "--angles-every", 500]
        for alpha in (0.1, 0.5, 2.5):
            runs[f"fc-dtp-alpha{alpha}"] = fc("dtp", 0) + ["--dtp-alpha", alpha, "--angles-every", 500]
        # the locally connected network of the same table (paper: BP 1.46, DTP 1.48, SDTP 1.49)
        for rule in ("bp", "dtp", "fa", "sdtp", "ldrl"):
            runs[f"lc-{rule}"] = fc(rule, 0, arch="bartunov-lc")
    elif table == "bartunov-search":
        from .hparam_search import N_CONFIGS, SCREEN_EPOCHS, best_screened, draw_configs, screen_score

        def fc(rule, epochs, patience=0):
            return ["--task", "mnist", "--arch", "bartunov-mlp", "--rule", rule, "--val-holdout", 10000,
                    "--epochs", epochs, "--seed", 0] + (["--patience", patience] if patience else [])
        for rule in ("sdtp", "dtp"):       # SDTP's screen first: its gap is the unexplained one
            screen = {f"screen-{rule}-{i:02d}": (fc(rule, SCREEN_EPOCHS), cfg)
                      for i, cfg in enumerate(draw_configs(rule, 2 if quick else N_CONFIGS[rule]))}
            runs.update({name: base + cfg for name, (base, cfg) in screen.items()})
            # the best configuration to convergence, once every screen run has finished
            done = all(finished(root / table / name, runs[name] + (QUICK_ARGS if quick else []))
                       for name in screen)
            best = best_screened({name: screen_score(root / table / name) for name in screen}) if done else None
            if best is not None:
                runs[f"best-{rule}"] = fc(rule, 100, patience=10) + screen[best][1]
    elif table == "fmnist-gap":
        base = ["--task", "fashion-mnist", "--arch", "mlp-shallow", "--epochs", 20, "--angles-every", 200]
        runs["bp"] = base + ["--rule", "bp"]
        runs["bp-square-ortho100"] = base + ["--rule", "bp", "--square-net", "--ortho-lambda", 100]
        runs["bp-square-ortho0"] = base + ["--rule", "bp", "--square-net", "--ortho-lambda", 0]   # aux units alone
        for lam in (100, 10, 1, 0):
            runs[f"gait-ortho{lam}"] = base + ["--rule", "gait", "--ortho-lambda", lam]
        runs["gait-ortho100-every4"] = base + ["--rule", "gait", "--ortho-lambda", 100, "--ortho-every", 4]
        # the deep MLP's gap (table depth: BP 87.7, GP 84.6): BP with GP's square net and regulariser
        runs["deep-bp-square-ortho100"] = ["--task", "fashion-mnist", "--arch", "mlp-deep", "--epochs", 20,
                                           "--angles-every", 200, "--rule", "bp", "--square-net", "--ortho-lambda", 100]
        for name in ("bp", "bp-square-ortho100", "gait-ortho100", "deep-bp-square-ortho100"):   # seeds 1 and 2
            for seed in (1, 2):
                runs[f"{name}-seed{seed}"] = runs[name] + ["--seed", seed]
    elif table == "neurips-depth":
        for depth in (1, 2, 3, 4):
            for rule in ("bp", "tp", "gait-vanilla"):
                runs[f"mnist-784x{depth}-{rule}"] = ["--task", "mnist", "--arch", f"mlp-784x{depth}", "--rule", rule,
                                                     "--epochs", 10]
        for rule in ("bp", "tp", "gait-vanilla"):
            runs[f"mnist-linear-{rule}"] = ["--task", "mnist", "--arch", "mlp-784x4", "--rule", rule, "--linear",
                                            "--ortho-lambda", 0, "--epochs", 30]
        # in a linear network GAIT-prop's update is TP's exactly (f' = 1, the 1/gamma scale cancels
        # the gamma steps), so the presets differ only in the learning rate: each at the other's
        runs["mnist-linear-gait-vanilla-lr1e-5"] = runs["mnist-linear-gait-vanilla"] + ["--lr", 1e-5]
        runs["mnist-linear-tp-lr1e-4"] = runs["mnist-linear-tp"] + ["--lr", 1e-4]
    elif table == "vgg":
        for rule in ("bp", "fa", "dtp", "sdtp", "ldrl"):
            runs[rule] = ["--task", "mnist", "--arch", "vgg-8-16", "--rule", rule, "--epochs", 5,
                          *(["--lr", 0.003] if rule in ("bp", "ldrl") else [])]
    else:
        raise click.UsageError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    if quick:
        for args in runs.values():
            i = args.index("--epochs")
            args[i + 1] = 1
            args += QUICK_ARGS
            if "--batch-size" not in args:
                args += ["--batch-size", 32]
    return runs


def prepare_imagenet20(root: Path, quiet: bool) -> None:
    """Pack the foolbox photos as an ImageNet tree: train/ and val/ both hold all 20."""
    from data_prep.imagenet_tree import pack_tree
    from .data.packaged import imagenet_photos
    base = root / "imagenet20"
    if (base / "shards" / "manifest.json").exists():
        return
    photos = imagenet_photos(quiet)
    for split in ("train", "val"):
        for p in sorted(photos.glob("imagenet_*.jpg")):
            cls = f"c{int(p.stem.split('_')[2]):04d}"             # ImageNet-1k class index
            d = base / "tree" / split / cls
            d.mkdir(parents=True, exist_ok=True)
            if not (d / p.name).exists():
                os.symlink(p, d / p.name)
    pack_tree(base / "tree", base / "shards", size=64, shard_size=8, workers=1, quiet=quiet)


def _complete(stopped_early: bool, epoch: int, step: int, args) -> bool:
    """A run with arguments ``args`` whose last test record is at (epoch, step) is done."""
    if stopped_early:
        return True
    a = [str(x) for x in args]
    if "--max-steps" in a:
        return step >= int(a[a.index("--max-steps") + 1])
    return epoch >= int(a[a.index("--epochs") + 1])


def finished(out: Path, args) -> bool:
    try:
        recs = read_records(out)
    except FileNotFoundError:
        return False
    tests = [r for r in recs if r["split"] == "test"]
    stopped = any(r["split"] == "early_stop" for r in recs)
    return stopped or bool(tests) and _complete(False, tests[-1]["epoch"], tests[-1]["step"], args)


def summary_finished(s: dict, args) -> bool:
    """``finished`` from a run's ``summarize`` record (no second read of its metrics)."""
    return _complete(s["stopped_early"], s["epochs"], s["steps"], args)


def run_one(name, args, out: Path, threads: int, quiet: bool):
    if finished(out, args):
        return name, "done already"
    cmd = [sys.executable, str(ROOT / "run.py"), *map(str, args), "--out", str(out), "--quiet"]
    if (out / "last.h5").exists():
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    if not quiet:
        print("$ " + " ".join(cmd[1:]), flush=True)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"run {name} failed: {res.stderr.strip()[-500:]}")
    return name, "ok"


@click.group()
def cli():
    """Regenerate docs/RESULTS.md."""


@cli.command()
@click.argument("table")
@click.option("--quick", is_flag=True, help="A few steps per run: checks the pipeline, not the science.")
@click.option("--root", default="runs", show_default=True, type=click.Path())
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1), help="Runs in parallel.")
@click.option("--threads", default=0, type=click.IntRange(min=0), help="BLAS threads per run (0: cores / jobs).")
@click.option("--only", help="Comma-separated run names.")
@click.option("--quiet", is_flag=True)
def run(table, quick, root, jobs, threads, only, quiet):
    """Train every run of TABLE (neurips, depth, imagenet20, bartunov, bartunov-search, fmnist-gap,
    neurips-depth, vgg)."""
    root = Path(root) / ("quick" if quick else "")
    if table == "imagenet20":
        prepare_imagenet20(root, quiet)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    started: set = set()
    while True:                         # again while finished rows bring new ones (bartunov-search)
        runs = table_runs(table, quick, root)
        runs = {k: v for k, v in runs.items() if k not in started and (not only or k in only.split(","))}
        if not runs:
            break
        started |= set(runs)
        with ThreadPoolExecutor(jobs) as pool:
            futs = [pool.submit(run_one, n, a, root / table / n, threads, quiet) for n, a in runs.items()]
            for f in futs:
                name, status = f.result()
                if not quiet:
                    print(f"{name}: {status}", flush=True)


def summarize(out: Path) -> dict | None:
    try:
        recs = read_records(out)
    except FileNotFoundError:
        return None
    tests = [r for r in recs if r["split"] == "test"]
    trains = [r for r in recs if r["split"] == "train"]
    if not tests:
        return None
    angles = [r for r in recs if "angles_deg" in r]
    cfg = json.loads((out / "config.json").read_text())
    vals = [r for r in recs if r["split"] == "val"]
    if vals:                                   # early stopping: the test error at the best validation epoch
        best = max(vals, key=lambda r: r["top1"])
        at_best = next(r for r in tests if r["epoch"] == best["epoch"])
    s = {"test_top1": tests[-1]["top1"], "best_test_top1": max(r["top1"] for r in tests),
         "val_top1": best["top1"] if vals else None, "best_val_epoch": best["epoch"] if vals else None,
         "test_top1_at_best_val": at_best["top1"] if vals else None,
         "stopped_early": any(r["split"] == "early_stop" for r in recs),
         "train_top1": trains[-1]["top1"] if trains else float("nan"), "epochs": tests[-1]["epoch"],
         "steps": tests[-1]["step"], "wall_time_s": tests[-1].get("wall_time_s", float("nan")),
         "dtype": cfg["config"]["dtype"], "backend": cfg["backend"], "seed": cfg["config"]["seed"]}
    if angles:
        layers = list(angles[0]["angles_deg"])
        s["angles_first"] = angles[0]["angles_deg"]
        late = angles[len(angles) // 2:]
        s["angles_mean_late"] = {k: sum(r["angles_deg"][k] for r in late) / len(late) for k in layers}
    return s


def recorded_rows(table_md: Path) -> dict:
    """{run name: (row, finished, figure)} from a table that ``report`` printed earlier (in
    docs/tables/), for the runs that another machine or sitting ran: ``report`` keeps their
    rows where their metrics are not under ROOT, so a table can be completed over several
    sittings. ``figure`` is the row's first number (final test top-1 %, or the test error %
    at the best validation epoch)."""
    if not table_md.exists():
        return {}
    out = {}
    for line in table_md.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) < 3 or cells[0] == "run":
            continue
        try:
            figure = float(cells[1])
        except ValueError:
            continue
        name = cells[0].replace(" (UNFINISHED)", "")
        finished = "UNFINISHED" not in line
        out[name] = (line, finished, figure)
    return out


def seed_summaries(table_dir: Path, runs: dict, summaries: dict | None = None,
                   recorded: dict | None = None) -> list[str]:
    """Mean and standard deviation (n - 1) over the seeds of each run that has seed
    twins (``name``, ``name-seed1``, ...), from finished runs only: test error at the best
    validation epoch where the run early-stops, final test top-1 otherwise. ``summaries``
    ({name: summarize(...)}) saves reading the metrics again when the caller has them;
    ``recorded`` (``recorded_rows``) supplies the runs whose metrics are not under ROOT."""
    import statistics
    if summaries is None:
        summaries = {name: summarize(table_dir / name) for name in runs}
    recorded = recorded or {}
    groups: dict[str, list] = {}
    for name, args in runs.items():
        base = re.sub(r"-seed\d+$", "", name)
        groups.setdefault(base, []).append((name, args))
    lines = []
    for base, members in groups.items():
        if len(members) < 2:
            continue
        values, names, early_stopping = [], [], False
        for name, args in members:
            s = summaries[name]
            if s is None and name in recorded and recorded[name][1]:
                names.append(name + " (recorded)")
                early_stopping = "--val-holdout" in map(str, args)
                values.append(recorded[name][2])
                continue
            if s is None or not summary_finished(s, args):
                continue
            names.append(name)
            early_stopping = s["val_top1"] is not None
            values.append(100 * (1 - s["test_top1_at_best_val"]) if early_stopping else 100 * s["test_top1"])
        if len(values) < 2:
            lines.append(f"- {base}: {len(values)} of {len(members)} seeds finished, no mean yet")
            continue
        what = "test error % at best val epoch" if early_stopping else "final test top-1 %"
        lines.append(f"- {base}, {what} over {len(values)} seeds ({', '.join(names)}): "
                     f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
                     + ("" if len(values) == len(members) else f" ({len(members) - len(values)} unfinished)"))
    return ([""] + lines) if lines else []


def screened(table_dir: Path, runs: dict, rule: str) -> dict:
    """Table bartunov-search's finished screen runs of ``rule``: {name: (score, the drawn
    options as run.py arguments)}; the score is ``hparam_search.screen_score``."""
    from .hparam_search import screen_score
    return {n: (screen_score(table_dir / n), a[a.index("--seed") + 2:]) for n, a in runs.items()
            if n.startswith(f"screen-{rule}-") and finished(table_dir / n, a)}


def search_points(table_dir: Path, runs: dict) -> dict:
    """{method: [({option: value}, screen score), ...]} over the finished screen runs."""
    return {rule: [({k: v for k, v in zip(drawn[::2], drawn[1::2]) if isinstance(v, float)}, score)
                   for score, drawn in screened(table_dir, runs, rule).values()]
            for rule in ("dtp", "sdtp")}


def search_ranking(table_dir: Path, runs: dict, recorded: dict | None = None, top: int = 5) -> list[str]:
    """Table bartunov-search's screen, per method: how many configurations finished, and the
    ``top`` best by their score (mean validation error over the last epochs of the screen),
    with their options. Runs kept as recorded (metrics elsewhere) are counted, not ranked."""
    from .hparam_search import SCORE_EPOCHS
    lines = []
    for rule in ("dtp", "sdtp"):
        screen = [n for n in runs if n.startswith(f"screen-{rule}-")]
        if not screen:
            continue
        done = screened(table_dir, runs, rule)
        elsewhere = [n for n in screen if n not in done and n in (recorded or {}) and recorded[n][1]]
        lines.append(f"- {rule} screen: {len(done)} of {len(screen)} configurations finished here"
                     + (f", {len(elsewhere)} recorded from elsewhere (not ranked)" if elsewhere else "")
                     + f"; best by mean validation error % over the last {SCORE_EPOCHS} epochs:")
        for n in sorted(done, key=lambda n: (done[n][0], n))[:top]:
            score, drawn = done[n]
            lines.append(f"  - {n}: {score:.2f} (`{' '.join(map(str, drawn))}`)")
    return ([""] + lines) if lines else []


@cli.command()
@click.option("--root", default="runs", show_default=True, type=click.Path())
@click.option("--docs", default="docs", show_default=True, type=click.Path())
@click.option("--quick", is_flag=True)
@click.option("--table", "tables", multiple=True, type=click.Choice(TABLES),
              help="Only these tables (repeatable; default: every table with runs under ROOT).")
def report(root, docs, quick, tables):
    """Print each table's markdown and write figures into DOCS/figures. A run whose metrics
    are not under ROOT keeps its row from DOCS/tables/TABLE.md, as an earlier report
    recorded it (another machine or sitting ran it); its figures are not redrawn. So does a
    run recorded as finished whose metrics under ROOT are of an unfinished rerun."""
    from .plot import plot_runs, plot_search
    root = Path(root) / ("quick" if quick else "")
    for table in tables or TABLES:
        runs = table_runs(table, quick, root)
        rows = []
        summaries = {name: summarize(root / table / name) for name in runs}
        recorded = {} if quick else recorded_rows(Path(docs) / "tables" / f"{table}.md")
        for name, args in runs.items():
            s = summaries[name]
            if s is not None and not summary_finished(s, args) and recorded.get(name, (None, False))[1]:
                s = summaries[name] = None     # a rerun under way: the recorded finished row stands
            if s is None:
                if name in recorded:
                    rows.append(recorded[name][0])
                continue
            cmd = "python run.py " + " ".join(map(str, args))
            angles = ""
            if "angles_mean_late" in s:
                angles = ", ".join(f"{k} {v:.3g}" for k, v in s["angles_mean_late"].items())
            if s["val_top1"] is not None:            # early-stopping tables: errors, as the paper
                state = "stopped early" if s["stopped_early"] else ("finished" if summary_finished(s, args)
                                                                  else "UNFINISHED")
                rows.append(f"| {name} | {100 * (1 - s['test_top1_at_best_val']):.2f} | {s['best_val_epoch']} | "
                            f"{100 * (1 - s['val_top1']):.2f} | {100 * (1 - s['train_top1']):.2f} | {s['epochs']} "
                            f"({state}) | {s['wall_time_s'] / 60:.1f} | `{cmd}` |")
                continue
            state = "" if summary_finished(s, args) else " (UNFINISHED)"
            rows.append(f"| {name}{state} | {100 * s['test_top1']:.2f} | {100 * s['best_test_top1']:.2f} | "
                        f"{100 * s['train_top1']:.2f} | {s['epochs']} | {s['wall_time_s'] / 60:.1f} | "
                        f"{s['dtype']} | {angles} | `{cmd}` |")
        if not rows:
            continue
        click.echo(f"\n### {table}\n")
        if table in ("bartunov", "bartunov-search"):
            click.echo("| run | test error % at best val epoch | best val epoch | val error % | last train error % "
                       "| epochs run | wall min | command |")
            click.echo("|---|---|---|---|---|---|---|---|")
        else:
            click.echo("| run | final test top-1 % | best test top-1 % | last train top-1 % | epochs | wall min "
                       "| dtype | mean angle to BP, 2nd half (deg) | command |")
            click.echo("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            click.echo(r)
        for line in seed_summaries(root / table, runs, summaries, recorded):
            click.echo(line)
        if table == "bartunov-search":
            for line in search_ranking(root / table, runs, recorded):
                click.echo(line)
        done = [root / table / n for n in runs if (root / table / n / "metrics.jsonl").exists()]
        elsewhere = [n for n in runs if summaries[n] is None and n in recorded]   # rows kept as recorded
        if table == "bartunov-search":             # the best configurations' curves, and the screen's scores
            best = [d for d in done if d.name.startswith("best-")]
            if best and not any(n.startswith("best-") for n in elsewhere):
                plot_runs(best, Path(docs) / "figures" / table / "best", [d.name for d in best])
            points = search_points(root / table, runs)
            if any(points.values()) and not any(n.startswith("screen-") for n in elsewhere):
                # the paper's test errors (Table 1), for scale: the scores are validation errors
                plot_search(points, Path(docs) / "figures" / table / "screen.png", {"dtp": 1.77, "sdtp": 2.03})
            continue
        for group in sorted({re.sub(r"-(seed\d+|(fb)?lr[0-9.e-]+|sigma[0-9.]+)$", "", n).rsplit("-", 1)[0]
                             if not n.endswith("float64") else "mlp-deep-gait" for n in runs}):
            members = [d for d in done if d.name.startswith(group)]
            # a figure that misses the recorded runs would mislead: keep the one drawn with them
            if members and not any(n.startswith(group) for n in elsewhere):
                plot_runs(members, Path(docs) / "figures" / table / group, [d.name for d in members])
        if table == "fmnist-gap" and done and not elsewhere:   # the controls read against each other: one figure
            plot_runs(done, Path(docs) / "figures" / table / "all", [d.name for d in done])


if __name__ == "__main__":
    cli()
