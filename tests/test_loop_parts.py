"""The rooms the training loop is built from, each at its own level (no data set loaded,
milliseconds each): the meter, the stop agreement, resume's broadcast, the step's state,
the learning-rate schedule, the metrics reader and the replicas check. The end-to-end
tests (test_cli, test_reliability, test_distributed) remain the oracle for the loop."""
import signal

import numpy as np
import pytest

from gait_ref import emulation as em
from gait_ref.assembly import build_step
from gait_ref.backend import get_backend, to_numpy
from gait_ref.checkpoint import save_checkpoint
from gait_ref.config import Config
from gait_ref.distributed import replicas_differ
from gait_ref.meter import TrainMeter
from gait_ref.runfolder import METRICS, Position, RunFolder, RunFolderError, read_records
from gait_ref.step import StepResult
from gait_ref.stopping import StopFlag
from gait_ref.train import epoch_lr


# ---- the meter --------------------------------------------------------------------------------------------
def _result(xp, loss, correct, n, feedback=None):
    scalar = lambda v: xp.asarray(np.float32(v))     # noqa: E731
    return StepResult(scalar(loss), scalar(correct), n, None, [],
                      {k: scalar(v) for k, v in (feedback or {}).items()})


def test_the_meter_reads_the_device_once_per_record():
    """``add`` reads nothing; ``record`` reads the sums and the feedback losses in one read."""
    xp = get_backend("emulated")
    meter = TrainMeter(xp)
    em.reset_counters()
    for loss, correct in ((3.0, 1.0), (5.0, 2.0), (4.0, 0.0)):
        meter.add(_result(xp, loss, correct, 4, {"g1": loss / 10}), data_wait=0.5)
    assert em.reset_counters()["d2h"] == 0
    rec = meter.record()
    assert em.reset_counters()["d2h"] == 1
    assert (rec["loss"], rec["top1"], rec["data_wait_s"]) == (12.0 / 12, 3.0 / 12, 0.5)
    assert rec["feedback_loss"] == {"g1": pytest.approx(0.4)}        # the latest step's
    assert meter.record() is None                                   # it starts again


def test_the_meter_state_round_trip_continues_the_sums():
    """A meter loaded from another's ``state()`` (as a resume does) ends with the same record
    as the meter that was never stopped."""
    a = TrainMeter(np)
    a.add(_result(np, 2.0, 1.0, 5), 0.0)
    state = a.state()
    assert {k: state[k] for k in ("loss", "correct", "n", "steps")} == {"loss": 2.0, "correct": 1.0, "n": 5, "steps": 1}
    b = TrainMeter(np)
    b.load(state)
    for m in (a, b):
        m.add(_result(np, 6.0, 3.0, 5), 0.0)
    ra, rb = a.record(), b.record()
    assert (ra["loss"], ra["top1"]) == (rb["loss"], rb["top1"]) == (0.8, 0.4)


# ---- the stop agreement --------------------------------------------------------------------------------------
class Ranks:
    """Fake communicators of several ranks that agree by taking the largest flag."""

    def __init__(self, n):
        self.flags = [StopFlag(self) for _ in range(n)]

    def max_int(self, value):
        return max(f.requested for f in self.flags)


def test_a_signal_on_one_rank_stops_every_rank():
    ranks = Ranks(3)
    assert not any(f.agree() for f in ranks.flags)
    ranks.flags[2].request(signal.SIGUSR1)
    assert all(f.agree() for f in ranks.flags)
    assert {(f.agreed, f.name) for f in ranks.flags} == {(signal.SIGUSR1, "SIGUSR1")}


def test_a_signal_handled_while_the_ranks_agree_is_not_lost():
    """The handler runs when the agreement's all-reduce returns (Python runs handlers between
    bytecodes): the ranks' answer for that step is no, and the flag must survive it to stop
    the run at the next agreement. (Overwriting it is the likely cause of a CI run in which
    a 2-rank job signalled mid-run finished all its steps with status 0.)"""
    class SignalDuringTheAllReduce:
        def max_int(self, value):
            flag.request(signal.SIGTERM)               # arrives while this rank waits for its peers
            return value                               # the peers' answer: nobody had been signalled
    flag = StopFlag(SignalDuringTheAllReduce())
    assert not flag.agree() and flag.agreed == 0
    assert flag.agree() and flag.agreed == signal.SIGTERM


# ---- the run folder across ranks --------------------------------------------------------------------------
class Broadcast:
    """Fake communicators of ranks 0 and 1: what rank 0 broadcasts, rank 1 receives."""

    def __init__(self, rank, sent):
        self.rank, self.size, self.sent = rank, 2, sent

    @property
    def is_root(self):
        return self.rank == 0

    def bcast_object(self, obj, root=0):
        if self.rank == 0:
            self.sent.append(obj)
            return obj
        return self.sent.pop(0)

    def barrier(self, timeout=True):
        pass


def test_resume_broadcasts_rank_0s_error_to_every_rank(tmp_path):
    sent, restored = [], []
    with pytest.raises(RunFolderError, match="holds no checkpoint") as root:
        RunFolder(tmp_path, Broadcast(0, sent)).resume(restored.append)
    with pytest.raises(RunFolderError) as peer:
        RunFolder(tmp_path, Broadcast(1, sent)).resume(restored.append)
    assert str(peer.value) == str(root.value) and restored == []


