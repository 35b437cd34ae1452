"""Data-parallel training on MPI ranks (2 ranks on the CPU), against one process.

Two ranks with B/2 rows each must give what one process gives with the whole batch B.
The only difference is the order of summation: each rank sums its rows' contributions,
then the all-reduce adds the two partial sums (one process adds all B rows in one GEMM
or reduction). In float64 that changes one step's updates by about 1e-14 relative
(measured: 1e-16 to 6e-14 per layer for BP, TP and GAIT-prop on conv7). Arrays are
compared normwise, ||a - b||_inf <= tol ||b||_inf, because round-off in a sum scales with
its terms: the largest difference measured after 5 steps, over every rule and both
networks, is 4.2e-12 (conv1's bias under GAIT-prop: a sum over every position of every
sample), and 2.0e-9 after 16 steps split 2-1-2 ranks. The tolerances (1e-10 for 5 steps,
1e-7 for 16) leave a margin of 25-50; a real error (the regulariser counted twice, a batch
mean over the wrong count, other noise) shows differences of 1e-3 and more.

The orthogonality regulariser is left out of that comparison (``ortho_lambda=0``) because
it amplifies round-off, for a reason that has nothing to do with data parallelism: near
orthogonality its gradient 4 (W W^T - I) W is a difference of nearly equal numbers, and
the weights that only it moves (a square conv's auxiliary output channels, whose targets
are their own forward values) get Adam updates normalised from that noise. Measured on
conv7 with TP after 5 steps: weights differ by up to 1e-7 absolute at lr 4.9e-5. That it
is added once, after the sum, is checked with SGD (linear in the gradient, so nothing
amplifies) and a strong regulariser: ``test_the_regulariser_is_added_once``.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gait_ref.checkpoint import load_checkpoint
from gait_ref.config import Config
from gait_ref.runfolder import read_records as records
from gait_ref.train import Trainer

from .helpers import make_shards

ROOT = Path(__file__).resolve().parents[1]
RULES = ("bp", "fa", "dfa", "tp", "itp", "gait-vanilla", "gait", "dtp", "sdtp", "ldrl")
# a dense network (the NeurIPS MLP; SDTP needs one output unit per class: Bartunov's MLP) and
# the conv net, for every rule
CASES = ([("mlp-16x2", rule) for rule in RULES if rule != "sdtp"] + [("bartunov-mlp", "sdtp")]
         + [("conv7", rule) for rule in RULES])
# GAIT-prop in float32 solves by refinement, each step's backward errors summed over ranks
# so that every rank accepts or retries alike (float64 uses LU: no read, nothing to agree on)
FLOAT32_CASES = [("mlp-16x2", "gait"), ("conv7", "gait")]
# float32, SGD, 5 steps: weights normwise 2e-3 (measured 1.8e-4: conv biases, sums over every
# position, as in float64 scaled by the two eps' ratio); records' losses and measurements
# rtol 2e-3 (measured: step-1 angles to BP on conv7, 21.764 against 21.774 degrees, 4.6e-4)
FLOAT32_TOL, FLOAT32_RTOL = 2e-3, 2e-3
WEIGHTS_TOL = 1e-10       # normwise, after 5 steps in float64 (see the module docstring)


def case_config(arch, rule, shards, backend="numpy", dtype="float64"):
    data = dict(task="imagenet", data=str(shards)) if arch == "conv7" else dict(task="synthetic")
    return dict(**data, arch=arch, rule=rule, backend=backend, dtype=dtype, batch_size=8, max_steps=5,
                angles_every=2, log_every=1, eval_subset=16, ldrl_iters=2, quiet=True, ortho_lambda=0.0)


def float32_config(arch, rule, shards, backend="numpy"):
    """SGD, not Adam: Adam's first steps move every weight by about lr whatever its
    gradient's size, so a gradient entry that is float32 round-off on one side and not the
    other sends the two runs apart (measured on conv7: angles to BP 4.8 against 6.6 degrees
    at step 3, from weights that gave the same angles to 0.004 degrees)."""
    return dict(case_config(arch, rule, shards, backend, dtype="float32"), optimizer="sgd", lr=0.01)


def _mpirun():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


MPIRUN = _mpirun()
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="no MPI runtime: pip install -e \".[mpi]\" (mpi4py + mpich)")


def mpirun(n, *args, timeout=600, **kw):
    return subprocess.run([MPIRUN, "-n", str(n), sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)




@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpi-shards")
    make_shards(root, n_train=64, n_val=16, size=32, per_shard=8)
    return root


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("two-ranks")
    res = mpirun(2, "tests/mpi_driver.py", out, shards)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def normwise(a, b) -> float:
    """||a - b||_inf / ||b||_inf: round-off in a sum scales with its terms, so arrays are
    compared as a whole, not element by element (an element that is a small sum of large
    terms carries the terms' absolute round-off)."""
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale else float(np.abs(a).max())


DIFFS = []      # (case, array, normwise difference): printed when the module ends (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _print_the_measured_differences():
    """After this module's tests, the largest normwise differences the comparisons measured."""
    yield
    for case, what, d in sorted(DIFFS, key=lambda t: -t[2])[:8]:
        print(f"{case:>24} {what:<28} {d:.2e}")


def assert_same_run(one, two, tol=WEIGHTS_TOL, case="", rtol=1e-9):
    """Weights, optimiser and feedback state normwise to ``tol`` (the optimiser's moments to
    100 tol: Adam's second moment squares the gradients); the records' losses and
    measurements to round-off too, their accuracies exactly."""
    p1, o1, m1 = load_checkpoint(Path(one) / "last.h5")
    p2, o2, m2 = load_checkpoint(Path(two) / "last.h5")
    assert m1["step"] == m2["step"] and sorted(p1) == sorted(p2) and sorted(o1) == sorted(o2)
    for group, a, b, t in (("param", p1, p2, tol), ("state", o1, o2, 100 * tol)):
        for k in a:
            if k == "t":
                continue
            d = normwise(b[k], a[k])
            DIFFS.append((case, f"{group} {k}", d))
            assert d <= t, (k, d)
    r1, r2 = records(one), records(two)
    assert [(r["step"], r["split"]) for r in r1] == [(r["step"], r["split"]) for r in r2]
    for a, b in zip(r1, r2):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=rtol)
        assert b.get("top1") == a.get("top1")
        for key in ("angles_deg", "norm_ratio", "target_distance", "jacobian_error"):
            if key in a:
                np.testing.assert_allclose(list(b[key].values()), list(a[key].values()), rtol=max(1e-6, rtol),
                                           atol=max(1e-9, rtol),
                                           err_msg=key)


