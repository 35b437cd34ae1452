"""Shard jobs shared by both packers: resumable, atomic, with per-shard reports.

Work is split into shards deterministically (shard i always holds the same source
items). After a shard file is written (atomically, by gait_ref.data.shards), a small
sidecar ``<shard>.json`` records its manifest entry and any bad inputs. A rerun
skips every shard whose sidecar exists, and the manifest is assembled from the
sidecars at the end, so a killed run continues where it stopped.
"""
from __future__ import annotations

import json
import os
from multiprocessing import get_context
from pathlib import Path

from gait_ref.data.shards import FORMAT, VERSION, write_manifest, write_shard


def sidecar(dst: Path, shard_name: str) -> Path:
    return dst / f"{shard_name}.json"


def write_sidecar(dst: Path, shard_name: str, entry: dict, report: list) -> None:
    path = sidecar(dst, shard_name)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"entry": entry, "report": report}))
    os.replace(tmp, path)


def pack_shard(dst: Path, shard_name: str, images, labels, report, compression) -> dict:
    entry = write_shard(dst / shard_name, images, labels, compression=compression) if len(images) else None
    write_sidecar(dst, shard_name, entry, report)
    return {"entry": entry, "report": report}


def run_jobs(func, jobs, workers: int, desc: str, quiet: bool):
    """Run shard jobs in a process pool (``workers`` processes), with a progress bar."""
    from tqdm import tqdm
    results = []
    bar = tqdm(total=len(jobs), desc=desc, unit="shard", disable=quiet)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(func(job))
            bar.update(1)
    else:
        with get_context("spawn").Pool(workers) as pool:
            for r in pool.imap_unordered(func, jobs):
                results.append(r)
                bar.update(1)
    bar.close()
    return results


def assemble_manifest(dst: Path, split_shards: dict, image_shape, classes, extra: dict) -> dict:
    """Build manifest.json from the sidecars; returns {'manifest', 'report'}."""
    splits, report = {}, []
    for split, names in split_shards.items():
        entries = []
        for name in names:
            side = json.loads(sidecar(dst, name).read_text())
            report.extend(side["report"])
            if side["entry"]:
                entries.append(side["entry"])
        splits[split] = entries
    manifest = {"format": FORMAT, "version": VERSION, "layout": "NHWC", "image_shape": list(image_shape),
                "classes": classes, "splits": splits, **extra}
    write_manifest(dst, manifest)
    return {"manifest": manifest, "report": report}


def write_report(dst: Path, report: list, quiet: bool) -> None:
    """prep_log.txt: one line per reported input; a summary on stdout."""
    lines = [f"{r['kind']}\t{r['file']}\t{r['reason']}" for r in report]
    tmp = dst / "prep_log.txt.tmp"
    tmp.write_text("\n".join(lines) + ("\n" if lines else ""))
    os.replace(tmp, dst / "prep_log.txt")
    if not quiet:
        skipped = sum(r["kind"] == "skipped" for r in report)
        converted = sum(r["kind"] == "converted" for r in report)
        print(f"{skipped} file(s) skipped, {converted} converted to RGB; details in {dst / 'prep_log.txt'}")
        for r in report:
            if r["kind"] == "skipped":
                print(f"  skipped {r['file']}: {r['reason']}")
