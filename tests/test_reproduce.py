"""The results pipeline's --quick mode: every table's runs for a few steps, then the report."""
import numpy as np
import pytest
from click.testing import CliRunner

from gait_ref.reproduce import cli, table_runs


def test_tables_cover_the_issue_runs(tmp_path):
    neurips = table_runs("neurips", False, tmp_path)
    assert {"mnist-784x4-gait-vanilla", "fashion-mnist-784x4-tp", "mnist-linear-tp", "mnist-tower-bp"} <= set(neurips)
    depth = table_runs("depth", False, tmp_path)
    assert {f"{a}-{r}" for a in ("mlp-shallow", "mlp-deep") for r in ("bp", "fa", "gait-vanilla", "gait")} <= set(depth)
    assert all(int(a[a.index("--epochs") + 1]) >= 20 for n, a in depth.items() if "float64" not in n)
    bartunov = table_runs("bartunov", False, tmp_path)
    assert {f"fc-{r}" for r in ("bp", "fa", "dtp", "sdtp", "ldrl")} | {"fc-dtp-seed2", "fc-bp-seed1"} <= set(bartunov)
    assert all("--val-holdout" in a for a in bartunov.values())
    assert {f"lc-{r}" for r in ("bp", "fa", "dtp", "sdtp", "ldrl")} <= set(bartunov)      # the LC network too
    assert all(a[a.index("--arch") + 1] == "bartunov-lc" for n, a in bartunov.items() if n.startswith("lc-"))
    gap = table_runs("fmnist-gap", False, tmp_path)
    assert {"bp", "bp-square-ortho100", "gait-ortho100", "gait-ortho1", "gait-ortho100-every4"} <= set(gap)
    assert set(table_runs("vgg", False, tmp_path)) == {"bp", "fa", "dtp", "sdtp", "ldrl"}
    search = table_runs("bartunov-search", False, tmp_path)
    assert len([n for n in search if n.startswith("screen-sdtp-")]) == 60     # the paper's 60 per method
    assert len([n for n in search if n.startswith("screen-dtp-")]) == 60
    assert all("--val-holdout" in a and "--feedback-adam-eps" in a for a in search.values())


@pytest.mark.parametrize("table,only", [
    ("neurips", "mnist-784x4-gait-vanilla,mnist-linear-tp,mnist-tower-bp"),
    ("depth", "mlp-deep-gait,mlp-shallow-fa"),
    ("imagenet20", None),
    ("bartunov", "fc-dtp,fc-bp-seed1"),
    ("bartunov-search", None),          # two screens per method, then each best to its end
    ("fmnist-gap", "bp-square-ortho100,gait-ortho100-every4"),
])
def test_quick_mode_runs_the_pipeline(tmp_path, table, only):
    args = ["run", table, "--quick", "--root", str(tmp_path), "--quiet"] + (["--only", only] if only else [])
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["report", "--quick", "--root", str(tmp_path), "--docs", str(tmp_path / "docs")])
    assert res.exit_code == 0, res.output
    assert f"### {table}" in res.output and "python run.py" in res.output
    assert list((tmp_path / "docs" / "figures" / table).glob("*/accuracy.png"))
    if table == "bartunov-search":
        assert (tmp_path / "docs" / "figures" / table / "screen.png").stat().st_size > 0
        assert "- sdtp screen: 2 of 2 configurations finished here" in res.output


def _fake_run(folder, test_top1_by_epoch, val_top1_by_epoch, early_stop):
    import json
    folder.mkdir(parents=True)
    recs = []
    for epoch, (t, v) in enumerate(zip(test_top1_by_epoch, val_top1_by_epoch), start=1):
        recs.append({"split": "train", "epoch": epoch, "step": epoch * 10, "top1": 0.99})
        recs.append({"split": "val", "epoch": epoch, "step": epoch * 10, "top1": v})
        recs.append({"split": "test", "epoch": epoch, "step": epoch * 10, "top1": t})
    if early_stop:
        recs.append({"split": "early_stop", "epoch": len(test_top1_by_epoch)})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (folder / "config.json").write_text(json.dumps({"config": {"dtype": "float32", "seed": 0}, "backend": "numpy"}))


