"""Performance benchmarks (issue: GAIT-prop at the cost of its own arithmetic). Prints its figures.

    python bench/perf.py [--quick] [--backend numpy|cupy] [--only ratio,efficiency,torch,float32,gemm,memory,data,solver,floor,
                                                                 floor224,ratio224,efficiency224,float32-224]
    python bench/perf.py --only ratio224,efficiency224,floor224,float32-224     # conv7 at 224 px alone (issue 34)

ratio       one full training step (``gait_ref.step.TrainStep``: forward, rule, regulariser,
            Adam) of normalized GP and of BP, interleaved (A, B, A, B), several steps per
            repeat (so refinement retries are averaged in), 7 repeats; the ratio is the
            median of the repeats' ratios. BP on the same square network
            and on the ordinary one. The deep MLP with the regulariser every 1, 4 and 16 steps
            (--ortho-every); conv7 at the paper's settings. Targets: GP/BP <= 2.0 (every 4) and
            <= 1.6 (every 16) on the MLP, <= 1.8 on conv7.
efficiency  GFLOP/s of the GP step from the flop count printed beside it, against a square
            float32 GEMM measured in the same run. Target >= 70% on the MLP.
torch       the same GP step in PyTorch (bench/torch_gp.py: LU solve and regulariser every
            step, checked against gait_ref's updates first), float32 and float64, and BP
            forward + backward with autograd. Target: gait_ref no slower. Optional
            (pip install torch==2.13.0).
float32     GP's angle to BP in float32 (difference form) against float64: at
            initialisation, after 100 steps on one batch, and after training on real
            Fashion-MNIST batches. Target |angle32 - angle64| <= 0.1 degree.
gemm        a BP step of conv7 in GFLOP/s (per layer 3 GEMMs, all on the live output
            channels: the forward pass computes only those) against the GEMM rate.
            Target >= 60%.
memory      peak memory of a step (tracemalloc, the highest of 8), GP against BP on the same network.
data        the shard loader's images/s against the GP training step (bench/loader.py has
            the full loader benchmark).
floor       no timing: the fewest GEMM flops a GP step can do against BP's step (the counts of
            section 2), and so how much faster per flop than BP a GP step would have to run to
            meet each GP/BP target. Three floors: (a) the forward pass and weight gradients on
            the live channels, the regulariser (3 D^3 per square layer, with a symmetric
            product) every K steps, and per solve only its first product with an inverse that
            costs nothing; (b) (a) with a fresh LU per square layer (2/3 D^3) and the
            triangular solves for the live rows of W^-1, an exact solve left unchecked;
            (c) (b) with the residual that checks it (M x D x D).
solver      the GP step with ``--inverse-solver refine`` against ``lu``, float32 and float64,
            interleaved, with the refinement's corrections per solve, recomputed steps and
            renewals of the kept inverse (gait_ref/linalg.py explains the policy).
ratio224, efficiency224, floor224, float32-224
            the same at the papers' ImageNet resolution: conv7 at 224 px (its square output
            layer 3072 wide), batch 32 and 256 (``--quick``: 32 only, fewer steps), a few
            steps each after warm-up; each GP row prints, per square layer, how often its kept
            inverse was renewed (a fresh inverse or a Newton-Schulz step) and the steps whose
            targets were computed again. The target there is GP/BP at most the flop floor (c)
            of the same batch: GP's extra work at BP's efficiency per flop. float32-224: GP's
            angles to BP in float32 against float64 after 100 float64 steps (batch 32).

Networks: the deep CIFAR MLP (six hidden layers of 1024, batch 256) and the ImageNet conv
net at 64 px (batch 64) and at 224 px (batch 32 and 256, the ``*224`` sections); inputs
are real Fashion-MNIST images and the 20 real ImageNet photos of the foolbox wheel.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import alternating_processes, blas_line, interleaved, timed  # noqa: E402

from gait_ref.assembly import build_step  # noqa: E402
from gait_ref.backend import get_backend, synchronize, to_device, to_numpy  # noqa: E402
from gait_ref.config import Config  # noqa: E402
from gait_ref.hostmem import keep_freed_memory  # noqa: E402
from gait_ref.metrics import compare_updates  # noqa: E402
from gait_ref.rules import make_rule  # noqa: E402
from gait_ref.step import forward_widths, output_grad_read  # noqa: E402


def real_batch(name, batch, rng):
    """Real images: Fashion-MNIST for the MLP, the 20 ImageNet photos (64 or 224 px) for the conv net."""
    if name == "mlp-deep":
        from gait_ref.data.packaged import load_packaged
        (x, y), _ = load_packaged("fashion-mnist", quiet=True)
        idx = rng.choice(len(x), batch, replace=False)
        return x[idx].astype(np.float64) / 255, y[idx], 10
    from PIL import Image

    from data_prep.imagenet_tree import resize_image
    from gait_ref.data.packaged import imagenet_photos
    files = sorted(imagenet_photos(quiet=True).glob("imagenet_*.jpg"))
    px = PIXELS[name]
    imgs = np.stack([resize_image(Image.open(p).convert("RGB"), px, "center-crop") for p in files])
    labels = np.array([int(p.stem.split("_")[2]) for p in files])
    idx = rng.integers(0, len(files), batch)
    return imgs[idx].transpose(0, 3, 1, 2).astype(np.float64) / 255, labels[idx], 1000


NETS = {"mlp-deep": ("mlp-deep", 256, 64), "conv7-64px": ("conv7", 64, 16)}   # arch, batch, quick batch
PIXELS = {"conv7-64px": 64, "conv7-224px": 224}
# the papers' resolution: (arch, batches, quick batches), only in the *224 sections
NET_224 = ("conv7", (32, 256), (32,))


class Setup:
    """A network on real images with a rule, and its training step as ``run.py`` builds it
    (``gait_ref.assembly.build_step``: the presets of the scaling paper's code for the
    architecture and rule, as ``self.cfg`` holds them)."""

    def __init__(self, name, rule, xp, dtype, batch, seed=0, invertible=None, ortho_every=1, solver="auto",
                 keep_memory=True):
        if keep_memory:                # as the trainer does (gait_ref.hostmem); bench/host_memory.py compares
            keep_freed_memory()
        arch = NETS[name][0] if name in NETS else NET_224[0]
        rng = np.random.default_rng(seed)
        x, y, K = real_batch(name, batch, rng)
        self.cfg = Config(arch=arch, rule=rule, dtype=np.dtype(dtype).name, seed=seed, batch_size=batch,
                          square_net=bool(invertible), ortho_every=ortho_every, inverse_solver=solver).resolved()
        self.step = build_step(self.cfg, x.shape[1:], K, xp)
        self.net, self.loss, self.rule, self.opt = self.step.net, self.step.loss, self.step.rule, self.step.opt
        self.x, self.y = to_device(x.astype(dtype), xp), to_device(y, xp)
        self.n, self.xp, self.batch = 0, xp, batch

    def updates(self):
        """The rule's updates, given dL/dy as the training step gives it (gait_ref.step)."""
        tr = self.net.forward(self.x, forward_widths(self.net, self.loss, self.rule))
        _, gy = self.loss.value_and_grad(tr.output, self.y)
        if getattr(self.rule, "takes_narrow_output_grad", False):
            gy = output_grad_read(self.loss, gy)
        return self.rule.compute(tr, gy)[0]

    def train_step(self):
        self.n += 1
        self.step(self.x, self.y, step=self.n, epoch=0)


