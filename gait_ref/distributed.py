"""The communicator seam: data-parallel training over processes, invisible to the maths.

A training step sees a ``Communicator``. With one process it is ``LocalComm``, whose
reductions are the identity; with several (``--distributed mpi``) it sums arrays across
ranks. The step's maths is the same either way: every rank computes its rule's updates on
its own rows of the global batch, the updates are summed across ranks, and every rank
applies the same optimiser step to its replica of the weights.

``BatchSlice`` tells a rule which rows of the global batch it holds: the global batch
size (for batch means), the offset of its first row (so that per-sample noise is the
same slice of the same global draw on any number of ranks) and the communicator (to
sum feedback-layer gradients in DTP/SDTP/L-DRL, which train inside the step).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class LocalComm:
    """One process: every reduction is the identity."""

    rank, size, local_rank, local_size = 0, 1, 0, 1
    name = "local"

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, arrays: list) -> list:
        """Sum each array over ranks; returns the summed arrays (views of one buffer)."""
        return list(arrays)

    def bcast_object(self, obj, root: int = 0):
        return obj

    def allgather_object(self, obj) -> list:
        return [obj]

    def max_int(self, value: int) -> int:
        """The largest of the ranks' ``value``s (a host number)."""
        return int(value)

    def barrier(self, timeout: bool = True) -> None:
        pass

    def abort(self, message: str, code: int = 1) -> None:
        raise SystemExit(code)

    def close(self) -> None:
        pass

    def bind(self, xp, run_dir=None):
        return xp

    def heartbeat(self, step: int) -> None:
        pass

    def waiting(self, what: str, timeout: bool = True):
        """Where a process waits for its peers; nothing to wait for here."""
        return contextlib.nullcontext()


LOCAL = LocalComm()


@dataclass(frozen=True)
class BatchSlice:
    """This process holds rows [start, start + n) of a global batch of ``n_total`` rows."""

    n_total: int
    start: int = 0
    comm: object = LOCAL

    @classmethod
    def whole(cls, n: int) -> "BatchSlice":
        return cls(n_total=int(n))

    def rows(self, n: int) -> slice:
        return slice(self.start, self.start + n)

    def allreduce_dict(self, d: dict) -> dict:
        """{name: array} summed over ranks (same keys on every rank)."""
        keys = sorted(d)
        return dict(zip(keys, self.comm.allreduce_sum([d[k] for k in keys])))


def replicas_differ(comm, arrays) -> list:
    """The ranks whose ``arrays`` (their replica of the weights) differ from rank 0's, by a
    SHA-256 of the bytes gathered from every rank; [] when all are identical."""
    import hashlib

    from .backend import to_numpy
    h = hashlib.sha256()
    for v in arrays:
        h.update(to_numpy(v).tobytes())
    digests = comm.allgather_object(h.hexdigest())
    return [r for r, d in enumerate(digests) if d != digests[0]]


def options_that_differ(comm, options: dict) -> dict:
    """{option: {value: [ranks]}} for every option whose value is not the same on every rank
    (``options`` gathered from every rank)."""
    every = comm.allgather_object(options)
    differ = {}
    for k in sorted(set().union(*every)):
        held: dict = {}
        for rank, opts in enumerate(every):
            held.setdefault(repr(opts.get(k)), []).append(rank)
        if len(held) > 1:
            differ[k] = held
    return differ


