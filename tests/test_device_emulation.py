"""The GPU path, proven on the CPU: the trainer end to end on the strict emulated device.

``--backend emulated`` runs CuPy's code path (``gait_ref.emulation``): device arrays that
refuse implicit conversion to numpy, CuPy 14.2's namespace only, and counters of every
device-to-host read (CuPy's own reads inside its functions included) and host-to-device
copy. Every rule on every architecture family trains, measures angles, evaluates, checkpoints and resumes on it, within the sync
budget: at most 10 host reads per training step that does not log (measured: 1, the
previous step's finiteness checks; target rules in float32 read once more, their refined
solves' residuals, and again for any recomputation) and exactly one host-to-device copy
(the batch).
"""

import numpy as np
import pytest

from gait_ref import emulation as em
from gait_ref.backend import BackendError, get_backend, smoke_test
from gait_ref.config import Config
from gait_ref.meter import TIMING_FIELDS
from gait_ref.runfolder import read_records as records
from gait_ref.train import Trainer

from .helpers import make_shards

SYNC_BUDGET = 10
ALL_RULES = ("bp", "fa", "dfa", "tp", "itp", "gait-vanilla", "gait", "dtp", "sdtp", "ldrl")
LEARNED = ("bp", "fa", "dfa", "dtp", "sdtp", "ldrl")
# (architecture family, --arch, task, rules that the architecture serves)
FAMILIES = [
    ("neurips", "mlp-16x2", "synthetic", [r for r in ALL_RULES if r != "sdtp"]),   # its output is 16 wide
    ("scaling-cifar", "mlp-shallow", "synthetic", ALL_RULES),
    ("scaling-imagenet", "conv7", "shards", ALL_RULES),
    ("bartunov", "bartunov-mlp", "synthetic", LEARNED),
    ("bartunov", "bartunov-lc", "synthetic", LEARNED),
    ("ernoult", "vgg-4-4", "synthetic", LEARNED),
]
CASES = [pytest.param(arch, task, rule, id=f"{arch}-{rule}") for _, arch, task, rules in FAMILIES for rule in rules]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu-shards")
    make_shards(root, n_train=48, n_val=16, size=32, per_shard=8)
    return root


def traffic(cfg: Config, trainer_out=None):
    """Run the trainer; per step: (step, logged, host reads, host-to-device copies)."""
    per_step = []
    em.reset_counters()

    def on_step(step, logged):
        c = em.reset_counters()
        per_step.append((step, logged, c["d2h"] + c["sync"], c["h2d"]))

    t = Trainer(cfg)
    t.run(on_step=on_step)
    if trainer_out is not None:
        trainer_out.append(t)
    return per_step


def strip(recs):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in recs]


@pytest.mark.parametrize("arch,task,rule", CASES)
def test_train_angles_eval_checkpoint_resume_on_the_emulated_device(tmp_path, shards, arch, task, rule):
    _train_angles_eval_checkpoint_resume(tmp_path, shards, arch, task, rule)


def test_renewing_layers_with_narrow_right_hand_sides_train_and_resume_on_the_emulated_device(tmp_path):
    """At 64 px and batch 8, conv7's conv2 solves 512 rows a step with D = 216 and 24 live
    channels: it keeps only 24 rows of W^-1 and bounds its backward error without the residual
    (gait_ref.linalg, ``_solve_by_rows``). The same checks as above, on that path."""
    root = tmp_path / "shards64"
    make_shards(root, n_train=48, n_val=16, size=64, per_shard=8)
    trainers = _train_angles_eval_checkpoint_resume(tmp_path, root, "conv7", "shards", "gait")
    conv2 = trainers[0].rule.refined[1]
    assert conv2.X.shape == (24, 216) and conv2.K == 0, (conv2.X.shape, conv2.K)


def _train_angles_eval_checkpoint_resume(tmp_path, shards, arch, task, rule):
    data = dict(task="imagenet", data=str(shards)) if task == "shards" else dict(task="synthetic")
    common = dict(arch=arch, rule=rule, backend="emulated", batch_size=8, angles_every=4, log_every=1000,
                  eval_subset=16, ldrl_iters=2, quiet=True, **data)
    trainers = []
    em.called.clear()
    steps = traffic(Config(**common, max_steps=6, out=str(tmp_path / "a")), trainers)
    assert [s for s, *_ in steps] == list(range(1, 7))
    stats = getattr(trainers[0].rule, "stats", {"recursions": 0})
    quiet = [(step, reads, copies) for step, logged, reads, copies in steps[1:] if not logged]
    for step, reads, copies in quiet:
        assert reads <= SYNC_BUDGET, (step, reads)
        assert copies == 1, (step, copies)                               # the batch, labels packed in
    # the previous step's checks, plus one residual read per recursion of a refined solve
    assert sum(r for _, r, _ in quiet) <= len(quiet) + stats["recursions"], (quiet, stats)
    assert sum(not logged for _, logged, _, _ in steps) >= 3
    a = records(tmp_path / "a")
    measured = [r for r in a if "angles_deg" in r]
    assert [r["step"] for r in measured] == [1, 5] and all(np.isfinite(list(r["angles_deg"].values())).all()
                                                         for r in measured)
    assert a[-1]["split"] == "test" and a[-1]["step"] == 6 and 0 <= a[-1]["top1"] <= 1
    # every CuPy call made is one whose internal reads are known (gait_ref/emulation/cupy-syncs.json)
    assert not em.called - set(em.SYNC_SURVEY["syncs"]) - set(em.SYNC_SURVEY["sync_free"])
    # stop at step 2 (checkpoint), resume to 6: the same records, bit for bit
    Trainer(Config(**common, max_steps=2, out=str(tmp_path / "b"))).run()
    Trainer(Config(**common, max_steps=6, out=str(tmp_path / "b"), resume=True)).run()
    assert strip(records(tmp_path / "b")) == strip(a)
    return trainers


