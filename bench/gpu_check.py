"""The GPU checklist: what to run first on a machine with a GPU, in order of what matters
most if it is cut short, each step with its own time limit, everything in one folder.

    python bench/gpu_check.py [--out gpu-check] [--backend cupy]        # on a GPU host: at most 8 minutes
    python bench/gpu_check.py --backend emulated --quick --out DIR      # the same steps, small, on the CPU

It needs no network and no data set: when ``import cupy`` works it installs nothing (a
GPU host whose Python already has CuPy, h5py, scipy, pytest, hypothesis and click); else
it installs the ``gpu`` extra into the active environment with ``python -m pip``. The
full mode packs 64 px shards from random images first (``shards``), for the conv7 steps.
Steps, most important first:

1. smoke      the backend loads and runs a GEMM, an LU solve, a kernel and an RNG draw
2. tests      the test suite's GPU tests (``-m gpu``)
3. compare    GP's and BP's updates and angles on the device against the numpy backend,
              float64 and float32, on the same weights and batch
4. resume     train, stop, resume: the records equal an uninterrupted run's, bit for bit
5. traffic    host reads and copies per step (``bench/device_traffic.py``)
6. launches   kernel launches and CuPy's internal reads per step, as the emulator counts
              them for CuPy 14.2 (``bench/launches.py``; the same on any host)
7. model      BP and GP step times on the device beside the cost model's projection for
              the card (``bench/gpu_model.py --measure``; conv7 at 64 px and the deep MLP,
              batch 256)
8. loader     the shard loader's rate (``bench/loader.py``)
9. row-solve  float64 row solves against the residual (``bench/row_solve.py``)

Each step stops at its time limit; the full mode's limits add up to 8 minutes. The test
suite runs the quick mode on the emulated device (tests/test_gpu_check.py), so
the checklist cannot rot unnoticed. OUT/summary.txt lists each step's status and time;
OUT/<step>.log holds its output. The exit status is 1 when any step failed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def steps(backend: str, quick: bool, out: Path) -> list:
    """(name, argv, time limit in seconds) in order of importance."""
    py = [sys.executable]
    shards = out / "shards"
    big = [] if quick else [                      # 64 px shards from random images, for the conv7 steps
        ("shards", py + [str(ROOT / "bench/loader.py"), "--pack-only", str(shards), "--images", "8192",
                         "--per-shard", "256"], 40)]
    on_shards = [] if quick else ["--task", "imagenet", "--data", str(shards), "--arch", "conv7"]
    return big + [
        ("smoke", py + [__file__, "--step", "smoke", "--backend", backend], 30),
        ("tests", py + ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 70),
        ("compare", py + [__file__, "--step", "compare", "--backend", backend] + (["--quick"] if quick else []), 40),
        ("resume", py + [__file__, "--step", "resume", "--backend", backend, "--out", str(out / "resume")]
         + (["--quick"] if quick else []), 60),
        ("traffic", py + [str(ROOT / "bench/device_traffic.py"), "--backend", backend, "--steps", "4" if quick else "30",
                          "--batch", "8" if quick else "256"] + on_shards, 45),
        ("launches", py + [str(ROOT / "bench/launches.py")] + (["--nets", "mlp-shallow"] if quick else []), 30),
        ("model", py + [str(ROOT / "bench/gpu_model.py"), "--measure", "numpy" if backend == "emulated" else backend,
                        "--configs", "mlp-shallow:8" if quick else "conv7-64:256,mlp-deep:256",
                        "--json", str(out / "model.json")], 80),
        ("loader", py + [str(ROOT / "bench/loader.py"), "--backend", backend, "--images", "256" if quick else "8192",
                         "--per-shard", "64" if quick else "256", "--workers", "0" if quick else "0,2,4",
                         "--batch", "16" if quick else "256", "--repeats", "1"] + ([] if quick else ["--data", str(shards)]),
         40),
        ("row-solve", py + [str(ROOT / "bench/row_solve.py"), "--backend", "numpy" if backend == "emulated" else backend,
                            "--px", "64", "--repeats", "1" if quick else "3"] if quick else
         py + [str(ROOT / "bench/row_solve.py"), "--backend", backend, "--repeats", "3"], 45),
    ]


def install_if_needed(backend: str, out: Path) -> str:
    if backend != "cupy":
        return "nothing to install (emulated or numpy backend)"
    try:
        import cupy  # noqa: F401
        return "cupy is importable: nothing installed"
    except ImportError:
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[gpu,test]"],
                             capture_output=True, text=True)
        (out / "install.log").write_text(res.stdout + res.stderr)
        return "installed the gpu extra" if res.returncode == 0 else "the install failed (install.log)"


def run_checklist(backend: str, quick: bool, out: Path) -> bool:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines = [f"gpu_check: backend {backend}{' (quick)' if quick else ''}; {install_if_needed(backend, out)}"]
    ok = True
    for name, argv, limit in steps(backend, quick, out):
        t = time.perf_counter()
        try:
            res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            log, status = res.stdout + res.stderr, "ok" if res.returncode in (0, 5) else f"FAILED ({res.returncode})"
        except subprocess.TimeoutExpired as e:
            log = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            status = f"TIMED OUT after {limit} s"
        (out / f"{name}.log").write_text(log)
        ok = ok and status == "ok"
        lines.append(f"{name}: {status} in {time.perf_counter() - t:.1f} s")
        print(lines[-1], flush=True)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return ok


# ---- the steps that are this script's own ----------------------------------------------------------------
def smoke(backend: str) -> None:
    from gait_ref.backend import get_backend
    xp = get_backend(backend)                     # runs the smoke test on cupy
    print(f"backend {backend}: {getattr(xp, '__version__', '')} ok")


def compare(backend: str, quick: bool) -> None:
    """GP and BP updates on the device against numpy's from the same weights and batch: the
    largest normwise relative difference per rule and dtype, and the angles to BP."""
    from gait_ref.assembly import build_step
    from gait_ref.backend import get_backend, to_device, to_numpy
    from gait_ref.config import Config
    from gait_ref.metrics import compare_updates
    from gait_ref.rules import make_rule
    xp = get_backend(backend)
    arch, shape, batch = ("mlp-64x2", (1, 8, 8), 16) if quick else ("conv7", (3, 64, 64), 64)
    rng = np.random.default_rng(0)
    x, y = rng.random((batch,) + shape), rng.integers(0, 10, batch)
    worst = {}
    for dtype, tol in (("float64", 1e-9), ("float32", 1e-3)):
        for rule in ("gait", "bp"):
            grads = {}
            for where, m in (("host", np), ("device", xp)):
                step = build_step(Config(task="synthetic", arch=arch, rule=rule, dtype=dtype, square_net=True), shape,
                                  10, m)
                tr = step.net.forward(to_device(x.astype(dtype), m))
                _, gy = step.loss.value_and_grad(tr.output, to_device(y, m))
                g = step.rule.compute(tr, gy)[0]
                bp = make_rule("bp", step.net).compute(tr, gy)[0]
                angles = {k: v["angle_deg"] for k, v in compare_updates(step.net, g, bp).items()}
                grads[where] = ([{k: to_numpy(v) for k, v in layer.items()} for layer in g], angles)
            (gh, ah), (gd, ad) = grads["host"], grads["device"]
            diff = max(np.linalg.norm(d[k] - h[k]) / max(np.linalg.norm(h[k]), 1e-30)
                       for h, d in zip(gh, gd) for k in h)
            worst[f"{rule} {dtype}"] = float(diff)
            print(f"{rule} {dtype}: largest relative difference device/host {diff:.2e} (tolerance {tol:g}); "
                  f"angles to BP host {max(ah.values()):.3g}, device {max(ad.values()):.3g} deg", flush=True)
            if not diff <= tol:
                raise SystemExit(f"{rule} {dtype}: the device's updates differ from numpy's by {diff:.2e}")
    print(json.dumps(worst))


def resume(backend: str, quick: bool, out: Path) -> None:
    """10 steps, then a resume to 20, against 20 steps at once: the same records."""
    from gait_ref.config import Config
    from gait_ref.meter import TIMING_FIELDS
    from gait_ref.runfolder import read_records
    from gait_ref.train import Trainer
    common = dict(task="synthetic", rule="gait", backend=backend, batch_size=20 if quick else 64, log_every=5,
                  quiet=True)
    n = 10 if quick else 40
    Trainer(Config(**common, max_steps=2 * n, out=str(out / "a"))).run()
    Trainer(Config(**common, max_steps=n, out=str(out / "b"))).run()
    Trainer(Config(**common, max_steps=2 * n, out=str(out / "b"), resume=True)).run()
    strip = [[{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_records(out / d)] for d in "ab"]
    if strip[0] != strip[1]:
        raise SystemExit("a resumed run's records differ from an uninterrupted run's")
    print(f"resume: {len(strip[0])} records identical after {n} + {n} steps against {2 * n}")


@click.command()
@click.option("--out", default="gpu-check", show_default=True, type=click.Path())
@click.option("--backend", default="cupy", type=click.Choice(["cupy", "emulated", "numpy"]))
@click.option("--quick", is_flag=True, help="Small sizes (the test suite runs this on the emulated device).")
@click.option("--step", "only", hidden=True)
def main(out, backend, quick, only):
    if only == "smoke":
        return smoke(backend)
    if only == "compare":
        return compare(backend, quick)
    if only == "resume":
        return resume(backend, quick, Path(out))
    sys.exit(0 if run_checklist(backend, quick, Path(out).resolve()) else 1)


if __name__ == "__main__":
    main()