# ---- MPI (and NCCL on GPUs) ------------------------------------------------------------------------------
def import_mpi():
    """mpi4py's MPI module, or a clear error saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(f"--distributed mpi needs mpi4py and an MPI runtime ({e}); on one machine: "
                           "pip install -e \".[mpi]\" (mpi4py + the MPICH wheel); on a cluster: pip install mpi4py "
                           "with the cluster's MPI loaded (see the README)") from None
    return MPI


# a peer may finish the last collective and exit while this rank is still returning from it; a
# rank that has waited this long for a peer whose process is gone is waiting for nothing
PEER_EXIT_GRACE_S = 2.0


class MPIComm:
    """Ranks of ``mpirun``/``srun``: sums over MPI_COMM_WORLD, with NCCL on device backends.

    numpy backend: arrays are packed into one host buffer per dtype and summed with
    MPI_Allreduce (in place). cupy backend: packed into one device buffer and summed with
    NCCL's all-reduce on the current stream (bootstrapped over MPI), so the host never
    waits for it. The square-layer factorisations of the target rules are computed on
    every rank from its replica of the weights rather than once and broadcast: an LU is
    2/3 D^3 flops (under a millisecond on a GPU for D = 1024) while a broadcast of the
    D x D factors would add a collective, and a host-device synchronisation, to every step.

    A watchdog thread aborts the whole job (MPI_Abort, after NCCL's abort) when this rank
    has waited in a collective, or for the device behind one, longer than ``timeout``
    seconds: a peer that died or hangs cannot leave the others waiting forever. With a
    run folder, each rank's watchdog also writes ``.ranks/rank-<r>.json`` (last step, time,
    pid, host) every few seconds, so the message can name the ranks that stopped.

    A peer on this node that has exited while this rank waits in a collective ends the job
    after ``PEER_EXIT_GRACE_S`` seconds, naming the peer, without waiting for the timeout:
    not every launcher ends a job when one task dies (Slurm's srun does not by default).

    A collective that fails outright raises (``MPI.ERRORS_RETURN``, mpi4py's default, set
    here whatever ``mpi4py.rc`` says) and the rank that saw it aborts the job with MPI's
    cause, naming the peers on this node that have exited (else the heartbeat files say who
    stopped). Every rank's pid and host are gathered at start-up; a peer counts as exited
    when its process is gone or a zombie. An error that MPICH itself marks fatal (a peer
    that died mid-transfer: ``process_vm_readv failed (errno 3)``) is first reported by
    MPICH, which asks the launcher to end the job; the name follows if the launcher's kill
    comes late enough.
    """

    name = "mpi"

    def __init__(self, timeout: float = 600.0):
        MPI = import_mpi()
        self.MPI, self.world = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        node = self.world.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        self._threads = None
        if not any(v in os.environ for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")):
            # ranks on one node share its cores: BLAS threads per rank = cores / ranks on the node
            from threadpoolctl import threadpool_limits
            self._threads = threadpool_limits(max(1, (os.cpu_count() or 1) // self.local_size))
        self.timeout = float(timeout)
        self.xp, self.nccl, self.run_dir = None, None, None
        self._wait_since, self._wait_what = None, ""
        self._step, self._host = 0, __import__("socket").gethostname()
        # one line per rank, even with --quiet: a launcher that kills the job names a pid
        # one write, so that two ranks' lines cannot interleave (print writes the newline apart)
        sys.stderr.write(f"rank {self.rank} of {self.size}: pid {os.getpid()} on {self._host}\n")
        sys.stderr.flush()
        self._peers = self.world.allgather((os.getpid(), self._host))      # rank -> (pid, host)
        # the peers on this node whose processes this rank can see (all are alive now: a
        # rank in another pid namespace would look gone, so it is never watched)
        self._watched = [r for r, (pid, h) in enumerate(self._peers)
                         if r != self.rank and h == self._host and not process_gone(pid)]
        self.world.Set_errhandler(MPI.ERRORS_RETURN)
        import threading
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name=f"gait_ref-watchdog-{self.rank}", daemon=True)
        self._watchdog.start()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def bind(self, xp, run_dir=None):
        """Use backend ``xp`` (NCCL for a device backend) and, optionally, a run folder for
        heartbeat files. Returns xp."""
        from .backend import is_device, nccl_module
        self.xp, self.run_dir = xp, run_dir
        if is_device(xp) and self.size > 1:
            nccl = nccl_module(xp)
            uid = self.bcast_object(nccl.get_unique_id() if self.is_root else None)
            with self.waiting("setting up NCCL"):
                self.nccl = (nccl, nccl.NcclCommunicator(self.size, uid, self.rank))
        return xp

    # ---- collectives ------------------------------------------------------------------------------------
    def allreduce_sum(self, arrays: list) -> list:
        arrays = list(arrays)
        if self.size == 1 or not arrays:
            return arrays
        out = [None] * len(arrays)
        groups = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.dtype.str, []).append(i)
        for idx in groups.values():
            parts = [arrays[i] for i in idx]
            if self.nccl is not None:
                xp = self.xp
                flat = xp.concatenate([p.reshape(-1) for p in parts])          # one device buffer
                nccl, comm = self.nccl
                code = {4: nccl.NCCL_FLOAT32, 8: nccl.NCCL_FLOAT64}[flat.dtype.itemsize]
                comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size, code, nccl.NCCL_SUM,
                               xp.cuda.get_current_stream().ptr)
            else:
                flat = np.concatenate([np.asarray(p).reshape(-1) for p in parts])   # one host buffer
                with self.waiting("an all-reduce"):
                    self.world.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)
            pos = 0
            for i, p in zip(idx, parts):
                out[i] = flat[pos:pos + p.size].reshape(p.shape)
                pos += p.size
        return out

    def bcast_object(self, obj, root: int = 0):
        with self.waiting("a broadcast"):
            return self.world.bcast(obj, root=root)

    def allgather_object(self, obj) -> list:
        with self.waiting("an all-gather"):
            return self.world.allgather(obj)

    def max_int(self, value: int) -> int:
        with self.waiting("agreeing on a stop"):
            return int(self.world.allreduce(int(value), op=self.MPI.MAX))

    def barrier(self, timeout: bool = True) -> None:
        with self.waiting("a barrier", timeout):
            self.world.Barrier()

    # ---- failure handling -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def waiting(self, what: str, timeout: bool = True):
        """A context in which this rank waits on its peers (watched unless ``timeout`` is False)."""
        if timeout:
            self._wait_what, self._wait_since = what, time.monotonic()
        try:
            yield
        except self.MPI.Exception as e:
            self.abort(f"rank {self.rank}: {what} after step {self._step} failed (MPI: {mpi_error_summary(e)}); "
                       f"{self._lost_ranks()}; aborting the job", code=4)
        finally:
            self._wait_since = None

    def heartbeat(self, step: int) -> None:
        self._step = step

    def _beat_file(self, rank):
        return Path(self.run_dir) / ".ranks" / f"rank-{rank}.json"

    def _watch(self):
        last_write = 0.0
        while not self._stop.wait(0.5):
            now = time.monotonic()
            if self.run_dir and now - last_write > 5.0:
                last_write = now
                try:
                    f = self._beat_file(self.rank)
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_text(json.dumps({"step": self._step, "time": time.time(), "pid": os.getpid(),
                                             "host": self._host}))
                except OSError:
                    pass
            since = self._wait_since
            if since is not None and now - since > PEER_EXIT_GRACE_S:
                gone = lost_ranks(self._peers, self._watched)
                if gone:
                    self.abort(f"rank {self.rank}: {self._wait_what} after step {self._step} waits for "
                               f"{'; '.join(gone)}; aborting the job", code=4)
            if since is not None and now - since > self.timeout:
                self.abort(f"rank {self.rank}: {self._wait_what} after step {self._step} has waited "
                           f"{now - since:.0f} s (--comm-timeout {self.timeout:g}); {self._stale_ranks()}; "
                           "aborting the job", code=3)

    def _stale_ranks(self) -> str:
        halted = [r for r in self._watched if process_state(self._peers[r][0]) in ("T", "t")]
        stopped = [f"rank {r} (pid {self._peers[r][0]} on {self._host}) is stopped (a signal or a debugger)"
                   for r in halted]
        if not self.run_dir:
            return "; ".join(stopped) if stopped else "a peer rank probably failed (give --out to name it)"
        seen, now = list(stopped), time.time()
        for r in range(self.size):
            if r == self.rank or r in halted:                    # itself, or named above
                continue
            try:
                b = json.loads(self._beat_file(r).read_text())
            except (OSError, ValueError):
                seen.append(f"rank {r} never reported")
                continue
            if now - b["time"] > min(30.0, self.timeout / 2) or b["step"] < self._step:
                seen.append(f"rank {r} (pid {b['pid']} on {b['host']}) last seen at step {b['step']}, "
                            f"{now - b['time']:.0f} s ago")
        return "; ".join(seen) if seen else "every peer rank is alive but not progressing"

    def _lost_ranks(self) -> str:
        gone = lost_ranks(self._peers, self._watched)
        if gone:
            return "; ".join(gone)
        return self._stale_ranks() if self.run_dir else "no peer rank on this node has exited"

    def abort(self, message: str, code: int = 1) -> None:
        """Print ``message`` and end every rank of the job. With a run folder the message is
        also written to ``.ranks/abort-rank-<r>.txt``: the launcher forwards a rank's stderr
        through a pipe that MPI_Abort's tear-down can close before the last line is read
        (seen on a loaded 2-core machine), and a cluster's job log may be lost. A second's
        pause before the abort gives the launcher time to forward it. MPICH's MPI_Abort
        returns once it has asked the launcher to end the job (the launcher's kill comes
        later), so the process then exits itself: nothing after an abort runs."""
        print(message, file=sys.stderr, flush=True)
        if self.run_dir:
            try:
                f = Path(self.run_dir) / ".ranks" / f"abort-rank-{self.rank}.txt"
                f.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.with_suffix(".tmp")
                tmp.write_text(message + "\n")
                os.replace(tmp, f)
            except OSError:
                pass
        time.sleep(1.0)
        if self.nccl is not None:
            try:
                self.nccl[1].abort()
            except Exception:  # pragma: no cover - best effort before MPI_Abort
                pass
        self.world.Abort(code)
        os._exit(code)

    def close(self) -> None:
        self._stop.set()


def process_state(pid: int) -> str:
    """Process ``pid``'s state letter from /proc (R running, S sleeping, D waiting on a
    device, T stopped by a signal, t stopped by a debugger, Z zombie), "gone" if there is no
    such process, or "" where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    except OSError:                                            # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            pass
        return ""
    return stat[stat.rindex(")") + 2:][:1]                     # the state field follows "(comm)"


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` on this host has exited: no such process, or a zombie (killed,
    not yet reaped by its launcher, which is when a peer's failed transfer is seen)."""
    return process_state(pid) in ("gone", "Z", "X")


def lost_ranks(peers, watched) -> list:
    """'rank r (pid p on host) has exited' for every rank r in ``watched`` (peers on this
    node; other nodes' processes cannot be looked at from here) whose process is gone;
    ``peers[r]`` is rank r's (pid, host)."""
    return [f"rank {r} (pid {peers[r][0]} on {peers[r][1]}) has exited" for r in watched
            if process_gone(peers[r][0])]


def mpi_error_summary(e) -> str:
    """An MPI error's class and its innermost cause on one line: MPICH's message is the
    class (``Message truncated, error stack:``) then a call stack whose last line is what
    actually failed (``copy_iovs(224): process_vm_readv failed (errno 3)``)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    head = lines[0].removesuffix("error stack:").rstrip(" ,")
    causes = [c for c in (ln.partition(":")[2].strip() for ln in lines[1:]) if c]
    return f"{head}: {causes[-1]}" if causes else head
