"""Data-parallel scaling on this machine: images/s at 1 and 2 MPI ranks, and the all-reduce
against the step's compute, so that scaling on a cluster can be predicted.

    python bench/distributed.py [--ranks 1,2] [--repeats 2] [--batch 64] [--steps 6] [--rule gait]

For each world size (interleaved: 1, 2, 1, 2), launches ``mpirun -n N`` on this script in
worker mode, which times ``--steps`` training steps of the conv7 network at 64 px
(global batch ``--batch``, split over the ranks) with the real training step
(``gait_ref.step.TrainStep`` and the MPI communicator), after one warm-up step. Workers
also time the all-reduce alone on a buffer of the step's size. Reports images/s, the
scaling efficiency (rate at N / (N x rate at 1)), the bytes all-reduced per step and the
all-reduce's share of the step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(batch: int, steps: int, rule: str) -> None:
    from gait_ref.assembly import build_step
    from gait_ref.backend import blas_info
    from gait_ref.config import Config
    from gait_ref.distributed import MPIComm
    comm = MPIComm(timeout=600)
    local = batch // comm.size
    step = build_step(Config(task="imagenet", arch="conv7", rule=rule, batch_size=batch), (3, 64, 64), 1000, np, comm)
    net = step.net
    rng = np.random.default_rng(comm.rank)
    x = rng.random((local, 3, 64, 64)).astype(np.float32)
    y = rng.integers(0, 1000, local)
    kw = dict(epoch=0, n_total=batch, start=comm.rank * local)
    step(x, y, step=1, **kw)                                      # warm-up
    comm.barrier()
    t = time.perf_counter()
    for i in range(steps):
        step(x, y, step=i + 2, **kw)
    comm.barrier()
    dt = (time.perf_counter() - t) / steps
    # loss, correct, non-finite outputs per layer; the norms of each exact inverse's solve (cond_max check)
    n_scalars = 2 + len(net) + (2 * sum(1 for l in net.layers[1:] if l.square) if hasattr(step.rule, "refined") else 0)
    n_bytes = sum(v.nbytes for v in net.parameters().values()) + 4 * n_scalars
    buf = np.ones(n_bytes // 4, np.float32)
    comm.barrier()
    t = time.perf_counter()
    for _ in range(5):
        comm.allreduce_sum([buf])
    ar = (time.perf_counter() - t) / 5
    if comm.is_root:
        print(json.dumps({"ranks": comm.size, "step_s": dt, "images_per_s": batch / dt, "allreduce_bytes": n_bytes,
                          "scalars": n_scalars,
                          "allreduce_s": ar if comm.size > 1 else 0.0,
                          "blas": [f"{b['internal_api']} {b['version']} ({b['architecture']}) {b['num_threads']} "
                                   f"threads" for b in blas_info()]}), flush=True)
    comm.close()


def launch(n: int, batch: int, steps: int, rule: str) -> dict:
    mpirun = Path(sys.executable).with_name("mpirun")
    cmd = [str(mpirun) if mpirun.exists() else "mpirun", "-n", str(n), sys.executable, __file__, "--worker",
           "--batch", str(batch), "--steps", str(steps), "--rule", rule]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"mpirun -n {n} failed:\n{res.stderr[-2000:]}")
    return json.loads([l for l in res.stdout.splitlines() if l.startswith("{")][-1])


@click.command()
@click.option("--ranks", default="1,2", show_default=True)
@click.option("--repeats", default=2, show_default=True)
@click.option("--batch", default=64, show_default=True, help="Global batch (divided among the ranks).")
@click.option("--steps", default=6, show_default=True)
@click.option("--rule", default="gait", show_default=True)
@click.option("--worker", "worker_mode", is_flag=True, hidden=True)
def main(ranks, repeats, batch, steps, rule, worker_mode):
    if worker_mode:
        return worker(batch, steps, rule)
    sizes = [int(r) for r in ranks.split(",")]
    runs = {n: [] for n in sizes}
    for _ in range(repeats):                                      # interleaved: 1, 2, 1, 2
        for n in sizes:
            runs[n].append(launch(n, batch, steps, rule))
    first = runs[sizes[0]][0]
    print(f"conv7 at 64 px, {rule}, float32, global batch {batch}, numpy backend; {os.cpu_count()} CPUs")
    for n in sizes:
        print(f"  {n} rank(s): BLAS per rank: {'; '.join(runs[n][0]['blas'])}")
    base = np.median([r["images_per_s"] for r in runs[sizes[0]]]) * sizes[0]
    for n in sizes:
        rate = float(np.median([r["images_per_s"] for r in runs[n]]))
        step = float(np.median([r["step_s"] for r in runs[n]]))
        ar = float(np.median([r["allreduce_s"] for r in runs[n]]))
        each = ", ".join(f"{r['images_per_s']:.1f}" for r in runs[n])
        print(f"{n} rank(s): {rate:7.1f} images/s (runs: {each}), "
              f"step {step * 1e3:.0f} ms, scaling efficiency {rate / (base * n / sizes[0]):.2f}"
              + (f", all-reduce {ar * 1e3:.1f} ms = {ar / step:.1%} of the step" if n > 1 else ""))
    mb = first["allreduce_bytes"] / 2**20
    print(f"all-reduced per step: {first['allreduce_bytes']:,} bytes ({mb:.2f} MiB: every update once, plus "
          f"{first['scalars']} scalars). A ring all-reduce moves about 2 (N-1)/N of that per rank: at 10 GB/s that is "
          f"{2 * mb * 2**20 / 10e9 * 1e3:.2f} ms per step against the step's compute above.")


if __name__ == "__main__":
    main()
