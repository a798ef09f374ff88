"""The emulated device itself (tests/emulated_gpu.py): it must be as strict as CuPy where
GPU bugs hide, or the gpu-marked suite run on it would prove nothing. Plain NumPy is the
reference; these tests need neither a GPU nor --emulated-gpu."""
import math
import threading

import numpy as np
import pytest

import emulated_gpu as eg


@pytest.fixture(autouse=True)
def fresh_counter():
    eg.counter.reset()
    yield


def test_arrays_are_their_own_type_and_views_alias_the_arena():
    arena = eg.zeros(12, np.float32)
    assert not isinstance(arena, np.ndarray)
    W = arena[2:8].reshape(2, 3)                     # a layer's view, as in ddp.model
    W[...] = eg.asarray(np.arange(6.0).reshape(2, 3), np.float32)
    W.T[0] += 1                                      # through a transposed view
    host = arena.get()
    assert host.tolist() == [0, 0, 1, 1, 2, 4, 4, 5, 0, 0, 0, 0]
    assert W.data.ptr == arena.data.ptr + 2 * 4 and W.device == arena.device


@pytest.mark.parametrize("convert", [np.asarray, np.array, memoryview, float, int, bool,
                                     lambda x: np.zeros(3) + x, lambda x: math.isfinite(x)],
                         ids=["asarray", "array", "buffer", "float", "int", "bool", "numpy-op", "isfinite"])
def test_implicit_host_conversion_raises_type_error(convert):
    with pytest.raises(TypeError):
        convert(eg.ones(3))


def test_scalar_conversion_counts_a_transfer_and_a_sync():
    x = eg.asarray(np.arange(4.0))
    s = x.sum()
    assert s.ndim == 0 and eg.counter.d2h == 0
    assert float(s) == 6.0 and eg.counter.snapshot() == {"d2h": 1, "h2d": 1, "syncs": 1}
    eg.cuda.get_current_stream().synchronize()
    assert eg.counter.syncs == 2


def test_explicit_transfers_and_pinned_memory():
    x = eg.asarray(np.arange(6, dtype=np.float32))
    out = eg.cupyx.empty_pinned(6, np.float32)
    assert eg.is_pinned(out[2:]) and not eg.is_pinned(np.empty(6, np.float32))
    assert x.get(out=out) is out and out.tolist() == list(range(6))
    x.set(out * 2)
    assert eg.asnumpy(x).tolist() == [2 * i for i in range(6)]
    with pytest.raises(ValueError):
        x.get(out=np.empty(5, np.float32))
    assert eg.get_array_module(x) is eg and eg.get_array_module(out) is np


def test_mpi_reads_device_memory_only_when_cuda_aware(monkeypatch):
    from mpi4py import MPI
    x = eg.asarray(np.arange(3.0))
    monkeypatch.delenv("DDP_CUDA_AWARE", raising=False)
    with pytest.raises(TypeError):
        MPI.COMM_SELF.Allreduce(MPI.IN_PLACE, x, MPI.SUM)
    monkeypatch.setenv("DDP_CUDA_AWARE", "1")
    MPI.COMM_SELF.Allreduce(MPI.IN_PLACE, x, MPI.SUM)
    assert eg.is_device_address(x.__cuda_array_interface__["data"][0])
    assert not eg.is_device_address(np.zeros(3).ctypes.data)


def test_arrays_of_another_device_are_refused(monkeypatch):
    monkeypatch.setattr(eg, "DEVICE_COUNT", 2)
    a = eg.ones(3)
    got = {}

    def on_device_1():
        eg.cuda.Device(1).use()
        b = eg.ones(3)
        try:
            b + a
        except ValueError as e:
            got["error"] = str(e)
        with a.device:
            try:
                b.copy()                            # ones() may still be running on device 1
            except RuntimeError as e:
                got["race"] = str(e)
        eg.cuda.get_current_stream().synchronize()
        with a.device:
            got["copy"] = (b.copy() + a).get()      # a peer copy onto a's device works, as in CuPy

    t = threading.Thread(target=on_device_1)
    t.start()
    t.join()
    assert "device" in got["error"] and "peer copy" in got["race"] and got["copy"].tolist() == [2, 2, 2]


def test_mpi_must_not_read_memory_a_kernel_may_still_write(monkeypatch):
    monkeypatch.setenv("DDP_CUDA_AWARE", "1")
    x = eg.ones(3) * 2
    with pytest.raises(RuntimeError, match="synchronize"):
        x.__cuda_array_interface__
    eg.cuda.get_current_stream().synchronize()
    assert x.__cuda_array_interface__["shape"] == (3,)
