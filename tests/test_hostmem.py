"""Host memory between steps (gait_ref.hostmem): counted in minor page faults, not timed."""
import subprocess
import sys
from pathlib import Path

import pytest

from gait_ref import hostmem

ROOT = Path(__file__).resolve().parents[1]
# BP steps of the conv7 network at 64 px (batch 32) in a fresh process: minor page faults per
# step after three warm-up steps, with glibc's default malloc settings or with them kept
WORKER = """
import resource, sys
from gait_ref.hostmem import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
import numpy as np
# 4 KiB pages only: numpy asks for transparent huge pages on large arrays, and where the
# kernel grants them a fault maps 2 MiB, so the count would depend on free memory
getattr(np._core.multiarray, "_set_madvise_hugepage", lambda on: None)(False)
from gait_ref.architectures import build
from gait_ref.losses import SoftmaxCrossEntropy
net = build("conv7", (3, 64, 64), 10, invertible=False)
net.init(0, "orthogonal", np, np.float32)
rng = np.random.default_rng(0)
x, y = rng.random((32, 3, 64, 64), dtype=np.float32), rng.integers(0, 10, 32)
loss = SoftmaxCrossEntropy(10)

def step():
    tr = net.forward(x)
    net.backward(tr, loss.value_and_grad(tr.output, y)[1])
for _ in range(3):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
"""


def _faults_per_step(mode):
    out = subprocess.run([sys.executable, "-c", WORKER, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not hostmem.keep_freed_memory(), reason="the C library here has no glibc mallopt")
def test_steps_reuse_the_memory_the_last_step_freed():
    """With glibc's defaults every step gave its large temporaries back to the kernel and
    faulted them in again (thousands of page faults a step); kept, a step after the first few
    faults in nothing."""
    kept = _faults_per_step("kept")
    # the control: glibc's defaults fault thousands of times a step, though not in every
    # process (where the heap's top can grow, or cannot, depends on the address layout)
    defaults = []
    while len(defaults) < 5 and max(defaults, default=0) < 500:
        defaults.append(_faults_per_step("default"))
    if max(defaults) < 500:
        pytest.skip(f"this allocator keeps freed memory anyway ({defaults} faults per step by default)")
    assert kept < 20, (kept, defaults)


def test_keeping_memory_is_idempotent_and_described():
    first = hostmem.keep_freed_memory()
    assert hostmem.keep_freed_memory() == first
    assert hostmem.describe() == ("default" if not first else
                                  f"glibc mallopt: trim threshold {hostmem.TRIM_THRESHOLD}, "
                                  f"mmap threshold {hostmem.MMAP_THRESHOLD}")