@pytest.mark.parametrize("arch,rule", CASES)
def test_two_ranks_with_half_batches_equal_one_process(tmp_path, shards, two_ranks, arch, rule):
    one = tmp_path / "one"
    Trainer(Config(**case_config(arch, rule, shards), out=str(one))).run()
    assert_same_run(one, two_ranks / f"{arch}-{rule}", case=f"{arch}-{rule}")


@pytest.mark.parametrize("arch,rule", FLOAT32_CASES)
def test_refined_solves_agree_across_ranks(tmp_path, shards, two_ranks, arch, rule):
    """float32 GAIT-prop (refined solves, checked on backward errors reduced over ranks):
    two ranks train as one process does, to float32 round-off, with the same kept
    inverses."""
    one = tmp_path / "one"
    Trainer(Config(**float32_config(arch, rule, shards), out=str(one))).run()
    two = two_ranks / f"{arch}-{rule}-float32"
    assert any(k.startswith("rule/inverse/") for k in load_checkpoint(one / "last.h5")[1])
    assert_same_run(one, two, tol=FLOAT32_TOL, case=f"{arch}-{rule}-float32", rtol=FLOAT32_RTOL)


def test_the_regulariser_is_added_once(tmp_path, shards):
    """The orthogonality regulariser depends only on the (replicated) weights: added once,
    after the sum over ranks. SGD and a strong regulariser: added on every rank before the
    sum, it would count twice."""
    args = ["--task", "imagenet", "--data", shards, "--arch", "conv7", "--rule", "gait", "--dtype", "float64",
            "--batch-size", 8, "--max-steps", 4, "--optimizer", "sgd", "--lr", 1e-3, "--ortho-lambda", 10,
            "--quiet"]
    res = mpirun(2, "run.py", "--distributed", "mpi", *args, "--out", tmp_path / "two")
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([sys.executable, "run.py", *map(str, args), "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_the_nccl_path_on_the_emulated_device(tmp_path, shards):
    """--backend emulated: gradients packed into one device buffer and summed by the NCCL
    all-reduce (the emulator's NCCL runs on MPI), as on GPUs."""
    res = mpirun(2, "run.py", "--distributed", "mpi", "--backend", "emulated", "--task", "imagenet", "--data", shards,
                 "--arch", "conv7", "--rule", "gait", "--dtype", "float64", "--batch-size", 8, "--max-steps", 4,
                 "--ortho-lambda", 0, "--quiet", "--out", tmp_path / "nccl")     # (module docstring: no amplifier)
    assert res.returncode == 0, res.stdout + res.stderr
    Trainer(Config(task="imagenet", data=str(shards), arch="conv7", rule="gait", dtype="float64", batch_size=8,
                   max_steps=4, ortho_lambda=0.0, quiet=True, out=str(tmp_path / "one"))).run()
    assert_same_run(tmp_path / "one", tmp_path / "nccl")


def test_resume_on_another_number_of_processes(tmp_path, shards):
    """2 ranks to step 6, then 1 process to 12, then 2 ranks to 16: the same global data
    order, and the same run (to round-off) as one process throughout."""
    args = ["--task", "imagenet", "--data", shards, "--arch", "conv7", "--rule", "gait", "--dtype", "float64",
            "--batch-size", 8, "--log-every", 2, "--eval-subset", 16, "--ortho-lambda", 0, "--quiet",
            "--out", tmp_path / "m"]
    res = mpirun(2, "run.py", "--distributed", "mpi", *args, "--max-steps", 6)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([sys.executable, "run.py", *map(str, [*args, "--max-steps", 12, "--resume"])], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    res = mpirun(2, "run.py", "--distributed", "mpi", *args, "--max-steps", 16, "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["world_size"] == 2
    # the history records each resume on another number of processes (and BLAS threads: each rank
    # takes its share of the cores)
    moves = [(h["step"], h["resumed_on"]["world_size"]) for h in cfg["history"] if "resumed_on" in h]
    assert moves == [(6, [2, 1]), (12, [1, 2])], cfg["history"]
    Trainer(Config(task="imagenet", data=str(shards), arch="conv7", rule="gait", dtype="float64", batch_size=8,
                   log_every=2, eval_subset=16, max_steps=16, ortho_lambda=0.0, quiet=True,
                   out=str(tmp_path / "one"))).run()
    assert_same_run(tmp_path / "one", tmp_path / "m", tol=1e-7, case="resume 2-1-2 ranks")  # 16 steps


def test_ranks_started_with_different_options_or_data_are_refused(tmp_path, shards):
    """Every rank compares its resolved options and its data's digest with the others' at
    start-up: different --lr, --seed or --max-steps (which would train apart silently, or hang
    until --comm-timeout) or a different data set of the same shapes end the job at once,
    naming each option and which ranks hold which value. The same data in another folder is
    the same data."""
    other, copy = tmp_path / "other", tmp_path / "copy"
    make_shards(other, n_train=48, n_val=16, size=32, per_shard=8, seed=5)
    shutil.copytree(shards, copy)
    base = ["run.py", "--distributed", "mpi", "--task", "imagenet", "--arch", "mlp-64x1", "--rule", "bp",
            "--batch-size", 8, "--quiet"]

    def mpmd(*per_rank):
        cmd = [MPIRUN]
        for i, extra in enumerate(per_rank):
            cmd += ([":"] if i else []) + ["-n", "1", sys.executable, *map(str, [*base, *extra])]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    res = mpmd(["--data", shards, "--max-steps", 3, "--lr", 1e-3], ["--data", shards, "--max-steps", 4, "--seed", 2])
    log = res.stdout + res.stderr
    assert res.returncode != 0 and "the ranks were started with different options or data" in log, log[-2000:]
    for fragment in ("--max-steps: 3 on rank 0, 4 on rank 1", "--seed: 0 on rank 0, 2 on rank 1",
                     "--lr: 0.001 on rank 0, 0.0001 on rank 1"):
        assert fragment in log, (fragment, log[-2000:])
    res = mpmd(["--data", shards, "--max-steps", 2], ["--data", other, "--max-steps", 2])
    log = res.stdout + res.stderr
    assert res.returncode != 0 and "--data: 'sha256" in log and "on rank 0" in log and "on rank 1" in log, log[-2000:]
    res = mpmd(["--data", shards, "--max-steps", 2], ["--data", copy, "--max-steps", 2])
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_batch_that_does_not_split_evenly_is_refused(shards):
    res = mpirun(2, "run.py", "--distributed", "mpi", "--task", "synthetic", "--batch-size", 9, "--max-steps", 1)
    assert res.returncode != 0
    assert "--batch-size 9 is not divisible by the 2 processes" in res.stderr


def _wait_for_steps(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        f = Path(out) / "metrics.jsonl"
        if f.exists() and sum(1 for _ in f.open()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"the run made no progress: {proc.poll()}")


def _rank_pids(mpirun_pid):
    """{rank: pid} of the python processes under an mpirun (MPICH's hydra sets PMI_RANK)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"run.py" in cmd and any(e.startswith(b"PMI_RANK=") for e in env):
            rank = int(next(e for e in env if e.startswith(b"PMI_RANK="))[9:])
            out[rank] = int(d.name)
    return out


LONG = ["--task", "synthetic", "--rule", "bp", "--batch-size", 20, "--epochs", 1000, "--log-every", 1, "--quiet"]


def _launch(args, **kw):
    return subprocess.Popen([MPIRUN, "-n", "2", sys.executable, "run.py", "--distributed", "mpi", *map(str, args)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_a_killed_rank_ends_the_job(tmp_path):
    """SIGKILL of rank 1: the job ends within seconds and the log names a rank. Which process
    names it is a race. Either rank 0 waits in its all-reduce and the launcher (MPICH's hydra)
    ends the job, naming by pid the first abnormal end it collected: the killed rank or the
    peer it SIGKILLed in clean-up (CI once saw rank 0 named), so either is accepted; every rank
    announced its pid at start-up, so the pid maps to a rank. Or rank 0's all-reduce fails
    outright (CI once saw ``process_vm_readv failed (errno 3)``: the peer died mid-transfer).
    MPICH marks that error fatal and reports it itself, from rank 0, then asks the launcher
    to end the job; the error also returns to Python, where rank 0 names rank 1 as exited,
    unless the launcher's kill comes first (measured: 1 of 3 such ends printed the name).
    Then MPICH's own report, that the peer process no longer exists, is what the log has."""
    out = tmp_path / "k"
    p = _launch([*LONG, "--out", out])
    try:
        _wait_for_steps(out, 5, p)
        pids = _rank_pids(p.pid)
        os.kill(pids[1], signal.SIGKILL)
        t = time.time()
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and time.time() - t < 60
    log = stdout + stderr
    assert f"rank 0 of 2: pid {pids[0]}" in log and f"rank 1 of 2: pid {pids[1]}" in log, log[-2000:]
    named = [int(m) for m in re.findall(r"PID (\d+) RUNNING AT", log)]
    abort_file = out / ".ranks" / "abort-rank-0.txt"
    if named:
        assert set(named) <= set(pids.values()), log[-2000:]
    elif abort_file.exists() or "has exited" in log:
        message = abort_file.read_text() if abort_file.exists() else log
        assert re.search(r"rank 0: (an? [a-z-]+|agreeing on a stop) after step \d+ failed \(MPI: ", message), log[-2000:]
        assert f"rank 1 (pid {pids[1]} on " in message and "has exited" in message, message
    else:
        assert re.search(r"on node 0 \(rank 0 in comm 0\): Fatal error in internal_\w+: .*\n(.*\n)*"
                         r".*process_vm_readv failed \(errno 3\)", log), log[-2000:]


def test_a_peer_that_exits_while_this_rank_waits_is_named():
    """A launcher that leaves the other ranks running when one dies (here hydra with
    -disable-auto-cleanup; Slurm's srun by default): rank 1 exits while rank 0 waits for it
    in a barrier, and rank 0's watchdog names rank 1 and ends the job after the 2 s grace,
    not after --comm-timeout (600 s in the driver)."""
    t = time.time()
    res = subprocess.run([MPIRUN, "-disable-auto-cleanup", "-n", "2", sys.executable, "tests/mpi_peer_exit.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and time.time() - t < 60
    pid = int(re.search(r"rank 1 of 2: pid (\d+) on ", res.stderr).group(1))
    assert f"rank 0: a barrier after step 3 waits for rank 1 (pid {pid} on " in res.stderr, res.stderr
    assert "has exited; aborting the job" in res.stderr and "went on" not in res.stdout, res.stdout + res.stderr


def test_a_failed_collective_is_named_and_the_job_aborted():
    """A collective that fails outright on one rank (here a broadcast that overflows rank 1's
    buffer) is reported by that rank with MPI's cause and ends every rank: MPI errors return
    to Python (MPI.ERRORS_RETURN) instead of aborting inside the library unexplained."""
    res = mpirun(2, "tests/mpi_failed_collective.py", timeout=120)
    assert res.returncode != 0
    assert ("rank 1: a broadcast after step 7 failed (MPI: Message truncated: " in res.stderr
            and "no peer rank on this node has exited; aborting the job" in res.stderr), res.stderr
    assert "went on" not in res.stdout, res.stdout


def test_a_peer_whose_process_is_gone_is_named():
    """The naming behind a failed collective: a peer on this host whose process has exited,
    killed and not yet reaped (a zombie, as a launcher's child is for a moment) or reaped,
    is named; a live one is not, nor one the rank does not watch (another node's). A
    stopped one (SIGSTOP: what the hung-rank message names as stopped) is not gone."""
    from gait_ref.distributed import lost_ranks, process_gone, process_state
    host = "node7"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 30
        while not process_gone(dead.pid) and time.time() < deadline:      # exits, stays a zombie
            time.sleep(0.05)
        assert Path(f"/proc/{dead.pid}").exists() and process_gone(dead.pid)
        assert not process_gone(live.pid) and not process_gone(os.getpid())
        peers = [(os.getpid(), host), (live.pid, host), (dead.pid, host)]
        assert lost_ranks(peers, [1, 2]) == [f"rank 2 (pid {dead.pid} on node7) has exited"]
        dead.wait()                                                        # reaped: no such process
        assert process_gone(dead.pid) and process_state(dead.pid) == "gone"
        assert lost_ranks(peers, [1]) == []                                  # only watched ranks
        os.kill(live.pid, signal.SIGSTOP)                                  # a hung peer: stopped, not gone
        deadline = time.time() + 30
        while process_state(live.pid) != "T" and time.time() < deadline:
            time.sleep(0.05)
        assert process_state(live.pid) == "T" and not process_gone(live.pid)
    finally:
        live.kill()
        live.wait()


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGUSR1 (``sbatch --signal=USR1@...``) reaches rank 1 only (a scheduler signals every
    task, but not at one instant): the ranks agree after each step, so both stop after the
    same step, rank 0 checkpoints it and the job exits with 128 + 10; --resume on 2 ranks
    then writes the records of a run never stopped."""
    from gait_ref.checkpoint import load_latest
    from .test_cli import strip_timings
    args = ["--task", "synthetic", "--rule", "bp", "--batch-size", 20, "--max-steps", 3000, "--log-every", 50,
            "--quiet"]
    a, b = tmp_path / "a", tmp_path / "b"
    res = mpirun(2, "run.py", "--distributed", "mpi", *args, "--out", a, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    p = _launch([*args, "--out", b])
    try:
        _wait_for_steps(b, 3, p)
        pids = _rank_pids(p.pid)
        os.kill(pids[1], signal.SIGUSR1)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGUSR1, stdout + stderr
    step = load_latest(b / "last.h5")[2]["step"]
    assert 0 < step < 3000
    # after a step, or (the synthetic task's epochs are 200 steps) during an epoch's evaluation
    assert re.search(f"stopped by SIGUSR1 (during the evaluation )?after step {step}: the checkpoint of step {step} "
                     "is in ", stderr), stderr
    res = mpirun(2, "run.py", "--distributed", "mpi", *args, "--out", b, "--resume", timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert strip_timings(records(a)) == strip_timings(records(b))

def test_a_hung_rank_is_named_and_the_job_aborted(tmp_path):
    """A rank that stops (SIGSTOP: no exit for the launcher to see) leaves its peer waiting
    in a collective; the peer's watchdog aborts the job after --comm-timeout, naming it."""
    out = tmp_path / "h"
    p = _launch([*LONG, "--out", out, "--comm-timeout", 8])
    pids = {}
    try:
        _wait_for_steps(out, 5, p)
        time.sleep(6)                                          # let the heartbeat files appear
        pids = _rank_pids(p.pid)
        os.kill(pids[1], signal.SIGSTOP)
        _, err = p.communicate(timeout=90)
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    # rank 0 waits in whichever collective came next: the gradients' all-reduce, the
    # metrics' all-gather (--log-every 1), or the step's stop agreement; CI has seen each. The message is read from the run
    # folder: once, on a loaded machine, the launcher's forwarding of stderr lost it
    message = (out / ".ranks" / "abort-rank-0.txt").read_text()
    assert re.search(r"rank 0: (an all-reduce|an all-gather|a broadcast|agreeing on a stop) after step \d+ has waited",
                     message), message
    assert f"rank 1 (pid {pids[1]} on" in message, message


def test_an_exception_on_one_rank_ends_every_rank(tmp_path, shards):
    """Rank 1 alone fails (its --data does not exist; MPMD launch): it prints the error with
    its rank and aborts the job, so rank 0 does not wait for it forever."""
    # rank 0's own options are valid (batch 8 of the 64 training images), so only rank 1 can fail
    common = ["--distributed", "mpi", "--task", "imagenet", "--rule", "bp", "--batch-size", 8, "--max-steps", 3,
              "--quiet"]
    common = [str(c) for c in common]
    res = subprocess.run([MPIRUN, "-n", "1", sys.executable, "run.py", *common, "--data", str(shards), ":",
                          "-n", "1", sys.executable, "run.py", *common, "--data", str(tmp_path / "nowhere")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "error on rank 1 of 2: --data" in res.stderr and "no such folder" in res.stderr


def test_divergence_stops_every_rank_with_the_same_message(tmp_path):
    # (--lr 1e300 did this before; float32 made it inf, which options now refuse up front)
    res = mpirun(2, "run.py", "--distributed", "mpi", "--task", "synthetic", "--rule", "bp", "--lr", "1e30",
                 "--adam-eps", "1e-30", "--batch-size", 20, "--max-steps", 5, "--quiet", timeout=120)
    assert res.returncode != 0
    assert "error on rank 0 of 2: step 2: the output of layer fc2 is not finite" in res.stderr, res.stderr[-2000:]
