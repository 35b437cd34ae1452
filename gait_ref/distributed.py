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

from dataclasses import dataclass


class LocalComm:
    """One process: every reduction is the identity."""

    rank, size, local_rank = 0, 1, 0
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

    def barrier(self) -> None:
        pass

    def abort(self, message: str, code: int = 1) -> None:
        raise SystemExit(code)

    def close(self) -> None:
        pass


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