def _gemm(M, K, N):
    return 2 * M * K * N


def _rows(layer, batch):
    """Rows of the layer's GEMMs: the batch (dense), batch x output positions (conv)."""
    return batch * layer.out_shape[1] * layer.out_shape[2] if layer.kind == "conv" else batch


def _live(net, l, K=None):
    """Output channels of layer l that carry gradients: those the layer above reads
    (``Network.live_channels``), and for the output layer the K classes the loss reads
    (``TrainStep`` hands the rules only those); the backward GEMMs run on these columns only."""
    c = net.live_channels(l)
    if l == len(net) - 1 and K is not None:
        c = min(K, net.layers[l].weight_shape[-1])
    return net.layers[l].weight_shape[-1] if c is None else c


def _live_gemms(net, batch, K=None) -> list:
    """Per layer, the flops of one GEMM of its M rows, D inputs and c live output channels:
    its forward pass, its weight gradient and its input gradient are each one such."""
    return [_gemm(_rows(l, batch), l.weight_shape[-2], _live(net, i, K)) for i, l in enumerate(net.layers)]


def regulariser_flops(net, symmetric=True) -> int:
    """The orthogonality regulariser's flops per square 2-D layer above the first: W W^T and
    (W W^T - I) W, 3 D^3 where W W^T is the symmetric product numpy sends to BLAS's syrk
    (``symmetric``: numpy), 4 D^3 as two GEMMs (cupy)."""
    return sum((3 if symmetric else 4) * l.weight_shape[-1] ** 3 for l in net.layers[1:]
               if l.square and len(l.weight_shape) == 2)


def bp_flops(net, batch, live=True, K=None):
    """BP: per layer the forward GEMM, the weight gradient and the input gradient (M x D x c,
    c the live output channels, K at the output; the first layer has no input gradient),
    2 M K N flops each. ``live=False``: c = O, as autograd computes them (torch's step)."""
    if live:
        return sum((2 if i == 0 else 3) * g for i, g in enumerate(_live_gemms(net, batch, K)))
    return sum((2 if i == 0 else 3) * _gemm(_rows(l, batch), *l.weight_shape) for i, l in enumerate(net.layers))