def test_host_to_device_copies_with_worker_processes_and_in_memory_data(tmp_path, shards):
    """Shards read by two worker processes: one copy per step. The data set in device
    memory: no copy per step at all (the epoch's order is copied once per epoch)."""
    common = dict(task="imagenet", data=str(shards), arch="conv7", rule="gait", backend="emulated", batch_size=8,
                  log_every=1000, eval_subset=16, quiet=True, max_steps=5)
    steps = traffic(Config(**common, loader_workers=2))
    assert [c for s, logged, r, c in steps[1:] if not logged] == [1, 1, 1]
    steps = traffic(Config(**common, in_memory="device"))
    assert [c for s, logged, r, c in steps[1:] if not logged] == [0, 0, 0]


def test_emulated_arrays_refuse_what_cupy_refuses():
    a = em.asarray(np.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    with pytest.raises(TypeError, match="numpy array mixed into a device operation"):
        a + np.ones(3)
    with pytest.raises(TypeError, match="numpy array mixed"):
        em.concatenate([a, np.ones((1, 3))])
    before = dict(em.counters)
    s = (a * 2).sum()                                          # a reduction is a 0-d device array
    assert isinstance(s, em.ndarray) and s.shape == ()
    assert em.counters == {**before, "launch": before["launch"] + 2}      # no read; two kernels
    assert float(s) == 30.0 and em.counters["d2h"] == before["d2h"] + 1
    a[a > 2]                                                   # boolean mask: its size is read
    assert em.counters["d2h"] == before["d2h"] + 2


def test_emulated_namespace_is_cupys():
    api = set(em.API["cupy"])
    assert em.API["cupy_version"] == "14.2.0"
    missing = sorted(n for n in dir(np) if callable(getattr(np, n)) and not n.startswith("_") and n not in api)
    assert missing, "numpy has functions that CuPy lacks"
    for name in missing[:20]:
        assert not hasattr(em, name), name
    assert hasattr(em, "where") and hasattr(em.linalg, "inv") and not hasattr(em.linalg, "lu_factor")
    assert hasattr(em.cupyx.scipy.linalg, "lu_factor")


def test_api_list_matches_the_installed_cupy():
    cupy = pytest.importorskip("cupy")
    from gait_ref.emulation.make_api_list import collect
    if cupy.__version__ != em.API["cupy_version"]:
        pytest.skip(f"cupy {cupy.__version__} installed, the list is of {em.API['cupy_version']}")
    assert set(em.API["cupy"]) <= set(collect()["cupy"])


def test_backend_smoke_test_names_the_missing_library(monkeypatch):
    """A CuPy without its CUDA libraries fails at the first kernel: get_backend('cupy')
    turns that into one line naming the library and the install command."""
    import types

    from gait_ref import backend

    def broken_solve(a, b):
        raise ImportError('Failure finding "libcublasLt.so.13 or libcublasLt.so.12": No such file:\n libcublasLt.so.12')

    fake = types.SimpleNamespace(**{k: getattr(em, k) for k in ("ones", "eye", "tanh", "arange", "random",
                                                                "float32", "float64")})
    fake.linalg = types.SimpleNamespace(solve=broken_solve)
    with pytest.raises(BackendError) as e:
        smoke_test(fake)
    msg = str(e.value)
    assert "an LU solve failed, cuBLAS is missing" in msg and 'pip install -e ".[gpu]"' in msg
    assert "\n" not in msg
    monkeypatch.setattr(backend, "_cupy", fake)
    monkeypatch.setattr(backend, "cupy_available", lambda: True)
    with pytest.raises(BackendError, match="cuBLAS is missing"):
        get_backend("cupy")


def test_out_of_device_memory_names_the_phase_the_memory_and_the_option_to_lower(monkeypatch):
    """CuPy's OutOfMemoryError (a MemoryError) ended in a traceback; now the run ends naming
    the training step or the evaluation, the batch, the card's free and total memory and
    the option to lower (--eval-batch-size is new: the evaluation batch was fixed at 1000)."""
    cfg = Config(task="synthetic", rule="bp", backend="emulated", batch_size=20, max_steps=2, eval_batch_size=50,
                 quiet=True)
    t = Trainer(cfg)
    assert t.data.eval_loader.batch_size == 50

    def no_memory(*args, **kwargs):
        raise MemoryError("Out of memory allocating 1,073,741,824 bytes")
    monkeypatch.setattr(t.net, "forward", no_memory)
    with pytest.raises(RuntimeError, match=r"out of memory in training step 1 \(a batch of 20 images\): lower "
                                           r"--batch-size.*; the device has 16.0 of 16.0 GiB free \(MemoryError: Out"):
        t.run()
    t = Trainer(cfg)
    forward = t.net.forward

    def no_memory_when_evaluating(*args, **kwargs):
        if t._evaluating:
            raise MemoryError("Out of memory")
        return forward(*args, **kwargs)
    monkeypatch.setattr(t.net, "forward", no_memory_when_evaluating)
    with pytest.raises(RuntimeError, match=r"out of memory while evaluating after step 2 \(batches of 50 images\): "
                                           r"lower --eval-batch-size"):
        t.run()