def test_resume_reads_rank_0s_checkpoint_on_every_rank(tmp_path):
    """Rank 0 checks the checkpoint and keeps the metrics lines it covers; rank 1 reads the
    file rank 0 chose and writes nothing."""
    config = Config(task="synthetic").resolved().to_dict()
    pos = Position(step=7, epoch=1, batch=2, pending_eval=True, best_val={"top1": 0.5, "epoch": 0})
    save_checkpoint(tmp_path / "last.h5", {"fc1.W": np.eye(2)}, {"t": 3},
                    {**pos.meta(), "config": config, "metrics_lines": 1})
    (tmp_path / METRICS).write_text('{"split": "train", "step": 5}\n{"split": "train", "step": 9}\n')
    sent, got = [], []
    for rank in (0, 1):
        restored = []
        meta, changes = RunFolder(tmp_path, Broadcast(rank, sent), config).resume(
            lambda params, state, meta: restored.append((to_numpy(params["fc1.W"]).tolist(), state["t"])))
        got.append((Position.from_meta(meta), restored, changes))
    assert got[0] == got[1] == (pos, [([[1.0, 0.0], [0.0, 1.0]], 3)], {})
    assert read_records(tmp_path) == [{"split": "train", "step": 5}]


# ---- the training step's state ------------------------------------------------------------------------------
@pytest.mark.parametrize("rule,arch,dtype", [("gait", "mlp-16x2", "float32"), ("sdtp", "bartunov-mlp", "float64")])
def test_the_step_state_round_trip_trains_on_identically(rule, arch, dtype):
    """A step loaded from another's ``state()`` (parameters, Adam's moments, the rule's kept
    inverses, or learned feedback and its optimisers) takes the same next step, bit for bit."""
    cfg = Config(task="synthetic", arch=arch, rule=rule, dtype=dtype)
    rng = np.random.default_rng(0)
    batches = [(rng.random((8, 16)).astype(dtype), rng.integers(0, 4, 8)) for _ in range(3)]
    a = build_step(cfg, (16,), 4)
    for i, (x, y) in enumerate(batches[:2]):
        a(x, y, step=i + 1, epoch=0)
    params, state = a.state()
    assert any(k.startswith("rule/") for k in state) and {"t"} <= set(state)
    b = build_step(cfg, (16,), 4)
    b.load({k: np.array(v) for k, v in params.items()}, {k: np.array(v) if k != "t" else v for k, v in state.items()},
           np)
    for s in (a, b):
        s(*batches[2], step=3, epoch=0)
    pa, pb = a.parameters(), b.parameters()
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


# ---- the learning-rate schedule -------------------------------------------------------------------------------
# torch.optim.lr_scheduler.CosineAnnealingLR(T_max=epochs, eta_min=min(1e-5, lr)), read from
# the optimiser after each epoch's scheduler.step() (PyTorch 2.13.0, CPU):
TORCH_COSINE = {(0.1, 4): {0: 0.1, 1: 0.08535680352542145, 2: 0.05000500000000001, 3: 0.01465319647457856, 4: 1e-05},
                (0.08, 90): {0: 0.08, 1: 0.07997563612662874, 45: 0.040005, 89: 3.4363873371264994e-05, 90: 1e-05},
                (3e-06, 5): {0: 3e-06, 2: 3e-06, 5: 3e-06}}


def test_the_cosine_schedule_is_pytorchs():
    for (lr, epochs), want in TORCH_COSINE.items():
        for epoch, value in want.items():
            assert epoch_lr(epoch, lr, epochs, "cosine") == pytest.approx(value, rel=1e-12, abs=0)
    assert [epoch_lr(e, 0.1, 4) for e in range(4)] == [0.1] * 4          # constant


# ---- reading the records, comparing replicas -------------------------------------------------------------------
def test_read_records_filters_by_split_and_names_a_missing_file(tmp_path):
    (tmp_path / METRICS).write_text('{"split": "train", "step": 1}\n\n{"split": "test", "step": 1}\n')
    assert read_records(tmp_path) == [{"split": "train", "step": 1}, {"split": "test", "step": 1}]
    assert read_records(tmp_path, "test") == [{"split": "test", "step": 1}]
    with pytest.raises(FileNotFoundError, match="nowhere/metrics.jsonl"):
        read_records(tmp_path / "nowhere")


def test_replicas_differ_names_the_ranks_whose_weights_differ():
    class Gathered:
        def __init__(self, others):
            self.others = others

        def allgather_object(self, digest):
            return [digest] + self.others
    same = replicas_differ(Gathered([]), [np.ones(3)])
    assert same == []
    digest = []
    replicas_differ(type("Spy", (), {"allgather_object": lambda self, d: digest.append(d) or [d]})(), [np.ones(3)])
    assert replicas_differ(Gathered([digest[0], "another"]), [np.ones(3)]) == [2]


def test_top_k_counts_by_the_labels_rank_without_reading_the_device(monkeypatch):
    """Top-1 and top-5 against a naive sort; on the emulated device no read and no
    argpartition, whose CuPy implementation reads the device twice inside unravel_index
    (a sync the emulator cannot see, so its use is refused here outright)."""
    from gait_ref.step import topk_correct
    rng = np.random.default_rng(0)
    for k in (1, 5):
        for _ in range(50):
            n, c = int(rng.integers(1, 40)), int(rng.integers(1, 20))
            z, y = rng.standard_normal((n, c)), rng.integers(0, c, n)
            naive = sum(int(y[i] in np.argsort(-z[i], kind="stable")[:k]) for i in range(n))
            assert int(topk_correct(z, y, k)) == naive
    xp = get_backend("emulated")
    z, y = xp.asarray(rng.standard_normal((64, 1000))), xp.asarray(rng.integers(0, 1000, 64))

    def refused(*args, **kwargs):
        raise AssertionError("argpartition syncs inside CuPy")
    monkeypatch.setattr(xp, "argpartition", refused)
    em.reset_counters()
    topk_correct(z, y, 5)
    assert em.reset_counters()["d2h"] == 0
