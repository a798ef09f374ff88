"""Fixtures. Shared helper functions are in helpers.py.

`pytest --emulated-gpu` runs every gpu-marked test on tests/emulated_gpu.py, a strict
stand-in for CuPy, so the device path is exercised on machines without a GPU:

    pytest --emulated-gpu -m gpu
"""
import os
import sys

import numpy as np
import pytest

from ddp import backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # emulated_gpu, helpers


def pytest_addoption(parser):
    parser.addoption("--emulated-gpu", action="store_true", default=False,
                     help="run the gpu-marked tests on the emulated device (tests/emulated_gpu.py)")


def pytest_configure(config):
    if config.getoption("--emulated-gpu"):
        import emulated_gpu
        backend._use_device_module(emulated_gpu, emulated_gpu.cupyx)


@pytest.fixture(params=[pytest.param("cpu", id="numpy"), pytest.param("gpu", id="cupy", marks=pytest.mark.gpu)])
def device(request):
    """Runs a test body once on NumPy and once on the device: CuPy, or the emulated
    device under --emulated-gpu (skipped, with the reason, when neither is usable)."""
    if request.param == "gpu":
        need_gpu()
    return request.param


def need_gpu():
    """Skip, with the reason, unless CuPy or the emulated device is usable."""
    if not backend.gpu_available():
        pytest.skip(f"no usable GPU: {backend.gpu_unavailable_reason()} (pytest --emulated-gpu runs it on "
                    "the emulated device)")


@pytest.fixture
def emulated(request):
    """The emulated module when the run uses it, else None (a real GPU or none)."""
    return sys.modules["emulated_gpu"] if request.config.getoption("--emulated-gpu") else None


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
