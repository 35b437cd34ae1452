"""Host-device traffic and rate of training steps, through the real training loop.

    python bench/device_traffic.py [--backend cupy|emulated|numpy] [--rule gait] [--arch conv7]
                                   [--task synthetic|imagenet --data SHARDS] [--steps 30] [--batch 64]

Runs ``Trainer`` for ``--steps`` steps and prints, for the steps that do not log:
  - explicit device-to-host reads per step, counted where gait_ref reads
    (``backend.to_numpy`` / ``read_scalars``); on ``emulated`` also every implicit one
    (``float()``, ``bool()``, boolean masks...) and the host-to-device copies per step;
  - the training rate (global images/s, from the run's own step timer and wall time).
On a GPU, the emulator's proof that there are no implicit reads carries over: the
explicit count is the count.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gait_ref import backend, emulation  # noqa: E402
from gait_ref.config import Config  # noqa: E402
from gait_ref.runfolder import read_records  # noqa: E402
from gait_ref.train import Trainer  # noqa: E402


@click.command()
@click.option("--backend", "name", default="emulated", type=click.Choice(["numpy", "cupy", "emulated"]))
@click.option("--rule", default="gait")
@click.option("--arch", default=None)
@click.option("--task", default="synthetic")
@click.option("--data", default=None)
@click.option("--steps", default=30, show_default=True)
@click.option("--batch", default=64, show_default=True)
@click.option("--loader-workers", default=0, show_default=True)
def main(name, rule, arch, task, data, steps, batch, loader_workers):
    rows = []
    last = {"reads": backend.host_reads["calls"], **emulation.counters, "t": time.perf_counter()}

    def on_step(step, logged):
        now = {"reads": backend.host_reads["calls"], **emulation.counters, "t": time.perf_counter()}
        rows.append({"step": step, "logged": logged, **{k: now[k] - last[k] for k in now}})
        last.update(now)

    with tempfile.TemporaryDirectory() as out:
        cfg = Config(task=task, data=data, arch=arch, rule=rule, backend=name, batch_size=batch, max_steps=steps,
                     log_every=10, quiet=True, out=out, eval_subset=batch, loader_workers=loader_workers)
        Trainer(cfg).run(on_step=on_step)
        recs = read_records(out)
    quiet = [r for r in rows[1:] if not r["logged"]]
    train = [r for r in recs if r["split"] == "train"]
    print(f"{rule} on {cfg.resolved().arch}, {task}, backend {name}, batch {batch}: {len(quiet)} of {len(rows)} "
          f"steps did not log")
    print(f"explicit device-to-host reads per non-logging step: max {max(r['reads'] for r in quiet)}, "
          f"mean {np.mean([r['reads'] for r in quiet]):.2f}")
    if name == "emulated":
        syncs = [r["d2h"] + r["sync"] for r in quiet]
        print(f"all device-to-host reads and syncs per non-logging step (emulated): max {max(syncs)}; "
              f"host-to-device copies: max {max(r['h2d'] for r in quiet)}, "
              f"{np.mean([r['h2d_bytes'] for r in quiet]) / 2**20:.2f} MiB per step")
    print(f"step time {np.mean([r['step_time_s'] for r in train]) * 1e3:.1f} ms, data wait "
          f"{np.mean([r['data_wait_s'] for r in train]) * 1e3:.2f} ms, "
          f"{np.mean([r['images_per_s'] for r in train]):.0f} images/s (train records)")


if __name__ == "__main__":
    main()
