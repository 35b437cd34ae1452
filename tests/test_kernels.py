"""The fused kernels (gait_ref.kernels): what cupy.fuse compiles computes what the host
runs, bit for bit; the hand-written CUDA kernels' numpy twins match plain oracles; their
CUDA sources compile (with NVRTC, where installed); and the GPU runs them within the
launch targets (counted on the emulated device)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from gait_ref import emulation as em
from gait_ref.activations import LeakyReLU
from gait_ref.im2col import _COL2IM, ConvGeometry, col2im, im2col
from gait_ref.kernels import Kernel, RawKernel
from gait_ref.linalg import _NARROW_MINUS, _narrow_minus_host, diagonal
from gait_ref.live import _WIDEN, widen
from gait_ref.optim import Adam, _adam_update

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


@pytest.mark.parametrize("place", ["hat", "tf"])
def test_the_fused_adam_is_the_blocked_host_update_bit_for_bit(place):
    """numpy runs Adam in cache-sized blocks (the twin); cupy.fuse compiles ``_adam_update``.
    Run as plain numpy, the fused source gives the twin's bits, on an array larger than a block."""
    rng = np.random.default_rng(0)
    shape = (300, 400)                                                   # 120,000 > CPU_BLOCK
    p0, g = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
    opt = Adam(eps_placement=place)
    p1, p2 = p0.copy(), p0.copy()
    m, v = np.zeros_like(p0), np.zeros_like(p0)
    plain = _adam_update(np, place)
    one = np.float32
    for t in (1, 2, 3):
        opt.step({"w": p1}, {"w": g * t})
        if place == "hat":
            scale_v, lr_t = one(1 - 0.999 ** t), one(1e-3 / (1 - 0.9 ** t))
        else:
            scale_v, lr_t = one(1), one(1e-3 * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t))
        plain(p2, m, v, g * t, one(0.9), one(1 - 0.9), one(0.999), one(1 - 0.999), scale_v, one(1e-8), lr_t)
    assert bits(p1) == bits(p2) and bits(opt.m["w"]) == bits(m) and bits(opt.v["w"]) == bits(v)


def test_the_fused_leaky_inverse_difference_is_the_host_form_bit_for_bit():
    act = LeakyReLU(0.1)
    rng = np.random.default_rng(1)
    y = rng.standard_normal((6, 5, 4, 3)).astype(np.float32).transpose(0, 3, 1, 2)     # channels-last
    d = (rng.standard_normal((6, 5, 4, 3)) * rng.choice([1e-4, 1.0, 10.0], (6, 5, 4, 3))).astype(np.float32)
    d = d.transpose(0, 3, 1, 2)
    kernel = act._kernels[3]
    a = np.float32(0.1)
    assert bits(kernel.plain(y, d, a)) == bits(kernel.twin(y, d, a))
    out = act.inverse_difference(y, d)
    assert not out.flags.c_contiguous and out.transpose(0, 2, 3, 1).flags.c_contiguous   # the layout is kept


def test_a_kernel_keeps_the_channels_last_layout_on_the_emulated_device():
    act = LeakyReLU(0.1)
    h = em.asarray(np.random.default_rng(2).standard_normal((2, 3, 4, 5)).astype(np.float32)).transpose(0, 3, 1, 2)
    em.reset_counters()
    y = act.f(h)
    assert em.counters["launch"] == 1 and not y.flags.c_contiguous and y.transpose(0, 2, 3, 1).flags.c_contiguous
    assert np.array_equal(y.get(), act.f(h.get()))


