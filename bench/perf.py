"""Performance benchmarks (issue: GAIT-prop at the cost of backprop). Prints its figures.

    python bench/perf.py [--quick] [--backend numpy|cupy] [--only ratio,float32,gemm,torch,memory,data]

ratio    one full training step (forward, rule, orthogonality term, Adam) of normalized
         GP and of BP on the same square network, backend, dtype and batch; and BP on
         the ordinary (non-square) network. Target: GP/BP <= 1.3. A profile of the GP
         step (cProfile, top functions) shows where the time goes.
float32  GP's angle to BP in float32 (difference form) against float64, at initialisation
         and after 100 training steps (weights trained in float64, then cast): target
         |angle32 - angle64| <= 0.1 degree for every layer.
gemm     a BP step of the conv net in GFLOP/s from an honest FLOP count (3 GEMMs per
         layer: forward, input gradient, weight gradient; 2 M K N each), against the
         float32 GEMM rate of a square matmul measured in the same run. Target >= 50%.
torch    BP forward + backward on the identical networks with PyTorch CPU (optional:
         pip install torch==2.13.0). Target: ours <= 1.5x torch.
memory   peak memory allocated during one step (tracemalloc sees numpy's buffers), GP
         against BP on the same network. Target GP <= 1.5x BP.
data     images/s read from 64 px HDF5 shards (random order, through BatchLoader with
         its prefetch thread) against images/s of one CPU GP training step of the conv
         net. Target >= 5x.

Networks: the deep CIFAR MLP (six hidden layers of 1024, batch 256) and the ImageNet
conv net at 64 px (batch 64). Inputs are the real Fashion-MNIST images (MLP, tiled to
3x32x32 is not needed: the MLP is built for the data's shape) and the 20 real ImageNet
photos of the foolbox wheel (conv net), so activations are those of real images.
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import timed  # noqa: E402

from gait_ref.architectures import build  # noqa: E402
from gait_ref.backend import get_backend, synchronize, to_device, to_numpy  # noqa: E402
from gait_ref.losses import SoftmaxCrossEntropy  # noqa: E402
from gait_ref.metrics import compare_updates  # noqa: E402
from gait_ref.optim import Adam  # noqa: E402
from gait_ref.orthogonality import add_ortho_grads  # noqa: E402
from gait_ref.rules import make_rule  # noqa: E402

TARGET = ("tp", "itp", "gait-vanilla", "gait")


def real_batch(name, batch, rng):
    """Real images: Fashion-MNIST for the MLP, the 20 ImageNet photos (64 px) for the conv net."""
    if name == "mlp-deep":
        from gait_ref.data.packaged import load_packaged
        (x, y), _ = load_packaged("fashion-mnist", quiet=True)
        idx = rng.choice(len(x), batch, replace=False)
        return x[idx].astype(np.float64) / 255, y[idx], 10
    from PIL import Image

    from data_prep.imagenet_tree import resize_image
    from gait_ref.data.packaged import imagenet_photos
    files = sorted(imagenet_photos(quiet=True).glob("imagenet_*.jpg"))
    imgs = np.stack([resize_image(Image.open(p).convert("RGB"), 64, "center-crop") for p in files])
    labels = np.array([int(p.stem.split("_")[2]) for p in files])
    idx = rng.integers(0, len(files), batch)
    return imgs[idx].transpose(0, 3, 1, 2).astype(np.float64) / 255, labels[idx], 1000


NETS = {"mlp-deep": ("mlp-deep", 256, 64), "conv7-64px": ("conv7", 64, 16)}   # arch, batch, quick batch


class Setup:
    def __init__(self, name, rule, xp, dtype, batch, seed=0, invertible=None):
        arch = NETS[name][0]
        rng = np.random.default_rng(seed)
        x, y, K = real_batch(name, batch, rng)
        inv = rule in TARGET if invertible is None else invertible
        self.net = build(arch, x.shape[1:], K, invertible=inv)
        self.net.init(seed, "orthogonal", xp, dtype)
        self.x, self.y = to_device(x.astype(dtype), xp), to_device(y, xp)
        self.loss = SoftmaxCrossEntropy(K)
        self.rule = make_rule(rule, self.net, seed=seed)
        self.target = rule in TARGET
        self.opt = Adam(lr=1e-5, eps_placement="tf")
        self.xp = xp

    def updates(self):
        net = self.net
        tr = net.forward(self.x)
        _, gy = self.loss.value_and_grad(tr.output, self.y)
        return self.rule.compute(tr, gy)[0]

    def train_step(self):
        grads = self.updates()
        add_ortho_grads(self.net, grads, 1.0 if self.target else 0.0)
        flat = {f"{l.name}.{k}": g[k] for l, g in zip(self.net.layers, grads) for k in g}
        self.opt.step(self.net.parameters(), flat)


def bench_ratio(xp, quick, dtype=np.float32):
    print("\n## 1. GP/BP step time (one training step: forward, rule, regulariser, Adam)")
    print("| network | batch | BP square ms | GP ms | GP/BP | BP ordinary net ms | GP / BP ordinary |")
    print("|---|---|---|---|---|---|---|")
    for name, (_, batch, qbatch) in NETS.items():
        b = qbatch if quick else batch
        bp = Setup(name, "bp", xp, dtype, b, invertible=True)
        gp = Setup(name, "gait", xp, dtype, b)
        bpo = Setup(name, "bp", xp, dtype, b, invertible=False)
        reps = 2 if quick else 5
        t_bp, t_gp, t_bpo = (timed(s.train_step, xp, repeats=reps) for s in (bp, gp, bpo))
        print(f"| {name} | {b} | {t_bp * 1e3:.0f} | {t_gp * 1e3:.0f} | {t_gp / t_bp:.2f} | {t_bpo * 1e3:.0f} | "
              f"{t_gp / t_bpo:.2f} |", flush=True)
        pr = cProfile.Profile()
        pr.enable()
        gp.train_step()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(6)
        lines = [l for l in s.getvalue().splitlines() if l.strip()[:1].isdigit()]
        print(f"\nprofile of one {name} GP step (tottime s, ncalls, function):")
        for l in lines[1:7]:
            parts = l.split(None, 5)
            print(f"    {parts[1]:>8}  {parts[0]:>5}  {parts[5].split('/')[-1]}")
        print()


def bench_float32(xp, quick):
    print("\n## 2. float32 GP (difference form) against float64: |angle32 - angle64| per layer")
    steps = 10 if quick else 100
    for name, (_, batch, qbatch) in NETS.items():
        b = qbatch if quick else batch
        s64 = Setup(name, "gait", xp, np.float64, b)
        for when in ("init", f"after {steps} steps"):
            if when != "init":
                for _ in range(steps):
                    s64.train_step()
            s32 = Setup(name, "gait", xp, np.float32, b)
            for l32, l64 in zip(s32.net.layers, s64.net.layers):
                l32.params = {k: v.astype(np.float32) for k, v in l64.params.items()}
            a = {}
            for s in (s64, s32):
                tr = s.net.forward(s.x)
                _, gy = s.loss.value_and_grad(tr.output, s.y)
                g, _ = s.rule.compute(tr, gy)
                gb, _ = make_rule("bp", s.net).compute(tr, gy)
                a[s is s32] = {k: v["angle_deg"] for k, v in compare_updates(s.net, g, gb).items()}
            worst = max(abs(a[True][k] - a[False][k]) for k in a[True])
            cells = ", ".join(f"{k} {a[False][k]:.3g}/{a[True][k]:.3g}" for k in a[True])
            print(f"- {name} batch {b}, {when}: max |diff| {worst:.2e} deg "
                  f"({'meets' if worst <= 0.1 else 'MISSES'} 0.1); angle64/angle32: {cells}", flush=True)


def conv_bp_flops(net, batch):
    """3 GEMMs per layer (forward, input gradient, weight gradient), 2 M K N flops each;
    the first layer has no input gradient."""
    total = 0
    for i, l in enumerate(net.layers):
        if l.kind == "conv":
            M = batch * l.out_shape[1] * l.out_shape[2]
            K, N = l.weight_shape
        else:
            M, (K, N) = batch, l.weight_shape
        total += (2 if i == 0 else 3) * 2 * M * K * N
    return total


def bench_gemm(xp, quick):
    print("\n## 3. BP step of the conv net against the machine's float32 GEMM rate")
    n = 1024 if quick else 2048
    a = to_device(np.random.default_rng(0).random((n, n), dtype=np.float32), xp)
    t = timed(lambda: a @ a, xp, repeats=3)
    peak = 2 * n ** 3 / t / 1e9
    b = NETS["conv7-64px"][2] if quick else NETS["conv7-64px"][1]
    for inv in (False, True):
        s = Setup("conv7-64px", "bp", xp, np.float32, b, invertible=inv)
        t = timed(s.updates, xp, repeats=2 if quick else 5)
        fl = conv_bp_flops(s.net, b)
        print(f"- conv7 64 px ({'square' if inv else 'ordinary'}), batch {b}: {fl / 1e9:.2f} GFLOP per BP step in "
              f"{t * 1e3:.0f} ms = {fl / t / 1e9:.1f} GFLOP/s; square {n} matmul {peak:.1f} GFLOP/s; "
              f"{100 * fl / t / 1e9 / peak:.0f}% of GEMM", flush=True)


def _torch_step(name, s, torch):
    """The same network in torch (same weights), forward + backward of the same loss."""
    import torch.nn.functional as F
    ws = [(torch.tensor(to_numpy(l.params["W"])), torch.tensor(to_numpy(l.params["b"]))) for l in s.net.layers]
    for w, b in ws:
        w.requires_grad_(True)
        b.requires_grad_(True)
    x = torch.tensor(to_numpy(s.x))
    y = torch.tensor(to_numpy(s.y))
    K = s.loss.n_classes

    def step():
        h = x
        for i, (l, (w, b)) in enumerate(zip(s.net.layers, ws)):
            if l.kind == "conv":
                g = l.geom
                t, bo, le, r = g.pads
                hh = F.pad(h[:, :g.C], (le, r, t, bo))
                kern = w.reshape(g.K, g.K, g.C, -1).permute(3, 2, 0, 1)      # (O, C, K, K)
                h = F.conv2d(hh, kern, b, stride=g.S)
            else:
                h = h.reshape(h.shape[0], -1)[:, :l.n_read] @ w + b
            if i < len(ws) - 1:
                h = F.leaky_relu(h, 0.1)
        loss = F.cross_entropy(h[:, :K], y, reduction="sum")
        for w, b in ws:
            w.grad = b.grad = None
        loss.backward()
    return step


def bench_torch(xp, quick):
    print("\n## 4. BP against PyTorch CPU on the identical networks (forward + backward)")
    try:
        import torch
    except ImportError:
        print("- skipped: torch is not installed (pip install torch==2.13.0)")
        return
    torch.set_num_threads(os.cpu_count() or 1)
    for name, (_, batch, qbatch) in NETS.items():
        b = qbatch if quick else batch
        s = Setup(name, "bp", np, np.float32, b, invertible=False)
        ours = timed(s.updates, np, repeats=2 if quick else 5)
        theirs = timed(_torch_step(name, s, torch), np, repeats=2 if quick else 5)
        print(f"- {name} batch {b}: gait_ref {ours * 1e3:.0f} ms, torch {torch.__version__} {theirs * 1e3:.0f} ms, "
              f"ratio {ours / theirs:.2f} ({'meets' if ours / theirs <= 1.5 else 'MISSES'} 1.5)", flush=True)


def bench_memory(quick):
    print("\n## 5. peak memory allocated in one step (tracemalloc), GP against BP, same square network")
    for name, (_, batch, qbatch) in NETS.items():
        b = qbatch if quick else batch
        peaks = {}
        for rule in ("bp", "gait"):
            s = Setup(name, rule, np, np.float32, b, invertible=True)
            s.train_step()                              # Adam state allocated before measuring
            tracemalloc.start()
            s.train_step()
            peaks[rule] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        r = peaks["gait"] / peaks["bp"]
        print(f"- {name} batch {b}: BP {peaks['bp'] / 2**20:.0f} MiB, GP {peaks['gait'] / 2**20:.0f} MiB, "
              f"ratio {r:.2f} ({'meets' if r <= 1.5 else 'MISSES'} 1.5)", flush=True)


def bench_data(xp, quick):
    print("\n## 6. HDF5 shard reading at 64 px against one CPU training step")
    from gait_ref.data import BatchLoader, ShardSet
    from gait_ref.data.shards import write_manifest, write_shard
    n, per = (1024, 256) if quick else (8192, 1024)
    b = 64
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        entries = [write_shard(Path(tmp) / f"train-{i:05d}.h5", rng.integers(0, 256, (per, 64, 64, 3), dtype=np.uint8),
                               rng.integers(0, 1000, per)) for i in range(n // per)]
        write_manifest(tmp, {"format": "gait_ref-shards", "version": 1, "layout": "NHWC", "image_shape": [64, 64, 3],
                             "classes": [[str(i), str(i)] for i in range(1000)], "splits": {"train": entries}})
        data = ShardSet(tmp, "train", verify="size")
        loader = BatchLoader(data, b, xp, np.float32, seed=0)
        t = time.perf_counter()
        count = 0
        for _, x, _ in loader.epoch(0):
            count += len(x)
        synchronize(xp)
        read_rate = count / (time.perf_counter() - t)
        data.close()
    s = Setup("conv7-64px", "gait", xp, np.float32, b)
    step = timed(s.train_step, xp, repeats=1 if quick else 3)
    train_rate = b / step
    print(f"- loader: {read_rate:.0f} images/s (random order, {n} images in {n // per} shards, batch {b}); "
          f"GP conv7 training step: {train_rate:.0f} images/s; ratio {read_rate / train_rate:.1f} "
          f"({'meets' if read_rate / train_rate >= 5 else 'MISSES'} 5)", flush=True)


@click.command()
@click.option("--quick", is_flag=True, help="Small batches and few repeats: checks that everything runs.")
@click.option("--backend", default="numpy", type=click.Choice(["numpy", "cupy"]))
@click.option("--only", default="ratio,float32,gemm,torch,memory,data", show_default=True)
def main(quick, backend, only):
    xp = get_backend(backend)
    print(f"gait_ref benchmarks: backend {backend}, {os.cpu_count()} CPU cores, numpy {np.__version__}"
          + (" (quick)" if quick else ""))
    parts = only.split(",")
    if "ratio" in parts:
        bench_ratio(xp, quick)
    if "float32" in parts:
        bench_float32(xp, quick)
    if "gemm" in parts:
        bench_gemm(xp, quick)
    if "torch" in parts and backend == "numpy":
        bench_torch(xp, quick)
    if "memory" in parts and backend == "numpy":
        bench_memory(quick)
    if "data" in parts:
        bench_data(xp, quick)


if __name__ == "__main__":
    main()