def test_seed_summary_is_the_mean_and_std_of_test_error_at_the_best_val_epoch(tmp_path):
    from gait_ref.reproduce import seed_summaries
    runs = table_runs("bartunov", False, tmp_path)
    # the test error at the best validation epoch (epoch 2 for both), not the last or the best test
    _fake_run(tmp_path / "fc-bp", [0.97, 0.98, 0.99], [0.96, 0.99, 0.98], early_stop=True)
    _fake_run(tmp_path / "fc-bp-seed1", [0.95, 0.96, 0.99], [0.90, 0.97, 0.95], early_stop=True)
    _fake_run(tmp_path / "fc-bp-seed2", [0.97], [0.97], early_stop=False)       # unfinished: left out
    _fake_run(tmp_path / "fc-dtp", [0.97], [0.97], early_stop=True)
    lines = seed_summaries(tmp_path, runs)
    bp = next(l for l in lines if l.startswith("- fc-bp,"))
    assert "over 2 seeds (fc-bp, fc-bp-seed1): 3.00 ± 1.41 (1 unfinished)" in bp      # errors 2 and 4
    assert "- fc-dtp: 1 of 3 seeds finished, no mean yet" in lines


def test_report_keeps_recorded_rows_of_runs_that_ran_elsewhere(tmp_path):
    """A table completed over several sittings: rows recorded in DOCS/tables/T.md for runs
    whose metrics are not under ROOT are kept, and their figures enter the seed means;
    a local run is reported from its metrics, and an unfinished recorded run is left out of
    the means; a finished recorded row stands while a rerun of it is unfinished."""
    import json
    docs = tmp_path / "docs"
    (docs / "tables").mkdir(parents=True)
    head = "| run | final test top-1 % | best test top-1 % | last train top-1 % | epochs | wall min | dtype | angles | command |"
    recorded = ["| bp | 87.00 | 87.10 | 89.00 | 20 | 6.0 | float32 |  | `python run.py --rule bp` |",
                "| bp-seed2 (UNFINISHED) | 80.00 | 80.00 | 81.00 | 3 | 1.0 | float32 |  | `python run.py --seed 2` |",
                "| gait-ortho1 | 85.76 | 85.76 | 87.32 | 20 | 25.1 | float32 |  | `python run.py --rule gait` |"]
    (docs / "tables" / "fmnist-gap.md").write_text("\n".join(["### fmnist-gap", "", head, "|---|" * 9] + recorded) + "\n")
    local = tmp_path / "runs" / "fmnist-gap" / "bp-seed1"           # finished here: 20 epochs of 10 steps
    local.mkdir(parents=True)
    recs = [{"split": s, "epoch": e, "step": 10 * e, "top1": 0.89} for e in range(1, 21) for s in ("train", "test")]
    (local / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (local / "config.json").write_text(json.dumps({"config": {"dtype": "float32", "seed": 1}, "backend": "numpy"}))
    rerun = tmp_path / "runs" / "fmnist-gap" / "gait-ortho1"    # recorded finished, rerun here: 3 epochs so far
    rerun.mkdir(parents=True)
    recs = [{"split": s, "epoch": e, "step": 10 * e, "top1": 0.50} for e in range(1, 4) for s in ("train", "test")]
    (rerun / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (rerun / "config.json").write_text(json.dumps({"config": {"dtype": "float32", "seed": 0}, "backend": "numpy"}))
    res = CliRunner().invoke(cli, ["report", "--root", str(tmp_path / "runs"), "--docs", str(docs),
                                   "--table", "fmnist-gap"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for row in recorded:
        assert row in res.output
    assert "| bp-seed1 | 89.00 |" in res.output
    assert "gait-ortho1 (UNFINISHED)" not in res.output          # the unfinished rerun does not replace it
    assert "- bp, final test top-1 % over 2 seeds (bp (recorded), bp-seed1): 88.00 ± 1.41 (1 unfinished)" in res.output
    assert not list((docs / "figures").glob("fmnist-gap/*/accuracy.png"))   # figures without recorded runs: not drawn


def test_search_configs_are_drawn_from_bartunovs_table_4():
    from gait_ref.hparam_search import SEARCH_SPACE, draw_configs
    for rule in ("dtp", "sdtp"):
        configs = draw_configs(rule, 40)
        assert configs == draw_configs(rule, 40) and configs != draw_configs(rule, 40, seed=1)
        assert draw_configs(rule, 5) == configs[:5]
        for args in configs:
            opts = dict(zip(args[::2], args[1::2]))
            assert ("--dtp-alpha" in opts) == (rule == "dtp")          # SDTP's top target has no step
            for option, kind, domain in SEARCH_SPACE:
                if option not in opts:
                    continue
                v = opts[option]
                if kind == "choice":
                    assert v in domain, (option, v)
                else:      # rounded to 3 significant digits: within the range up to that rounding
                    assert domain[0] * (1 - 1e-3) <= v <= domain[1] * (1 + 1e-3), (option, v)
        lrs = np.log10([dict(zip(a[::2], a[1::2]))["--lr"] for a in configs])
        assert lrs.min() < -4.3 and lrs.max() > -3.9       # log-uniform over [1e-5, 3e-4]: both decades drawn
    assert draw_configs("dtp", 3)[0][1] != draw_configs("sdtp", 3)[0][1]   # a stream per method


def test_search_trains_the_best_screened_configuration_once_the_screen_is_done(tmp_path, monkeypatch):
    """The best-<rule> row appears only when every screen run of that rule has finished, and
    carries the configuration whose mean validation error over the last 5 epochs is lowest
    (not the one with the best single epoch or the best test error)."""
    from gait_ref import hparam_search
    from gait_ref.reproduce import search_ranking
    monkeypatch.setitem(hparam_search.N_CONFIGS, "sdtp", 3)
    monkeypatch.setitem(hparam_search.N_CONFIGS, "dtp", 2)
    runs = table_runs("bartunov-search", False, tmp_path)
    assert sorted(runs) == ["screen-dtp-00", "screen-dtp-01", "screen-sdtp-00", "screen-sdtp-01", "screen-sdtp-02"]
    d = tmp_path / "bartunov-search"
    e = hparam_search.SCREEN_EPOCHS
    # sdtp-00: one excellent epoch, worse on average; sdtp-01: the best mean of the last 5
    _fake_run(d / "screen-sdtp-00", [0.99] * e, [0.90] * (e - 1) + [0.999], early_stop=False)
    _fake_run(d / "screen-sdtp-01", [0.90] * e, [0.97] * e, early_stop=False)
    _fake_run(d / "screen-sdtp-02", [0.99] * (e - 1), [0.98] * (e - 1), early_stop=False)   # one epoch short
    _fake_run(d / "screen-dtp-00", [0.9] * e, [0.95] * e, early_stop=False)
    runs = table_runs("bartunov-search", False, tmp_path)
    assert "best-sdtp" not in runs and "best-dtp" not in runs
    assert "- sdtp screen: 2 of 3 configurations finished here" in "\n".join(search_ranking(d, runs))
    _fake_run(d / "screen-sdtp-02-tmp", [0.99] * e, [0.96] * e, early_stop=False)
    import shutil
    shutil.rmtree(d / "screen-sdtp-02")
    (d / "screen-sdtp-02-tmp").rename(d / "screen-sdtp-02")
    runs = table_runs("bartunov-search", False, tmp_path)
    best = runs["best-sdtp"]
    assert best[best.index("--rule") + 1] == "sdtp" and best[best.index("--patience") + 1] == 10
    assert best[best.index("--epochs") + 1] == 100
    cfg = runs["screen-sdtp-01"][runs["screen-sdtp-01"].index("--seed") + 2:]      # the drawn options
    assert cfg[0] == "--lr" and best[-len(cfg):] == cfg
    assert "best-dtp" not in runs
    lines = search_ranking(d, runs)
    assert lines[lines.index("- sdtp screen: 3 of 3 configurations finished here; best by mean validation "
                             "error % over the last 5 epochs:") + 1].startswith("  - screen-sdtp-01: 3.00 (`--lr ")
