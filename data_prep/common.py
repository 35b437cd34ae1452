"""Shard jobs shared by both packers: resumable, atomic, with per-shard reports.

Work is split into shards deterministically (shard i always holds the same source
items). After a shard file is written (atomically, by gait_ref.data.shards), a small
sidecar ``<shard>.json`` records its manifest entry and any bad inputs. A rerun
skips every shard whose sidecar exists and whose file still matches it (size and
SHA-256: a deleted or damaged shard is packed again), and the manifest is assembled
from the sidecars at the end, so a killed run continues where it stopped.

A rerun must pack the same thing: ``prep_options.json`` records the packing options and
a hash of the sorted input list, and a rerun with different ones is refused (or, with
``--overwrite``, starts again in an emptied folder).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from gait_ref.data.shards import FORMAT, VERSION, sha256_file, write_manifest, write_shard


class PrepError(ValueError):
    pass


# what a packer writes, and so what --overwrite may delete: shards are <split>-NNNNN.h5 (a run
# folder's checkpoints, last.h5 and the like, are not)
OUTPUTS = re.compile(r"^([a-z]+-\d{5}\.h5(\.json)?|manifest\.json|prep_log\.txt|prep_options\.json)(\.tmp)?$")


def inputs_digest(items) -> str:
    """SHA-256 of the sorted (split, source, label) list: what the shards are made of."""
    h = hashlib.sha256()
    for item in sorted(map(repr, items)):
        h.update(item.encode())
        h.update(b"\n")
    return h.hexdigest()


def prepare_destination(dst: Path, options: dict, overwrite: bool) -> None:
    """Create ``dst`` (a one-line PrepError if it cannot be written) and check that a rerun
    packs with the same options and inputs as the run that started it."""
    if dst.exists() and not dst.is_dir():
        raise PrepError(f"{dst}: exists and is not a folder")
    try:
        dst.mkdir(parents=True, exist_ok=True)
        probe = dst / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PrepError(f"{dst}: cannot write there ({e.strerror or e})") from None
    record = dst / "prep_options.json"
    if overwrite:
        for f in dst.iterdir():
            if f.is_file() and OUTPUTS.match(f.name):
                f.unlink()
    elif record.exists():
        try:
            old = json.loads(record.read_text())
            if not isinstance(old, dict):
                raise ValueError(f"a {type(old).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as e:
            raise PrepError(f"{record}: unreadable ({' '.join(str(e).split())[:120]}); pass --overwrite to pack "
                            "again") from None
        diff = [f"{k} {old.get(k)!r} -> {options.get(k)!r}" for k in sorted(set(old) | set(options))
                if old.get(k) != options.get(k)]
        if diff:
            raise PrepError(f"{dst} was packed with other options or inputs ({'; '.join(diff)}); rerun with the "
                            "same options to resume, or pass --overwrite to pack it again")
    elif any(dst.glob("*.h5.json")):
        raise PrepError(f"{dst} holds shards with no record of the options they were packed with; "
                        "pass --overwrite to pack it again")
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(options, indent=1))
    os.replace(tmp, record)


def shard_done(dst: Path, shard_name: str) -> bool:
    """True when the shard's sidecar exists and its file matches it; otherwise the stale
    sidecar is removed so the shard is packed again."""
    side = sidecar(dst, shard_name)
    if not side.exists():
        return False
    try:
        record = json.loads(side.read_text())
        entry, sources = record["entry"], record.get("sources", {})
    except (ValueError, KeyError, OSError, AttributeError):
        entry, sources = False, {}
    path = dst / shard_name
    ok = sources_unchanged(sources) and (         # the sources' stats first: cheaper than hashing the shard
        entry is None or (isinstance(entry, dict) and path.exists() and path.stat().st_size == entry["bytes"]
                          and sha256_file(path) == entry["sha256"]))
    if not ok:
        side.unlink()
    return ok


def finished(dst: Path, names, workers: int) -> set:
    """Which shards are finished and intact (checked in parallel: hashing releases the GIL)."""
    names = list(names)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return {n for n, done in zip(names, pool.map(lambda n: shard_done(dst, n), names)) if done}


def source_stats(paths) -> dict:
    """{path: [size, mtime_ns]} of the files a shard is packed from (a missing one: None)."""
    out = {}
    for p in paths:
        try:
            st = os.stat(p)
            out[str(p)] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[str(p)] = None
    return out


def sources_unchanged(recorded: dict) -> bool:
    """Whether the files a shard was packed from are still as they were (a source replaced
    under the same name makes a rerun pack its shard again)."""
    return source_stats(recorded) == recorded


def sidecar(dst: Path, shard_name: str) -> Path:
    return dst / f"{shard_name}.json"


def write_sidecar(dst: Path, shard_name: str, entry: dict, report: list, sources: dict) -> None:
    path = sidecar(dst, shard_name)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"entry": entry, "report": report, "sources": sources}))
    os.replace(tmp, path)


def pack_shard(dst: Path, shard_name: str, images, labels, report, compression, sources: dict) -> dict:
    """Write a shard and its sidecar; ``sources`` (``source_stats`` of the files read, taken
    before reading them) lets a rerun notice a source replaced under the same name."""
    entry = write_shard(dst / shard_name, images, labels, compression=compression) if len(images) else None
    write_sidecar(dst, shard_name, entry, report, sources)
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


def _one_line(text) -> str:
    """A field of prep_log.txt: backslashes, tabs and line breaks escaped, so a file name
    cannot forge a record."""
    return str(text).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def write_report(dst: Path, report: list, quiet: bool) -> None:
    """prep_log.txt: one line per reported input; a summary on stdout."""
    lines = [f"{r['kind']}\t{_one_line(r['file'])}\t{_one_line(r['reason'])}" for r in report]
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
