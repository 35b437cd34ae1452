"""Shared fixtures: the ``xp`` backend fixture, hypothesis profiles, slow/gpu markers.

Every numerical test takes ``xp``; the cupy variant is added when cupy imports and
sees a GPU, and is skipped cleanly otherwise.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from gait_ref.backend import cupy_available, get_backend

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--runslow"):
        skip = pytest.mark.skip(reason="slow: pass --runslow to run")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
    if not cupy_available():
        skip_gpu = pytest.mark.skip(reason="cupy or a CUDA GPU is not available")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    return get_backend(request.param)


def asnumpy(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def tol(dtype, factor=4.0):
    """A tolerance from the dtype's machine epsilon: factor * sqrt(eps)."""
    return factor * float(np.sqrt(np.finfo(dtype).eps))
