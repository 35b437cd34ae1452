"""Each sample's target jump ||t_l - y_l|| in DTP-family runs, split by correctly and wrongly
classified images (docs/RESULTS.md, section 4b-ii).

    python bench/target_jumps.py runs/bartunov/fc-sdtp-step1 runs/bartunov/fc-dtp-alpha2.5 ...

The runs must have logged ``target_jump`` (``--angles-every N``: every measuring step logs,
per top and bottom hidden layer, the medians over the batch's correct and wrong samples).
Prints, per run and layer, the median of those medians over the run's measuring steps
(over the first and the second half of training apart), and the run's last train error
and its test error at the best validation epoch.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gait_ref.runfolder import read_records  # noqa: E402


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def summarise(run: Path) -> list[str]:
    recs = read_records(run)
    meas = [r for r in recs if "target_jump" in r]
    if not meas:
        return [f"{run.name}: no target_jump records (run with --angles-every N)"]
    halves = {"first half": meas[:len(meas) // 2] or meas, "second half": meas[len(meas) // 2:]}
    train = [r for r in recs if r["split"] == "train"]
    val = [r for r in recs if r["split"] == "val"]
    test = {r["epoch"]: r for r in recs if r["split"] == "test"}
    best = max(val, key=lambda r: r["top1"]) if val else None
    head = f"{run.name}: {len(meas)} measuring steps; last train error {100 * (1 - train[-1]['top1']):.2f}%"
    if best is not None and best["epoch"] in test:
        head += f", test error at the best val epoch {100 * (1 - test[best['epoch']]['top1']):.2f}%"
    lines = [head]
    for layer in meas[0]["target_jump"]:
        cells = []
        for name, part in halves.items():
            c = _median([r["target_jump"][layer]["correct"] for r in part])
            w = _median([r["target_jump"][layer]["wrong"] for r in part])
            cells.append(f"{name}: correct {c:.3g}, wrong {w:.3g} (ratio {w / c:.0f})")
        lines.append(f"  {layer}: " + "; ".join(cells))
    return lines


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print("\n".join(summarise(Path(arg))))
