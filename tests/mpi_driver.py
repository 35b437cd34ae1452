"""Run under ``mpirun -n W``: train every (architecture, rule) case of test_distributed
for a few steps with the MPI communicator, each into OUT/<case>.

    mpirun -n 2 python tests/mpi_driver.py OUT SHARDS [BACKEND]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gait_ref.config import Config  # noqa: E402
from gait_ref.distributed import MPIComm  # noqa: E402
from gait_ref.train import Trainer  # noqa: E402
from tests.test_distributed import CASES, FLOAT32_CASES, case_config, float32_config  # noqa: E402


def main(out, shards, backend="numpy"):
    comm = MPIComm(timeout=120)
    for arch, rule in CASES:
        Trainer(Config(**case_config(arch, rule, shards, backend), out=str(Path(out) / f"{arch}-{rule}")), comm).run()
    for arch, rule in FLOAT32_CASES:
        Trainer(Config(**float32_config(arch, rule, shards, backend), out=str(Path(out) / f"{arch}-{rule}-float32")),
                comm).run()
    comm.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
