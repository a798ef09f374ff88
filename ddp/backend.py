"""The array backend: NumPy on the CPU, CuPy on a GPU.

This is the only module that imports cupy. Everything else receives arrays and
asks `get_array_module(x)` which namespace they belong to, so the math in
nn.py, losses.py and optim.py is written once for both.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .errors import UsageError
from .launcher import local_ranks_from_env

_cupy = None
_cupyx = None             # cupyx, for pinned host memory
_cupy_error = None
# Device-to-host transfers and host synchronizations made through this module
# (benchmarks/bench_step.py reports them per step; the emulated device in the
# tests also counts the implicit ones, which must stay at zero).
stats = {"d2h": 0, "syncs": 0}


def _import_cupy():
    """Import cupy once and prove it can run a kernel.

    CuPy imports fine on a machine without a usable GPU and only fails, with a
    CUDARuntimeError, on the first array operation; we run one here so the
    user hears about it at start-up rather than mid-training.
    """
    global _cupy, _cupyx, _cupy_error
    if _cupy is not None or _cupy_error is not None:
        return _cupy
    try:
        import cupy  # noqa: the one place cupy is imported
        import cupyx

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device found")
        (cupy.arange(2) + 1).sum().item()
        _cupy, _cupyx = cupy, cupyx
    except ImportError as e:
        _cupy_error = f"CuPy is not installed ({e}); install the 'gpu' extra"
    except Exception as e:  # CUDARuntimeError is a RuntimeError, but be broad
        _cupy_error = f"CuPy is installed but no GPU is usable ({type(e).__name__}: {e})"
    return _cupy


def _use_device_module(module, extras=None) -> None:
    """For the tests only: treat `module` as cupy and `extras` as cupyx (the emulated
    device in tests/emulated_gpu.py); `None` goes back to importing the real cupy."""
    global _cupy, _cupyx, _cupy_error
    _cupy, _cupyx, _cupy_error = module, extras, None


def gpu_available() -> bool:
    return _import_cupy() is not None


def gpu_unavailable_reason() -> str | None:
    _import_cupy()
    return _cupy_error


def gpu_count() -> int:
    cp = _import_cupy()
    return cp.cuda.runtime.getDeviceCount() if cp is not None else 0


def get_xp(device: str = "cpu"):
    """Return the array namespace for device 'cpu', 'gpu' or 'auto'."""
    if device == "cpu":
        return np
    if device not in ("gpu", "auto"):
        raise UsageError(f"unknown device {device!r}: expected cpu, gpu or auto")
    cp = _import_cupy()
    if cp is not None:
        return cp
    if device == "auto":
        return np
    raise UsageError(f"--device gpu was asked for, but {_cupy_error}")


def use_gpu(index: int) -> None:
    """Make GPU `index` current for this process (one rank, one GPU)."""
    cp = _import_cupy()
    if cp is not None:
        cp.cuda.Device(index).use()


def get_array_module(x):
    """numpy or cupy, whichever `x` belongs to."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy
    return np


def pointer(x) -> int:
    """The address of x's first element, on the device or the host."""
    return x.data.ptr if is_gpu_array(x) else x.ctypes.data


def is_gpu_array(x) -> bool:
    return get_array_module(x) is not np


def to_numpy(x) -> np.ndarray:
    """A host copy (or the array itself if it already lives on the host)."""
    if is_gpu_array(x):
        stats["d2h"] += 1
        stats["syncs"] += 1          # a blocking copy waits for the kernels before it
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_device_of(x, like):
    """`x` on the device that holds `like`: a peer copy when they differ (simulated
    ranks on several GPUs), `x` itself otherwise. A kernel may only read arrays of
    the current device."""
    if not is_gpu_array(like) or x.device == like.device:
        return x
    with x.device:
        synchronize()      # x was written on ITS device's stream, which the copy below does not wait for
    with like.device:
        return x.copy()


_blas_axpy = None


def _find_blas_axpy() -> dict:
    """{dtype: C function y += a*x} from the BLAS that NumPy has already loaded, or {}.

    scipy.linalg.blas offers the same call, but importing scipy costs 0.4 s of every rank's
    start-up. The library is found in /proc/self/maps (Linux); its symbols depend on how it was
    built: NumPy's wheels export scipy_cblas_saxpy64_, a system OpenBLAS cblas_saxpy.
    """
    import ctypes

    found = {}
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({w for w in f.read().split() if "blas" in os.path.basename(w) and ".so" in w})
    except OSError:
        return found
    for lib in libs:
        try:
            dll = ctypes.CDLL(lib)
        except OSError:
            continue
        for pattern, int_t in (("scipy_cblas_{}axpy64_", ctypes.c_int64), ("cblas_{}axpy64_", ctypes.c_int64),
                               ("cblas_{}axpy", ctypes.c_int)):
            fns = [getattr(dll, pattern.format(c), None) for c in "sd"]
            if all(fns):
                for fn, dtype, real in zip(fns, (np.float32, np.float64), (ctypes.c_float, ctypes.c_double)):
                    fn.restype = None
                    fn.argtypes = [int_t, real, ctypes.c_void_p, int_t, ctypes.c_void_p, int_t]
                    found[np.dtype(dtype)] = (fn, np.iinfo(np.int64 if int_t is ctypes.c_int64 else np.int32).max)
                return found
    return found