def gp_flops(net, batch, stats, steps, ortho_every, solver, dtype=np.float32, K=None, symmetric=True,
             per_layer=None):
    """The GEMM flops of ``steps`` GP training steps: the forward pass (on the c live output
    channels, ``gait_ref.step.forward_widths``), per recursion of the
    rule (stats['recursions']) every layer's weight gradient (on its c live output channels)
    and, per square layer above the first, the solve (refine: B X on c columns of B and the
    residual, M x c x D and M x D x D, plus two GEMMs of M x D x D per correction from
    stats['corrections']; lu: 2/3 D^3 + 2 M D^2), and the regulariser every ``ortho_every``
    steps (``regulariser_flops``). A float32 layer with M >= D rows and
    c < D live columns solves from c rows of W^-1 with no residual (gait_ref.linalg's
    _solve_by_rows): M x c x D (in float64), the Gram matrix M x c x c and the rows' error
    c x D x D and c x c x D. Not counted: the kept inverses' renewals (a fresh inverse or a
    Newton-Schulz step, see gait_ref.linalg), so the rate is a lower bound. ``per_layer``:
    {layer index: (corrections, combined solves)} over the steps (``layer_corrections``),
    which prices each layer's corrections at its own rows and D (and the combined solves'
    residual of their x, one GEMM of M x D x D more) instead of the square layers' mean."""
    layers = list(enumerate(net.layers))
    grads = sum(_live_gemms(net, batch, K))
    fwd = grads                                      # the forward pass computes the live channels only
    square = [(i, l) for i, l in layers[1:] if l.square]

    def refined(i, l):
        M, c, D = _rows(l, batch), _live(net, i, K), l.weight_shape[-1]
        if M >= D and c < D and np.dtype(dtype) == np.float32:
            return _gemm(M, c, D) + _gemm(c, M, c) + _gemm(c, D, D) + _gemm(c, c, D)
        return _gemm(M, c, D) + _gemm(M, D, D)
    if solver == "refine":
        solve = sum(refined(i, l) for i, l in square)
        per_correction = np.mean([2 * _gemm(_rows(l, batch), l.weight_shape[-1], l.weight_shape[-1]) for _, l in square])
        if per_layer is None:
            rule = stats["recursions"] * (grads + solve) + stats["corrections"] * per_correction
        else:
            rule = stats["recursions"] * (grads + solve) + sum(
                (2 * n + m) * _gemm(_rows(net.layers[i], batch), net.layers[i].weight_shape[-1],
                                    net.layers[i].weight_shape[-1]) for i, (n, m) in per_layer.items())
    else:
        rule = steps * (grads + sum(2 / 3 * l.weight_shape[-1] ** 3 + 2 * _rows(l, batch) * l.weight_shape[-1] ** 2
                                    for _, l in square))
    return steps * fwd + rule + regulariser_flops(net, symmetric) * (steps // ortho_every)


TARGETS = {("mlp-deep", 4): 2.0, ("mlp-deep", 16): 1.6, ("conv7-64px", 1): 1.8}


def layer_corrections(setup) -> dict:
    """{layer index: (corrections, combined solves)} of a GP setup's kept inverses so far."""
    return {l: (r.corrections, r.combined) for l, r in enumerate(setup.rule.refined)}


def corrections_since(setup, before) -> dict:
    return {l: (n - before[l][0], m - before[l][1]) for l, (n, m) in layer_corrections(setup).items()}


def refine_counts(setup, since=None) -> tuple[dict, int, int]:
    """A GP setup's kept inverses since ``since`` (an earlier result of this function, or the
    start): per square layer its renewals (fresh inverses and Newton-Schulz steps; a layer
    whose solves have as many rows as D makes a fresh one at every step, by design), the
    recomputed steps (the targets computed again after a missed bound) and the steps."""
    rule = setup.rule
    per = {setup.net.layers[l].name: r.refreshes for l, r in enumerate(rule.refined) if r.X is not None}
    rec, steps = rule.stats["recursions"] - rule.stats["steps"], rule.stats["steps"]
    if since is not None:
        per = {k: v - since[0].get(k, 0) for k, v in per.items()}
        rec, steps = rec - since[1], steps - since[2]
    return per, rec, steps


def describe_counts(setup, counts) -> str:
    per, rec, steps = counts
    rows = {setup.net.layers[l].name: (r.renewing, r.krylov) for l, r in enumerate(setup.rule.refined) if r.X is not None}
    kept = ", ".join(f"{k} {v}" for k, v in per.items() if not rows[k][0])
    fresh = ", ".join(k for k in per if rows[k][0])
    return (f"over {steps} steps: renewals of kept inverses per layer: {kept or '-'}; a fresh inverse every step "
            f"(rows >= D): {fresh or '-'}; recomputed steps {rec}")


def gp_flop_floors(net, batch, ortho_every, K):
    """(a, b, c) of the ``floor`` section (see the module docstring), in flops."""
    live = sum(_live_gemms(net, batch, K))
    square = [(_rows(l, batch), _live(net, i, K), l.weight_shape[-1]) for i, l in enumerate(net.layers) if i and l.square]
    reg = regulariser_flops(net) / ortho_every
    a = 2 * live + reg + sum(_gemm(M, c, D) for M, c, D in square)
    # an LU, then the live rows of W^-1 (c triangular solves, 2 c D^2) or the M right-hand
    # sides directly (2 M D^2), whichever is fewer, then their product with the c live columns
    b = 2 * live + reg + sum(2 / 3 * D ** 3 + min(2 * c * D * D + _gemm(M, c, D), 2 * M * D * D) for M, c, D in square)
    return a, b, b + sum(_gemm(M, D, D) for M, _, D in square)


def bench_floor(xp, quick):
    print("\n## 9. the flop floor: the fewest GEMM flops of a GP step against BP's (no timing)")
    for name, every in TARGETS:
        s = Setup(name, "gait", np, np.float32, NETS[name][1])
        K = s.loss.n_classes
        bp = bp_flops(s.net, s.batch, K=K)
        a, b, c = gp_flop_floors(s.net, s.batch, every, K)
        t = TARGETS[(name, every)]
        print(f"- {name} batch {s.batch}, --ortho-every {every}: BP {bp / 1e9:.2f} GFLOP; GP at least (a) "
              f"{a / 1e9:.2f}, (b) {b / 1e9:.2f}, (c) {c / 1e9:.2f} GFLOP: {a / bp:.2f}, {b / bp:.2f}, {c / bp:.2f} x "
              f"BP's. GP/BP <= {t} needs GP's GFLOP/s at least {a / bp / t:.2f}, {b / bp / t:.2f}, {c / bp / t:.2f} "
              "x BP's", flush=True)


def floor_c(s) -> float:
    """Floor (c) of a setup's GP step over its BP step's flops (regulariser every step)."""
    return gp_flop_floors(s.net, s.batch, s.cfg.ortho_every, s.loss.n_classes)[2] / bp_flops(s.net, s.batch,
                                                                                             K=s.loss.n_classes)


def bench_floor224(xp, quick):
    print("\n## 9b. the flop floor at 224 px: conv7, regulariser every step (no timing)")
    for b in NET_224[2] if quick else NET_224[1]:
        s = Setup("conv7-224px", "gait", np, np.float32, b)
        K = s.loss.n_classes
        bp = bp_flops(s.net, b, K=K)
        a, fb, c = gp_flop_floors(s.net, b, 1, K)
        reg = regulariser_flops(s.net)
        print(f"- conv7 224 px batch {b}: BP {bp / 1e9:.2f} GFLOP; GP at least (a) {a / 1e9:.1f}, (b) {fb / 1e9:.1f}, "
              f"(c) {c / 1e9:.1f} GFLOP: {a / bp:.2f}, {fb / bp:.2f}, {c / bp:.2f} x BP's; of which the regulariser "
              f"{reg / 1e9:.1f} GFLOP ({reg / bp:.2f} x BP's)", flush=True)


def gemm_rate(xp, n=2048):
    a = to_device(np.random.default_rng(0).random((n, n), dtype=np.float32), xp)
    return 2 * n ** 3 / timed(lambda: a @ a, xp, repeats=3) / 1e9


def gp_bp_ratios(setups, xp, reps, steps):
    """Training steps of ``setups`` (gp, bp on the square net, bpo on the ordinary one) timed
    interleaved: median seconds per step, and GP/BP against each BP as the median of each
    repeat's ratio (GP against the BP steps timed right beside it), which the machine's drift
    over a section disturbs less than a ratio of medians."""
    rep = interleaved({k: v.train_step for k, v in setups.items()}, xp, reps=reps, steps=steps, per_repeat=True)
    t = {k: float(np.median(v)) for k, v in rep.items()}
    return t, float(np.median(rep["gp"] / rep["bp"])), float(np.median(rep["gp"] / rep["bpo"]))


def gp_rate(s, xp, warm, n):
    """After ``warm`` steps, ``n`` GP training steps of setup ``s``: (GEMM flops per step,
    seconds per step, the kept inverses' counts over them, ``refine_counts``)."""
    for _ in range(warm):
        s.train_step()
    st0, before, c0 = dict(s.rule.stats), refine_counts(s), layer_corrections(s)
    t = time.perf_counter()
    for _ in range(n):
        s.train_step()
    synchronize(xp)
    dt = (time.perf_counter() - t) / n
    st = {k: s.rule.stats[k] - st0[k] for k in st0}
    fl = gp_flops(s.net, s.batch, st, n, 1, "refine", K=s.loss.n_classes, symmetric=xp is np,
                  per_layer=corrections_since(s, c0)) / n
    return fl, dt, refine_counts(s, before)


def bench_ratio(xp, quick, dtype=np.float32):
    print("\n## 1. GP/BP training-step time (forward, rule, regulariser, Adam), float32, interleaved")
    print("| network | batch | --ortho-every | BP square ms | BP ordinary ms | GP ms | GP/BP square | GP/BP ordinary |"
          " target |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [("mlp-deep", 1, None), ("mlp-deep", 4, 2.0), ("mlp-deep", 16, 1.6), ("conv7-64px", 1, 1.8)]
    for name, every, target in cases:
        b = NETS[name][2] if quick else NETS[name][1]
        s = {"bp": Setup(name, "bp", xp, dtype, b, invertible=True), "bpo": Setup(name, "bp", xp, dtype, b, invertible=False),
             "gp": Setup(name, "gait", xp, dtype, b, ortho_every=every)}
        t, r, ro = gp_bp_ratios(s, xp, reps=2 if quick else 7, steps=max(2, every) if quick else max(4, 2 * every))
        verdict = "-" if target is None else f"{target} ({'met' if r <= target else 'NOT met'})"
        print(f"| {name} | {b} | {every} | {t['bp'] * 1e3:.0f} | {t['bpo'] * 1e3:.0f} | {t['gp'] * 1e3:.0f} | {r:.2f} | "
              f"{ro:.2f} | {verdict} |", flush=True)
        st = s["gp"].rule.stats
        if st["steps"]:
            print(f"|  | | | | | refine: {st['corrections'] / st['solves']:.2f} corrections per solve, "
                  f"{(st['recursions'] - st['steps']) / st['steps']:.2f} recomputations per step | | | |")


def bench_ratio224(xp, quick, dtype=np.float32):
    print("\n## 1b. GP/BP training-step time at 224 px (conv7, regulariser every step), float32, interleaved")
    print("| batch | BP square ms | BP ordinary ms | GP ms | GP/BP square | GP/BP ordinary | target: floor (c) |")
    print("|---|---|---|---|---|---|---|")
    for b in NET_224[2] if quick else NET_224[1]:
        s = {"bp": Setup("conv7-224px", "bp", xp, dtype, b, invertible=True),
             "bpo": Setup("conv7-224px", "bp", xp, dtype, b, invertible=False),
             "gp": Setup("conv7-224px", "gait", xp, dtype, b)}
        for _ in range(1 if quick else 3):               # warm-up: the kept inverses' first steps
            s["gp"].train_step()
        before = refine_counts(s["gp"])
        t, r, ro = gp_bp_ratios(s, xp, reps=2 if quick else 4, steps=2 if quick else 3)
        c = floor_c(s["gp"])
        print(f"| {b} | {t['bp'] * 1e3:.0f} | {t['bpo'] * 1e3:.0f} | {t['gp'] * 1e3:.0f} | {r:.2f} | {ro:.2f} | "
              f"{c:.2f} ({'met' if r <= c else 'NOT met'}) |", flush=True)
        print(f"|  | GP {describe_counts(s['gp'], refine_counts(s['gp'], before))} (after "
              f"{before[2]} warm-up steps) | | | | | |", flush=True)


def bench_efficiency(xp, quick):
    print("\n## 2. GP step GFLOP/s (GEMM flops counted per step) against a float32 GEMM in the same run")
    peak = gemm_rate(xp, 1024 if quick else 2048)
    for name in NETS:
        b = NETS[name][2] if quick else NETS[name][1]
        s = Setup(name, "gait", xp, np.float32, b)
        # steady state: the first steps run slower while the allocator and the kept inverses
        # settle (deep MLP, 6-step blocks from the start: 478, 405, 407, 379, 361 ms)
        fl, dt, _ = gp_rate(s, xp, 2 if quick else 12, 3 if quick else 10)
        eff = fl / dt / 1e9 / peak
        target = " (target 70%: " + ("met)" if eff >= 0.7 else "NOT met)") if name == "mlp-deep" else ""
        print(f"- {name} batch {b}: {fl / 1e9:.1f} GFLOP per GP step in {dt * 1e3:.0f} ms = {fl / dt / 1e9:.0f} GFLOP/s; "
              f"GEMM {peak:.0f} GFLOP/s; {100 * eff:.0f}% of GEMM{target}", flush=True)


def bench_efficiency224(xp, quick):
    print("\n## 2b. GP step GFLOP/s at 224 px (conv7, GEMM flops counted per step) against a float32 GEMM")
    peak = gemm_rate(xp, 1024 if quick else 2048)
    for b in NET_224[2] if quick else NET_224[1]:
        s = Setup("conv7-224px", "gait", xp, np.float32, b)
        n = 2 if quick else 6
        fl, dt, counts = gp_rate(s, xp, 2 if quick else 4, n)
        D = s.net.layers[-1].weight_shape[-1]
        renewal = 4 * D ** 3 * counts[0].get(s.net.layers[-1].name, 0) / n       # Newton-Schulz's flops
        print(f"- conv7 224 px batch {b}: {fl / 1e9:.1f} GFLOP per GP step (+ {renewal / 1e9:.1f} for the output "
              f"layer's renewals, not in the rate) in {dt * 1e3:.0f} ms = {fl / dt / 1e9:.0f} GFLOP/s; GEMM {peak:.0f} "
              f"GFLOP/s; {100 * fl / dt / 1e9 / peak:.0f}% of GEMM; {describe_counts(s, counts)}", flush=True)


def bench_solver(xp, quick):
    print("\n## 8. the inverse's solver: refined kept inverse against a fresh LU, GP training step, interleaved")
    print("| network | dtype | refine ms | lu ms | refine/lu | corrections per solve | recomputed steps per step |"
          " renewals of X per layer per step |")
    print("|---|---|---|---|---|---|---|---|")
    for name in NETS:
        b = NETS[name][2] if quick else NETS[name][1]
        for dtype in (np.float32, np.float64):
            s = {solver: Setup(name, "gait", xp, dtype, b, solver=solver) for solver in ("refine", "lu")}
            t = interleaved({k: v.train_step for k, v in s.items()}, xp, reps=2 if quick else 3, steps=2 if quick else 8)
            st = s["refine"].rule.stats
            square = sum(1 for l in s["refine"].net.layers[1:] if l.square)
            renewals = sum(r.refreshes for r in s["refine"].rule.refined) / max(1, square) / st["steps"]
            print(f"| {name} batch {b} | {np.dtype(dtype).name} | {t['refine'] * 1e3:.0f} | {t['lu'] * 1e3:.0f} | "
                  f"{t['refine'] / t['lu']:.2f} | {st['corrections'] / st['solves']:.2f} | "
                  f"{(st['recursions'] - st['steps']) / st['steps']:.2f} | {renewals:.2f} |", flush=True)


def bench_float32(xp, quick):
    print("\n## 4. float32 GP (difference form) against float64: |angle32 - angle64| per layer")
    steps = 10 if quick else 100
    cases = [(name, qbatch if quick else batch, steps) for name, (_, batch, qbatch) in NETS.items()]
    # a case with a unit at the leaky-ReLU kink (docs/BENCHMARKS.md, "float32 at the kink")
    cases.append(("conv7-64px", 16, 10))
    for name, b, steps in cases:
        float32_against_float64(xp, name, b, steps, name)
    float32_after_real_training(xp, 60 if quick else 300)


def float32_against_float64(xp, name, b, steps, label):
    """GP's angle to BP per layer with float64 weights and with their float32 copies, at
    initialisation and after ``steps`` float64 training steps; prints the largest difference."""
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
        print(f"- {label} batch {b}, {when}: max |diff| {worst:.2e} deg "
              f"({'meets' if worst <= 0.1 else 'MISSES'} 0.1); angle64/angle32: {cells}", flush=True)


def bench_float32_224(xp, quick):
    print("\n## 4b. float32 GP (difference form) against float64 at 224 px: |angle32 - angle64| per layer")
    float32_against_float64(xp, "conv7-224px", 8 if quick else 32, 10 if quick else 100, "conv7 224 px")


def float32_after_real_training(xp, steps):
    """The deep MLP trained in float64 on real Fashion-MNIST batches (the paper's Adam and
    regulariser), then one fresh batch through float64 and float32 copies of the weights:
    the units near the leaky-ReLU kink are where float32's rounding of the forward pass can
    change a unit's side, and so its f'(h) and the target's crossing branch."""
    from gait_ref.data.packaged import load_packaged
    (x, y), _ = load_packaged("fashion-mnist", quiet=True)
    rng = np.random.default_rng(0)
    s = Setup("mlp-deep", "gait", xp, np.float64, 256)
    for _ in range(steps):
        idx = rng.choice(len(x), 256, replace=False)
        s.n += 1
        s.step(to_device(x[idx] / 255.0, xp), to_device(y[idx], xp), step=s.n, epoch=0)
    idx = rng.choice(len(x), 256, replace=False)
    angles, near = {}, 0.0
    for dtype in (np.float64, np.float32):
        net = build_step(dataclasses.replace(s.cfg, dtype=np.dtype(dtype).name), x.shape[1:], 10, xp).net
        for l, l64 in zip(net.layers, s.net.layers):
            l.params = {k: v.astype(dtype) for k, v in l64.params.items()}
        tr = net.forward(to_device((x[idx] / 255.0).astype(dtype), xp))
        _, gy = s.loss.value_and_grad(tr.output, to_device(y[idx], xp))
        g = make_rule("gait", net).compute(tr, gy)[0]
        angles[dtype] = {k: v["angle_deg"] for k, v in compare_updates(net, g, make_rule("bp", net).compute(tr, gy)[0]).items()}
        near = float(np.mean([np.mean(np.abs(to_numpy(h)) < 1e-6) for h in tr.hs[:-1]]))
    worst = max(abs(angles[np.float32][k] - angles[np.float64][k]) for k in angles[np.float64])
    print(f"- mlp-deep batch 256, after {steps} steps on real Fashion-MNIST batches: max |diff| {worst:.2e} deg "
          f"({'meets' if worst <= 0.1 else 'MISSES'} 0.1); hidden units with |h| < 1e-6: {100 * near:.4f}%", flush=True)


def bench_gemm(xp, quick):
    print("\n## 5. BP step of the conv net against the float32 GEMM rate (target 60%)")
    n = 1024 if quick else 2048
    a = to_device(np.random.default_rng(0).random((n, n), dtype=np.float32), xp)
    t = timed(lambda: a @ a, xp, repeats=3)
    peak = 2 * n ** 3 / t / 1e9
    b = NETS["conv7-64px"][2] if quick else NETS["conv7-64px"][1]
    for inv in (False, True):
        s = Setup("conv7-64px", "bp", xp, np.float32, b, invertible=inv)
        t = timed(s.updates, xp, repeats=2 if quick else 5)
        fl = bp_flops(s.net, b, K=s.loss.n_classes)
        g = bp_gemms_alone(s.net, b, xp, repeats=2 if quick else 5, K=s.loss.n_classes)
        print(f"- conv7 64 px ({'square' if inv else 'ordinary'}), batch {b}: {fl / 1e9:.2f} GFLOP per BP step in "
              f"{t * 1e3:.0f} ms = {fl / t / 1e9:.1f} GFLOP/s; square {n} matmul {peak:.1f} GFLOP/s; "
              f"{100 * fl / t / 1e9 / peak:.0f}% of GEMM. The step's GEMMs alone, each timed on its own: "
              f"{g * 1e3:.1f} ms = {100 * fl / g / 1e9 / peak:.0f}% of GEMM (the most the step could reach with "
              "no other work)", flush=True)


def bp_gemms_alone(net, batch, xp, repeats, K=None):
    """Seconds for the GEMMs that ``bp_flops`` counts, each timed alone on random matrices of the
    step's shapes and layouts: forward rows @ W[:, :c], weight gradient rows^T @ grad, input
    gradient grad @ W[:, :c]^T (not for the first layer), c the live output channels. A bound on BP's
    step set by the GEMMs' shapes."""
    rng = np.random.default_rng(0)
    total = 0.0
    for i, l in enumerate(net.layers):
        M, (D, O), c = _rows(l, batch), l.weight_shape, _live(net, i, K)
        a, w, gr = (to_device(rng.random(shape, dtype=np.float32), xp) for shape in ((M, D), (D, O), (M, c)))
        products = [lambda: a @ w[:, :c], lambda: a.T @ gr] + ([lambda: gr @ w[:, :c].T] if i else [])
        total += sum(timed(f, xp, repeats=repeats) for f in products)
    return total


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


def _time_one(which, name, dtype, batch, steps) -> float:
    """Seconds per GP training step of gait_ref or of the torch port (``which``: ours, torch), or
    per BP forward + backward (ours-bp, torch-bp; -square: on GAIT-prop's square network), each
    run in its own process."""
    dt = np.dtype(dtype)
    if "-bp" in which:
        s = Setup(name, "bp", np, dt, batch, invertible=which.endswith("-square"))
        if which.startswith("ours"):
            fn = s.updates
        else:
            import torch
            torch.set_num_threads(os.cpu_count() or 1)
            fn = _torch_step(name, s, torch)
    elif which == "ours":
        s = Setup(name, "gait", np, dt, batch)
        fn = s.train_step
    else:
        s = Setup(name, "gait", np, dt, batch)
        import torch
        from torch_gp import TorchGP
        torch.set_num_threads(os.cpu_count() or 1)
        tg = TorchGP(s.net, lam=s.cfg.ortho_lambda, lr=s.cfg.lr,
                     dtype=torch.float32 if dt == np.float32 else torch.float64)
        xt, yt = torch.tensor(s.x), torch.tensor(s.y)
        fn = lambda: tg.step(xt, yt, s.loss.n_classes)            # noqa: E731
    fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def bench_torch(xp, quick):
    print("\n## 3. against PyTorch CPU on the identical networks")
    try:
        import torch
    except ImportError:
        print("- skipped: torch is not installed (pip install torch==2.13.0)")
        return
    from torch_gp import check_against
    print(f"  torch {torch.__version__} ({os.cpu_count()} threads). GP step: forward, rule (torch: an LU solve per "
          "square layer), regulariser, Adam, every step. Each figure is a separate process, alternating "
          "gait_ref / torch (two libraries' thread pools in one process slow each other down).")
    for name, (_, batch, qbatch) in NETS.items():
        b = qbatch if quick else batch
        for dtype in ("float32", "float64"):
            med = alternating_processes({which: [__file__, "--time-one", which, name, dtype, str(b),
                                                 str(2 if quick else 8)] for which in ("ours", "torch")},
                                        2 if quick else 3)
            t = {k: v[0] for k, v in med.items()}
            r = t["ours"] / t["torch"]
            extra = ""
            if dtype == "float64":
                s = Setup(name, "gait", np, np.float64, b)
                extra = f"; torch's updates = gait_ref's to {check_against(s.net, s.x, s.y, s.loss.n_classes, s.updates()):.1e}"
            print(f"- {name} batch {b} {dtype}: GP gait_ref {t['ours'] * 1e3:.0f} ms, torch {t['torch'] * 1e3:.0f} ms, "
                  f"ratio {r:.2f} ({'meets' if r <= 1.0 else 'MISSES'} 1.0){extra}", flush=True)
    peak = gemm_rate(xp)
    for name, (_, batch, qbatch) in NETS.items():
        b = qbatch if quick else batch
        for net in ("ordinary", "square"):
            suffix = "-bp-square" if net == "square" else "-bp"
            med = alternating_processes({which: [__file__, "--time-one", which + suffix, name, "float32", str(b),
                                                 str(2 if quick else 10)] for which in ("ours", "torch")},
                                        2 if quick else 3)
            t = {k: v[0] for k, v in med.items()}
            bp = Setup(name, "bp", np, np.float32, b, invertible=net == "square")
            # each library's own flops: autograd's backward also multiplies the auxiliary channels' zeros
            fl = {"ours": bp_flops(bp.net, b, K=bp.loss.n_classes), "torch": bp_flops(bp.net, b, live=False)}
            eff = {k: f"{100 * fl[k] / v / 1e9 / peak:.0f}%" for k, v in t.items()}
            print(f"- {name} batch {b} float32 BP (forward + backward, {net} net, separate processes): gait_ref "
                  f"{t['ours'] * 1e3:.0f} ms ({eff['ours']} of GEMM), torch {t['torch'] * 1e3:.0f} ms "
                  f"({eff['torch']}), ratio {t['ours'] / t['torch']:.2f}; GEMM {peak:.0f} GFLOP/s", flush=True)


def bench_memory(quick):
    print("\n## 6. peak memory allocated in a step (tracemalloc; the highest of 8 steps), GP against BP, same square network")
    for name, (_, batch, qbatch) in NETS.items():
        b = qbatch if quick else batch
        peaks = {}
        for rule in ("bp", "gait"):
            s = Setup(name, rule, np, np.float32, b, invertible=True)
            s.train_step()                              # Adam state allocated before measuring
            peaks[rule] = 0
            for _ in range(2 if quick else 8):          # the highest step: a step that renews the kept
                tracemalloc.start()                     # inverses allocates them anew
                s.train_step()
                peaks[rule] = max(peaks[rule], tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
        r = peaks["gait"] / peaks["bp"]
        print(f"- {name} batch {b}: BP {peaks['bp'] / 2**20:.0f} MiB, GP {peaks['gait'] / 2**20:.0f} MiB, "
              f"ratio {r:.2f} ({'meets' if r <= 1.5 else 'MISSES'} 1.5)", flush=True)


def bench_data(xp, quick):
    print("\n## 7. HDF5 shard reading at 64 px against one CPU training step")
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
        data = ShardSet(tmp, "train")
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


# --only's sections, in the order they run; torch and memory measure the host only
SECTIONS = {"ratio": bench_ratio, "efficiency": bench_efficiency, "torch": bench_torch, "float32": bench_float32,
            "gemm": bench_gemm, "memory": lambda xp, quick: bench_memory(quick), "data": bench_data,
            "solver": bench_solver, "floor": bench_floor, "floor224": bench_floor224, "ratio224": bench_ratio224,
            "efficiency224": bench_efficiency224, "float32-224": bench_float32_224}
HOST_ONLY = {"torch", "memory"}


@click.command()
@click.option("--quick", is_flag=True, help="Small batches and few repeats: checks that everything runs.")
@click.option("--backend", default="numpy", type=click.Choice(["numpy", "cupy"]))
@click.option("--only", default="ratio,efficiency,torch,float32,gemm,memory,data,solver,floor,"
              "floor224,ratio224,efficiency224,float32-224", show_default=True, help="Sections, comma-separated.")
@click.option("--time-one", nargs=5, hidden=True)
def main(quick, backend, only, time_one):
    if time_one:                                   # a worker of bench_torch: print seconds per step
        which, name, dtype, batch, steps = time_one
        print(_time_one(which, name, dtype, int(batch), int(steps)))
        return
    xp = get_backend(backend)
    print(f"gait_ref benchmarks: backend {backend}, {os.cpu_count()} CPU cores, numpy {np.__version__}"
          + (" (quick)" if quick else ""))
    print(blas_line() + f"; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')}")
    parts = only.split(",")
    unknown = sorted(set(parts) - set(SECTIONS))
    if unknown:
        raise click.BadParameter(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}",
                                 param_hint="--only")
    for name, run in SECTIONS.items():              # in this order, whatever the order of --only
        if name in parts and (backend == "numpy" or name not in HOST_ONLY):
            run(xp, quick)

if __name__ == "__main__":
    main()
