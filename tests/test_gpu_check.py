"""The GPU checklist in its quick mode on the emulated device: every step runs, so the
checklist a GPU host runs first cannot rot unnoticed (bench/gpu_check.sh had stopped on
every machine, and nothing ran it)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_checklist_runs_every_step_on_the_emulated_device(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--backend", "emulated", "--quick",
                          "--out", str(tmp_path / "check")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "check" / "summary.txt").read_text()
    assert res.returncode == 0, summary + res.stdout[-2000:] + res.stderr[-2000:]
    steps = [line.split(":")[0] for line in summary.splitlines()[1:]]
    assert steps == ["smoke", "tests", "compare", "resume", "traffic", "launches", "model", "loader", "row-solve"], \
        summary
    assert all(": ok in " in line for line in summary.splitlines()[1:]), summary
    assert "records identical" in (tmp_path / "check" / "resume.log").read_text()
    assert '"gait float32"' in (tmp_path / "check" / "compare.log").read_text()
    model = json.loads((tmp_path / "check" / "model.json").read_text())
    assert {r["rule"] for r in model} == {"bp", "gait"} and all(r["step_ms"] > 0 and r["measured_ms"] > 0 for r in model)
    assert "launches per training step" in (tmp_path / "check" / "launches.log").read_text()


def test_the_full_checklist_fits_eight_minutes_of_device_time():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    full = gpu_check.steps("cupy", False, Path("/nowhere"))
    assert sum(limit for _, _, limit in full) <= 8 * 60
    assert [name for name, _, _ in full][:5] == ["shards", "smoke", "tests", "compare", "resume"]
