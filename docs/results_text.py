"""Assemble docs/RESULTS.md: RESULTS_head.md, the tables in docs/tables/, RESULTS_tail.md.

    python docs/results_text.py                   # every table whose runs exist under runs/
    python docs/results_text.py bartunov fmnist-gap   # only these tables

Each table's markdown comes from `python -m gait_ref.reproduce report --table T` and is
kept in docs/tables/T.md, so a machine that holds the runs of only some tables
regenerates those and leaves the others as they were recorded.
"""
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent


def table_markdown(table: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gait_ref.reproduce", "report", "--root", "runs", "--docs", "docs",
                          "--table", table], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.replace(" --angles-every 100", "").strip()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from gait_ref.reproduce import TABLES
    wanted = sys.argv[1:] or [t for t in TABLES if (ROOT / "runs" / t).is_dir()]
    for table in wanted:
        if table not in TABLES:
            sys.exit(f"unknown table {table!r}; choose from {', '.join(TABLES)}")
        md = table_markdown(table)
        if md:
            (DOCS / "tables" / f"{table}.md").write_text(md + "\n")
            print(f"regenerated docs/tables/{table}.md")
        else:
            print(f"{table}: no runs under runs/{table}, docs/tables/{table}.md left as it was")
    tables = [(DOCS / "tables" / f"{t}.md").read_text() for t in TABLES if (DOCS / "tables" / f"{t}.md").exists()]
    head = (DOCS / "RESULTS_head.md").read_text()
    tail = (DOCS / "RESULTS_tail.md").read_text()
    (DOCS / "RESULTS.md").write_text(head + "\n" + "\n".join(tables) + "\n" + tail)
    print("wrote docs/RESULTS.md")
