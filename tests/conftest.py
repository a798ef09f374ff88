"""Fixtures. Shared helper functions are in helpers.py.

The gpu-marked tests run on CuPy when a GPU is usable. Without one, plain `pytest` runs them on
tests/emulated_gpu.py, a strict stand-in for CuPy, so the device path is exercised on every machine.
`pytest --emulated-gpu` uses the emulated device even where a GPU is usable:

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
                     help="run the gpu-marked tests on the emulated device (tests/emulated_gpu.py) even when a "
                          "GPU is usable; without a usable GPU they run there anyway")


def pytest_configure(config):
    # Without a usable GPU (no CuPy, no driver), the emulated device stands in: a plain `pytest` then runs the
    # device path too, instead of skipping it.
    config.ddp_emulated = config.getoption("--emulated-gpu") or not backend.gpu_available()
    if config.ddp_emulated:
        import emulated_gpu
        backend._use_device_module(emulated_gpu, emulated_gpu.cupyx)


def emulated_device(config) -> bool:
    """Whether this session's gpu-marked tests run on the emulated device."""
    return getattr(config, "ddp_emulated", False)


@pytest.fixture(params=[pytest.param("cpu", id="numpy"), pytest.param("gpu", id="cupy", marks=pytest.mark.gpu)])
def device(request):
    """Runs a test body once on NumPy and once on the device: CuPy, or the emulated device when no GPU
    is usable (or under --emulated-gpu)."""
    if request.param == "gpu":
        need_gpu()
    return request.param


def need_gpu():
    """Skip, with the reason, unless CuPy or the emulated device is usable."""
    if not backend.gpu_available():
        pytest.skip(f"no usable GPU: {backend.gpu_unavailable_reason()}")


@pytest.fixture
def emulated(request):
    """The emulated module when the session uses it, else None (a real GPU)."""
    return sys.modules["emulated_gpu"] if emulated_device(request.config) else None


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