def axpy(a: float, x, y) -> None:
    """y += a * x in place, in ONE pass over memory (BLAS axpy).

    NumPy's `y += a * x` reads and writes a temporary as big as the arena; on
    the optimizer's hot path that second pass was half of its time.
    """
    global _blas_axpy
    if is_gpu_array(y):
        y += a * x     # a fused elementwise kernel would save the temporary; the GPU has bandwidth to spare
        return
    if _blas_axpy is None:
        _blas_axpy = _find_blas_axpy()
    fn, n_max = _blas_axpy.get(y.dtype, (None, 0))
    if fn is not None and x.dtype == y.dtype and x.flags.c_contiguous and y.flags.c_contiguous \
            and y.flags.writeable and y.ndim == 1 and x.shape == y.shape and y.size <= n_max:
        fn(y.size, float(a), x.ctypes.data, 1, y.ctypes.data, 1)
        return
    y += a * x


def synchronize(x=None) -> None:
    """Wait for queued GPU work: MPI reads device memory behind CuPy's back,
    so the kernels that wrote a buffer must have finished first."""
    if _cupy is not None and (x is None or is_gpu_array(x)):
        stats["syncs"] += 1
        _cupy.cuda.get_current_stream().synchronize()


def pinned_empty(shape, dtype) -> np.ndarray:
    """A page-locked host array, so device<->host copies run at full speed."""
    _import_cupy()
    return _cupyx.empty_pinned(shape, dtype)


def copy_to_host(src, dst: np.ndarray) -> None:
    """A blocking copy on the current stream: it starts after the kernels that wrote
    `src` and returns when `dst` holds the data (a transfer and a synchronization)."""
    stats["d2h"] += 1
    stats["syncs"] += 1
    src.get(out=dst)


def copy_to_device(src: np.ndarray, dst) -> None:
    dst.set(src)


def cupy_version() -> str | None:
    cp = _import_cupy()
    if cp is not None:
        return cp.__version__
    try:
        import importlib.metadata as md

        for name in ("cupy-cuda13x", "cupy-cuda12x", "cupy"):
            try:
                return md.version(name) + " (no usable GPU)"
            except md.PackageNotFoundError:
                pass
    except Exception:
        pass
    return None


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")


thread_note = None     # limit_threads' last description, for the training start line


def limit_threads(local_ranks: int | None = None, simulated: int = 1, env=None) -> str:
    """Cap BLAS and OpenMP threads so that the ranks on this node share its cores; returns a description
    such as "openblas=1 (2 cores / 2 local ranks)", also kept in `thread_note` for the start line.

    Every rank's BLAS would otherwise start one thread per core: 4 ranks on 2 cores ran 8 spinning threads
    and a quick start 30x slower than with one thread each. Threads = the cores this process may use
    (its affinity mask) // (local ranks x simulated ranks), at least 1. Simulated ranks are threads of one
    process that call BLAS at the same time, so they count like ranks. A user's OMP_NUM_THREADS (or
    OPENBLAS_, MKL_, BLIS_NUM_THREADS, VECLIB_MAXIMUM_THREADS) wins: nothing is changed then.
    local_ranks (MPI's count) is checked against the launcher's (local_ranks_from_env).
    """
    global thread_note
    env = os.environ if env is None else env
    user = [k for k in THREAD_VARS if env.get(k, "").strip()]
    if user:
        why = "set by " + ", ".join(f"{k}={env[k]}" for k in user)
    else:
        # The larger count wins: under srun with PMIx, Open MPI's shared-memory split saw 1 rank per node.
        local = max(local_ranks or 1, local_ranks_from_env(env) or 1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // (local * max(simulated, 1)))
        why = f"{cores} core{'s' * (cores > 1)} / {local} local rank{'s' * (local > 1)}" + \
            (f" x {simulated} simulated" if simulated > 1 else "")
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=n)
        except ImportError as e:
            why = f"not limited: {e}"
    thread_note = f"{blas_threads()} ({why})"
    return thread_note


def blas_threads() -> str:
    """What the loaded BLAS and OpenMP libraries report about their threads."""
    try:
        from threadpoolctl import threadpool_info

        return ", ".join(sorted({f"{i['internal_api']}={i['num_threads']}" for i in threadpool_info()})) \
            or "unknown"
    except Exception:
        return os.environ.get("OMP_NUM_THREADS", "unknown")


def all_finite(x, sqnorm=None) -> bool:
    """No NaN or Inf in x. The squared norm is one fast BLAS pass (pass it in when it is
    already on the host); only when it is not finite (it may overflow on large finite
    values) is every element checked."""
    xp = get_array_module(x)
    if sqnorm is None:
        sqnorm = float(xp.vdot(x, x))
    return math.isfinite(sqnorm) or bool(xp.isfinite(x).all())
