"""Assemble docs/RESULTS.md: the prose below plus `python -m gait_ref.reproduce report`.

    python docs/results_text.py            # after the runs of gait_ref.reproduce
"""
import subprocess
import sys
from pathlib import Path

HEAD = Path(__file__).with_name("RESULTS_head.md").read_text()
TAIL = Path(__file__).with_name("RESULTS_tail.md").read_text()

if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "gait_ref.reproduce", "report", "--root", "runs", "--docs", "docs"],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    out = out.replace(" --angles-every 100", "")
    (root / "docs" / "RESULTS.md").write_text(HEAD + out + "\n" + TAIL)
    print("wrote docs/RESULTS.md")
