"""Summarise DTP-family runs (``bench/dtp_family_mnist.sh``) as a markdown table.

    python bench/dtp_family_table.py runs/dtp-mnist

Per run: final test top-1, the mean over hidden layers of the angle to BP at the first
and last measurement, the mean Jacobian-matching error of the learned feedback at the
first and last measurement, and the wall time. Figures come from metrics.jsonl only.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gait_ref.runfolder import read_records  # noqa: E402


def summarise(run: Path) -> dict | None:
    try:
        recs = read_records(run)
    except FileNotFoundError:
        return None
    test = [r for r in recs if r["split"] == "test"]
    meas = [r for r in recs if "angles_deg" in r]
    if not test or not meas:
        return None

    def hidden_angle(r):
        a = [v for k, v in r["angles_deg"].items() if k != "out"]
        return float(np.nanmean(a))

    def jac(r):
        j = r.get("jacobian_error") or {}
        return float(np.mean(list(j.values()))) if j else float("nan")

    return {"run": run.name, "top1": test[-1]["top1"], "steps": test[-1]["step"], "epochs": test[-1]["epoch"],
            "angle0": hidden_angle(meas[0]), "angle1": hidden_angle(meas[-1]),
            "jac0": jac(meas[0]), "jac1": jac(meas[-1]), "wall_s": test[-1].get("wall_time_s", float("nan"))}


def main(root: str) -> None:
    rows = [s for s in (summarise(p) for p in sorted(Path(root).iterdir()) if p.is_dir()) if s]
    print("| run | epochs | steps | test top-1 | hidden-layer angle to BP, first -> last (deg) "
          "| Jacobian-matching error, first -> last | wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        jac = "-" if np.isnan(r["jac0"]) else f"{r['jac0']:.2f} -> {r['jac1']:.2f}"
        print(f"| {r['run']} | {r['epochs']} | {r['steps']} | {100 * r['top1']:.2f}% | "
              f"{r['angle0']:.1f} -> {r['angle1']:.1f} | {jac} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/dtp-mnist")
