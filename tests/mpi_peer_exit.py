"""Run under ``mpirun -disable-auto-cleanup -n 2`` (a launcher that, like Slurm's srun by
default, leaves the other ranks running when one dies): rank 1 exits without a word after
start-up while rank 0 waits for it in a barrier. Rank 0's watchdog must name rank 1 as
exited and end the job long before the communication timeout (600 s here).

    mpirun -disable-auto-cleanup -n 2 python tests/mpi_peer_exit.py
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gait_ref.distributed import MPIComm  # noqa: E402

comm = MPIComm(timeout=600)
comm.heartbeat(3)
if comm.rank == 1:
    os._exit(0)
comm.barrier()
print(f"rank {comm.rank} went on after its peer exited", flush=True)