@pytest.mark.parametrize("K,S,H,pad", [(3, 1, 6, "same"), (3, 2, 7, "same"), (2, 2, 8, "valid"), (5, 1, 5, "same")])
def test_col2im_twin_is_the_adjoint_of_im2col(K, S, H, pad):
    """<im2col(x), c> = <x, col2im(c)> for random x and c (the twin the emulator runs), and the
    taps add in the CUDA kernel's order: a naive per-pixel gather gives the same bits."""
    g = ConvGeometry(3, H, H, K, S, pad)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, H, H))
    c = rng.standard_normal((2 * g.Ho * g.Wo, g.D))
    assert np.isclose(np.vdot(im2col(x, g), c), np.vdot(x, col2im(c, g, 2)), rtol=1e-12)
    t, _, l, _ = g.pads
    c6 = c.reshape(2, g.Ho, g.Wo, K, K, 3)
    gathered = np.zeros((2, H, H, 3))
    for n, y, xx, ch in np.ndindex(gathered.shape):            # the CUDA kernel's loop, in Python
        acc = 0.0
        for ky in range(K):
            yy = y + t - ky
            if yy < 0 or yy % S or yy // S >= g.Ho:
                continue
            for kx in range(K):
                xw = xx + l - kx
                if xw < 0 or xw % S or xw // S >= g.Wo:
                    continue
                acc += c6[n, yy // S, xw // S, ky, kx, ch]
        gathered[n, y, xx, ch] = acc
    assert bits(gathered) == bits(col2im(c, g, 2).transpose(0, 2, 3, 1))


def test_widen_and_the_narrow_residual_twins():
    rng = np.random.default_rng(4)
    g = rng.standard_normal((5, 3)).astype(np.float32)
    w = widen(g, 7)
    assert w.shape == (5, 7) and np.array_equal(w[:, :3], g) and not w[:, 3:].any()
    r = rng.standard_normal((5, 7)).astype(np.float32)
    expected = np.concatenate([g, np.zeros((5, 4), np.float32)], axis=1) - r
    assert np.array_equal(_narrow_minus_host(g, 3, 7, r.copy()), expected)


def test_diagonal_is_a_view_of_the_leading_diagonal():
    M = np.zeros((2, 3, 5))
    d = diagonal(M)
    d += 1
    assert np.array_equal(M, np.broadcast_to(np.eye(3, 5), (2, 3, 5)))


RAW_KERNELS = [_COL2IM, _WIDEN, _NARROW_MINUS]


def _nvrtc():
    """NVRTC's compile function through ctypes, or None (the wheel nvidia-cuda-nvrtc-cu12)."""
    import ctypes
    import glob
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    paths = [p for root in (spec.submodule_search_locations if spec else [])
             for p in glob.glob(f"{root}/cuda_nvrtc/lib/libnvrtc.so*")]
    for path in paths:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def elementwise_source(k: RawKernel, T: str = "float") -> str:
    """The kernel CuPy would generate for ``k`` (its loop over the output's elements), with T
    bound to ``T``: enough to compile the operation and see it is valid CUDA C++."""
    params = []
    for p in (k.in_params + ", " + k.out_params).split(","):
        words = p.split()
        raw = words[0] == "raw"
        typ, name = words[-2], words[-1]
        typ = T if typ == "T" else {"int32": "int", "int64": "long long"}[typ]
        params.append((raw, typ, name))
    args = ", ".join(f"{typ}* _raw_{name}" if raw or name in k.out_params.split()[-1:] else f"{typ} {name}"
                     for raw, typ, name in params)
    out_name = params[-1][2]
    raws = "\n".join(f"    {typ}* {name} = _raw_{name};" for raw, typ, name in params if raw)
    return (f"typedef {T} T;\nextern \"C\" __global__ void {k.name}({args}, long long _n) {{\n"
            f"  for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < _n; i += blockDim.x * gridDim.x) {{\n"
            f"{raws}\n    {T}& {out_name} = _raw_{out_name}[i];\n{k.operation}\n  }}\n}}\n")


@pytest.mark.parametrize("kernel", RAW_KERNELS, ids=lambda k: k.name)
def test_the_hand_written_cuda_kernels_compile(kernel):
    import ctypes
    lib = _nvrtc()
    if lib is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12); the GPU check compiles them")
    for T in ("float", "double"):
        src = elementwise_source(kernel, T).encode()
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"k.cu", 0, None, None) == 0
        opts = (ctypes.c_char_p * 1)(b"--gpu-architecture=compute_80")
        res = lib.nvrtcCompileProgram(prog, 1, opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert res == 0, log.value.decode()


def test_a_kernel_runs_its_numpy_code_and_counts_one_launch_on_the_emulated_device():
    k = Kernel(lambda xp: lambda a, b: xp.sqrt(a * a + b * b), name="hypot")
    a, b = np.arange(4.0), np.ones(4)
    assert np.array_equal(k(a, b), np.sqrt(a * a + b * b))
    em.reset_counters()
    out = k(em.asarray(a), em.asarray(b))
    assert em.reset_counters()["launch"] == 1 and np.array_equal(out.get(), np.sqrt(a * a + b * b))


def test_a_training_step_is_within_the_launch_targets():
    """conv7 at 64 px, float32: at most 250 launches for a BP step and 500 for a GP step
    (steps 2-4, the refined inverses kept), as CuPy 14.2 would launch them."""
    from launches import TARGETS, step_counts
    for (net, rule), target in TARGETS.items():
        counts, _ = step_counts(net, rule)
        assert counts["launch"] <= target, (net, rule, counts)
        assert counts["internal_reads"] == 0 and counts["h2d"] == 0, counts


# ---- on a GPU: the compiled kernels against what the host runs ------------------------------------------
@pytest.fixture
def cupy():
    from gait_ref.backend import cupy_available
    if not cupy_available():
        pytest.skip("cupy or a CUDA GPU is not available")
    import cupy
    return cupy


@pytest.mark.gpu
def test_the_raw_cuda_kernels_equal_their_twins_on_a_gpu(cupy):
    rng = np.random.default_rng(5)
    for K, S, H, pad in [(3, 1, 9, "same"), (3, 2, 9, "same"), (5, 2, 12, "valid")]:
        g = ConvGeometry(4, H, H, K, S, pad)
        c = rng.standard_normal((3 * g.Ho * g.Wo, g.D)).astype(np.float32)
        assert bits(col2im(cupy.asarray(c), g, 3).get()) == bits(col2im(c, g, 3))
    gn = rng.standard_normal((6, 5)).astype(np.float32)
    assert bits(widen(cupy.asarray(gn), 9).get()) == bits(widen(gn, 9))
    r = rng.standard_normal((6, 9)).astype(np.float32)
    assert bits(_NARROW_MINUS(cupy.asarray(gn), 5, 9, cupy.asarray(r)).get()) == bits(_narrow_minus_host(gn, 5, 9, r.copy()))


@pytest.mark.gpu
def test_the_fused_kernels_agree_with_the_host_on_a_gpu(cupy):
    """cupy.fuse compiles the host's own code; the GPU may contract a * b + c into one FMA, so
    agreement is to a few float32 roundings, not bit for bit."""
    rng = np.random.default_rng(6)
    p, g = rng.standard_normal((64, 33), dtype=np.float32), rng.standard_normal((64, 33), dtype=np.float32)
    host, dev = Adam(), Adam()
    hp, dp = {"w": p.copy()}, {"w": cupy.asarray(p)}
    for t in range(3):
        host.step(hp, {"w": g})
        dev.step(dp, {"w": cupy.asarray(g)})
    np.testing.assert_allclose(dp["w"].get(), hp["w"], rtol=1e-6, atol=1e-7)
    act = LeakyReLU(0.1)
    y = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    d = (rng.standard_normal(y.shape) * 1e-3).astype(np.float32)
    np.testing.assert_allclose(act.inverse_difference(cupy.asarray(y), cupy.asarray(d)).get(),
                               act.inverse_difference(y, d), rtol=1e-6, atol=1e-9)


@pytest.mark.gpu
def test_philox_on_a_gpu_draws_the_hosts_numbers(cupy):
    from gait_ref.philox import PhiloxNormal
    dev = PhiloxNormal(cupy, [11, 5, 2]).standard_normal((1000,)).get()
    host = PhiloxNormal(np, [11, 5, 2]).standard_normal((1000,))
    np.testing.assert_allclose(dev, host, rtol=1e-12, atol=1e-12)     # integers exact; log/cos to an ulp or so
