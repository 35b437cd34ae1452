"""Figures from one or more runs' metrics.jsonl (the scaling paper's Figs. 3-6).

    python -m gait_ref.plot RUN_DIR [RUN_DIR ...] --out FIG_DIR [--labels a,b]

writes ``accuracy.png`` (test and train top-1 per epoch, one line per run) and
``angles.png`` (angle to BP per layer over training steps, one panel per run).
"""
from __future__ import annotations

from pathlib import Path

import click


def read_metrics(run_dir) -> list:
    from .runfolder import METRICS, read_records
    try:
        return read_records(run_dir)
    except FileNotFoundError:
        raise click.UsageError(f"{Path(run_dir) / METRICS}: no metrics.jsonl (was the run started with --out?)") from None


def plot_runs(run_dirs, out_dir, labels=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = labels or [Path(r).name for r in run_dirs]
    runs = [read_metrics(r) for r in run_dirs]
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for recs, label in zip(runs, labels):
        test = [r for r in recs if r["split"] == "test"]
        train = [r for r in recs if r["split"] == "train"]
        if test:
            axes[0].plot([r["step"] for r in test], [100 * r["top1"] for r in test], marker="o", ms=3, label=label)
        if train:
            axes[1].plot([r["step"] for r in train], [100 * r["top1"] for r in train], lw=1, label=label)
    for ax, title in zip(axes, ("test top-1", "train top-1 (running)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)
    written.append(out_dir / "accuracy.png")

    # BP's angle to itself is 0 everywhere: such runs get no panel
    with_angles = [(recs, label) for recs, label in zip(runs, labels)
                   if any(any(v for v in r.get("angles_deg", {}).values()) for r in recs)]
    if with_angles:
        fig, axes = plt.subplots(1, len(with_angles), figsize=(5 * len(with_angles), 4), squeeze=False)
        for ax, (recs, label) in zip(axes[0], with_angles):
            rows = [r for r in recs if "angles_deg" in r]
            for layer in rows[0]["angles_deg"]:
                ax.plot([r["step"] for r in rows], [r["angles_deg"][layer] for r in rows], label=layer, lw=1)
            ax.set_title(f"{label}: angle to BP")
            ax.set_xlabel("step")
            ax.set_ylabel("degrees")
            ax.set_yscale("symlog", linthresh=0.01)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "angles.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "angles.png")
    return written


def plot_search(points: dict, out_path, reference: dict | None = None,
                options=("--lr", "--feedback-lr", "--dtp-sigma", "--dtp-alpha")):
    """A hyperparameter search at a glance: one panel per option, each configuration's score
    (y, log scale) against its value (x), one colour per method. ``points``: {method:
    [({option: value}, score), ...]}; ``reference``: {method: a horizontal line, e.g. the
    paper's figure}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(options), figsize=(4 * len(options), 3.6), sharey=True, squeeze=False)
    for ax, option in zip(axes[0], options):
        for i, (method, rows) in enumerate(points.items()):
            xy = [(o[option], score) for o, score in rows if option in o]
            if xy:
                ax.scatter(*zip(*xy), s=14, color=f"C{i}", label=method)
            if reference and method in reference:
                ax.axhline(reference[method], color=f"C{i}", ls="--", lw=1)
        if option.endswith("lr"):
            ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FuncFormatter(lambda v, _: f"{v:g}"))          # 2, 3, 4 ..., not 2 x 10^0
        ax.set_xlabel(option.lstrip("-"))
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("screen score: validation error %")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return Path(out_path)


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Folder for the PNG files.")
@click.option("--labels", help="Comma-separated legend labels, one per run.")
def main(run_dirs, out_dir, labels):
    """Plot accuracy and angles to BP from runs' metrics.jsonl."""
    labels = labels.split(",") if labels else None
    if labels and len(labels) != len(run_dirs):
        raise click.UsageError(f"{len(labels)} labels for {len(run_dirs)} runs")
    for path in plot_runs(run_dirs, out_dir, labels):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
