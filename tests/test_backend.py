import numpy as np
import pytest

from gait_ref import backend
from gait_ref.backend import BackendError, get_backend, get_xp


def test_numpy_backend():
    assert get_backend("numpy") is np
    assert get_xp(np.zeros(2), None, 1.0) is np


def test_unknown_backend_message():
    with pytest.raises(BackendError, match="unknown backend 'torch'"):
        get_backend("torch")


def test_cupy_missing_gives_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", None)
    with pytest.raises(BackendError, match="cupy is not installed"):
        get_backend("cupy")


def test_no_gpu_gives_clear_error(monkeypatch):
    class FakeCupy:
        ndarray = type("nd", (), {})

        @staticmethod
        def is_available():
            return False

    monkeypatch.setattr(backend, "_cupy", FakeCupy)
    with pytest.raises(BackendError, match="no usable CUDA GPU"):
        get_backend("cupy")


def test_mixing_backends_raises(monkeypatch):
    class FakeArray:
        shape = (3,)

    class FakeCupy:
        ndarray = FakeArray

    monkeypatch.setattr(backend, "_cupy", FakeCupy)
    with pytest.raises(BackendError, match="numpy and cupy arrays mixed"):
        get_xp(np.zeros(3), FakeArray())


@pytest.mark.gpu
def test_cupy_roundtrip_and_identical_init():
    import cupy

    from gait_ref.activations import LeakyReLU
    from gait_ref.layers import Dense
    from gait_ref.network import Network

    nets = []
    for xp in (np, cupy):
        net = Network([Dense((6,), 6)], [LeakyReLU()])
        net.init(3, "orthogonal", xp, np.float64)
        nets.append(net)
    np.testing.assert_array_equal(nets[0].layers[0].params["W"], nets[1].layers[0].params["W"].get())
    with pytest.raises(BackendError):
        get_xp(np.zeros(3), cupy.zeros(3))


def test_a_node_with_fewer_gpus_than_ranks_is_refused_in_one_line():
    from gait_ref.backend import BackendError, check_gpus_per_node
    check_gpus_per_node(4, 4)
    with pytest.raises(BackendError, match=r"^5 ranks on this node but 4 GPU\(s\) visible to it: .* at most 4 ranks"):
        check_gpus_per_node(5, 4)


def test_the_emulated_nccl_id_is_cupy_14s_bytes():
    from gait_ref.emulation import nccl
    uid = nccl.get_unique_id()
    assert isinstance(uid, bytes) and len(uid) == nccl.NCCL_UNIQUE_ID_BYTES
    with pytest.raises(TypeError, match="unique id must be the 128 bytes"):
        nccl.NcclCommunicator(1, tuple(range(128)), 0)
