"""A GPU cost model of one training step, from what the emulated device counts.

    python bench/gpu_model.py [--configs conv7-64:256,conv7-224:256,mlp-deep:256] [--rules bp,gait]
                              [--card h100-sxm] [--json out.json]

The emulator runs one step as CuPy 14.2 would (``gait_ref.emulation``) and records every
launch: GEMMs with their flops, solver calls with theirs, elementwise kernels and copies
with the bytes they read and write, and the host-device reads and copies. The model
prices each on a named card:

    GEMM           max(flops / (peak x gemm_efficiency), bytes / bandwidth)
    solver call    flops / (fp64 peak x solver_efficiency) + solver_overhead
    elementwise    bytes / (bandwidth x stream_efficiency), at least kernel_floor
    device time    the sum of the above (one stream, kernels in order)
    host time      launches x launch_cost + reads x sync_cost
    step           max(device time, host time) + reads x sync_cost

Host and device overlap (CuPy queues kernels asynchronously) until the host has to wait
for a read; the step's reads are few (``bench/launches.py``), so the step is whichever of
the two is longer. The batch copy runs on its own stream and is listed apart. The card's
figures are parameters (``CARDS``); the efficiencies are assumptions, to be replaced by
what the first GPU measures (``bench/gpu_check.py`` prints the model beside its rates).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from launches import built_step  # noqa: E402

from gait_ref import emulation as em  # noqa: E402

# Peak rates from NVIDIA's H100 datasheet (SXM5): FP32 67 TFLOPS (CUDA cores; CuPy does not
# use TF32 unless CUPY_TF32=1), FP64 tensor core 67 TFLOPS (cuBLAS's DGEMM), FP64 34 TFLOPS,
# HBM3 3.35 TB/s, PCIe gen5 x16 64 GB/s each way. The rest are assumptions.
CARDS = {
    "h100-sxm": dict(fp32_flops=67e12, fp64_gemm_flops=67e12, fp64_flops=34e12, bandwidth=3.35e12, pcie=64e9,
                     gemm_efficiency=0.6, solver_efficiency=0.15, stream_efficiency=0.7, kernel_floor=3e-6,
                     launch_cost=8e-6, sync_cost=15e-6, solver_overhead=60e-6),
    "h200": dict(fp32_flops=67e12, fp64_gemm_flops=67e12, fp64_flops=34e12, bandwidth=4.8e12, pcie=64e9,
                 gemm_efficiency=0.6, solver_efficiency=0.15, stream_efficiency=0.7, kernel_floor=3e-6,
                 launch_cost=8e-6, sync_cost=15e-6, solver_overhead=60e-6),
}


def trace_step(net: str, rule: str, batch: int, steps: int = 3, dtype: str = "float32"):
    """The launch records and counters of step ``steps`` (the earlier ones build the inverses)."""
    step, x, y = built_step(net, rule, batch, dtype)
    for n in range(1, steps + 1):
        em.reset_counters()
        with em.launch_trace() as records:
            step(x, y, step=n, epoch=0)
        counts = em.reset_counters()
    counts["h2d_bytes"] = x.nbytes + y.nbytes            # the step's batch, copied by the loader
    return records, counts


def project(records, counts, card: dict) -> dict:
    """The model's times (seconds) for one step's records on ``card``."""
    gemm = solver = elementwise = 0.0
    gemm_flops = solver_flops = moved = 0
    for r in records:
        if r["kind"] == "gemm":
            peak = card["fp64_gemm_flops"] if r["dtype"] == "float64" else card["fp32_flops"]
            gemm += max(r["flops"] / (peak * card["gemm_efficiency"]), r["bytes"] / card["bandwidth"])
            gemm_flops += r["flops"]
        elif r["kind"] == "solver":
            solver += r["flops"] / (card["fp64_flops"] * card["solver_efficiency"]) + card["solver_overhead"]
            solver_flops += r["flops"]
        else:
            streamed = r["bytes"] / r["launches"] / (card["bandwidth"] * card["stream_efficiency"])
            elementwise += r["launches"] * max(card["kernel_floor"], streamed)
            moved += r["bytes"]
    reads = counts["d2h"] + counts["sync"]
    device = gemm + solver + elementwise
    host = counts["launch"] * card["launch_cost"] + reads * card["sync_cost"]
    return {"launches": counts["launch"], "reads": reads, "gemm_gflop": gemm_flops / 1e9,
            "solver_gflop": solver_flops / 1e9, "elementwise_gb": moved / 1e9,
            "gemm_ms": gemm * 1e3, "solver_ms": solver * 1e3, "elementwise_ms": elementwise * 1e3,
            "device_ms": device * 1e3, "host_ms": host * 1e3,
            "step_ms": (max(device, host) + reads * card["sync_cost"]) * 1e3,
            "batch_copy_ms": counts["h2d_bytes"] / card["pcie"] * 1e3}


def measure_ms(net: str, rule: str, batch: int, backend: str, steps: int = 5, warmup: int = 3,
               dtype: str = "float32") -> float:
    """The mean time of ``steps`` training steps on ``backend`` after ``warmup`` (synchronised)."""
    import time

    from gait_ref.backend import get_backend, synchronize
    xp = get_backend(backend)
    step, x, y = built_step(net, rule, batch, dtype, xp)
    for n in range(1, warmup + 1):
        step(x, y, step=n, epoch=0)
    synchronize(xp)
    t = time.perf_counter()
    for n in range(warmup + 1, warmup + steps + 1):
        step(x, y, step=n, epoch=0)
    synchronize(xp)
    return (time.perf_counter() - t) / steps * 1e3


def model(configs, rules, card_name: str, measure: str | None = None):
    card = CARDS[card_name]
    rows = []
    for cfg in configs:
        net, batch = cfg.split(":")
        for rule in rules:
            records, counts = trace_step(net, rule, int(batch))
            row = {"net": net, "batch": int(batch), "rule": rule, **project(records, counts, card)}
            if measure:
                row["measured_ms"] = measure_ms(net, rule, int(batch), measure)
            rows.append(row)
    return rows


@click.command()
@click.option("--configs", default="conv7-64:256,conv7-224:256,mlp-deep:256", show_default=True,
              help="net:batch, comma-separated")
@click.option("--rules", default="bp,gait", show_default=True)
@click.option("--card", default="h100-sxm", type=click.Choice(sorted(CARDS)), show_default=True)
@click.option("--json", "json_out", default=None, help="Also write the rows to this file.")
@click.option("--measure", default=None, type=click.Choice(["cupy", "numpy", "emulated"]),
              help="Also time each step on this backend (the checklist: cupy) and print it beside the model.")
def main(configs, rules, card, json_out, measure):
    rows = model(configs.split(","), rules.split(","), card, measure)
    print(f"projected step times on {card} ({CARDS[card]}), float32, from the emulated device's counts")
    head = ("net", "batch", "rule", "launches", "reads", "GEMM GF", "solve GF", "elem GB", "GEMM ms", "solve ms",
            "elem ms", "device ms", "host ms", "step ms", "copy ms") + (("measured ms",) if measure else ())
    print(" ".join(f"{h:>10}" for h in head))
    for r in rows:
        vals = (r["net"], r["batch"], r["rule"], r["launches"], r["reads"], f"{r['gemm_gflop']:.1f}",
                f"{r['solver_gflop']:.1f}", f"{r['elementwise_gb']:.2f}", f"{r['gemm_ms']:.2f}",
                f"{r['solver_ms']:.2f}", f"{r['elementwise_ms']:.2f}", f"{r['device_ms']:.2f}", f"{r['host_ms']:.2f}",
                f"{r['step_ms']:.2f}", f"{r['batch_copy_ms']:.2f}") + ((f"{r['measured_ms']:.2f}",) if measure else ())
        print(" ".join(f"{v:>10}" for v in vals))
    if measure:
        print(f"measured: mean of 5 steps after 3 on --backend {measure}, synchronised; the model is for {card}")
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
