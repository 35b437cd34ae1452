"""A stand-in for ``cupy.cuda.nccl`` on the emulated device, built on MPI.

It has the calls gait_ref makes (``get_unique_id``, ``NcclCommunicator(n, uid, rank)``,
``allReduce(sendptr, recvptr, count, dtype, op, stream)``, ``abort``) with NCCL's
pointer-based signature: the buffers are found from their device addresses (an emulated
array's ``data.ptr`` is its storage's address) and summed with MPI_Allreduce over
COMM_WORLD. So the NCCL code path of ``gait_ref.distributed`` runs in CI, on ranks of
mpirun, without a GPU.
"""
from __future__ import annotations

import ctypes

import numpy as np

NCCL_FLOAT32, NCCL_FLOAT64 = 7, 8          # NCCL's ncclFloat32 / ncclFloat64
NCCL_SUM = 0
_DTYPES = {NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}
available = True


NCCL_UNIQUE_ID_BYTES = 128


def get_unique_id() -> bytes:
    """CuPy 14's ``get_unique_id`` returns the id's 128 bytes (CuPy 13 returned a tuple of ints)."""
    return bytes(range(NCCL_UNIQUE_ID_BYTES))


def _view(ptr: int, count: int, dtype) -> np.ndarray:
    nbytes = count * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype, count=count)


class NcclCommunicator:
    def __init__(self, ndev: int, commId, rank: int):
        if not isinstance(commId, bytes) or len(commId) != NCCL_UNIQUE_ID_BYTES:
            raise TypeError(f"emulated NCCL: the unique id must be the {NCCL_UNIQUE_ID_BYTES} bytes get_unique_id "
                            f"returns (CuPy 14), got {type(commId).__name__}")
        from mpi4py import MPI
        self._comm = MPI.COMM_WORLD
        if self._comm.Get_size() != ndev or self._comm.Get_rank() != rank:
            raise RuntimeError(f"emulated NCCL: rank {rank} of {ndev} does not match MPI's "
                               f"{self._comm.Get_rank()} of {self._comm.Get_size()}")

    def allReduce(self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int, stream: int) -> None:
        from mpi4py import MPI
        if op != NCCL_SUM:
            raise NotImplementedError("emulated NCCL sums only")
        dtype = _DTYPES[datatype]
        send, recv = _view(sendbuf, count, dtype), _view(recvbuf, count, dtype)
        self._comm.Allreduce(MPI.IN_PLACE if sendbuf == recvbuf else send, recv, op=MPI.SUM)

    def abort(self) -> None:
        pass

    def destroy(self) -> None:
        pass
