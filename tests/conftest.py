"""Fixtures. Shared helper functions are in helpers.py."""
import numpy as np
import pytest

from ddp import backend


def _backends():
    yield pytest.param("cpu", id="numpy")
    yield pytest.param("gpu", id="cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not backend.gpu_available(), reason=f"no usable GPU: {backend.gpu_unavailable_reason()}")])


@pytest.fixture(params=list(_backends()))
def device(request):
    """Runs a test body once on NumPy and once on CuPy (skipped without a GPU)."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
