"""Run under ``mpirun -n 2``: a collective that fails outright on rank 1 (a broadcast whose
receive buffer is too small on that rank: MPI_ERR_TRUNCATE, reported at once and only
there). ``MPIComm`` must turn the error into a message naming the rank, the collective and
MPI's cause, and abort every rank; nothing after the broadcast may run.

    mpirun -n 2 python tests/mpi_failed_collective.py
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gait_ref.distributed import MPIComm  # noqa: E402

comm = MPIComm(timeout=60)
comm.heartbeat(7)
buf = np.zeros(1000 if comm.rank == 0 else 10)
with comm.waiting("a broadcast"):
    comm.world.Bcast(buf, root=0)
comm.barrier()
print(f"rank {comm.rank} went on after the failed broadcast", flush=True)
