"""The results pipeline's --quick mode: every table's runs for a few steps, then the report."""
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
    gap = table_runs("fmnist-gap", False, tmp_path)
    assert {"bp", "bp-square-ortho100", "gait-ortho100", "gait-ortho1", "gait-ortho100-every4"} <= set(gap)
    assert set(table_runs("vgg", False, tmp_path)) == {"bp", "fa", "dtp", "sdtp", "ldrl"}


@pytest.mark.parametrize("table,only", [
    ("neurips", "mnist-784x4-gait-vanilla,mnist-linear-tp,mnist-tower-bp"),
    ("depth", "mlp-deep-gait,mlp-shallow-fa"),
    ("imagenet20", None),
    ("bartunov", "fc-dtp,fc-bp-seed1"),
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
