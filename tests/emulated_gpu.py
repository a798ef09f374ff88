"""A strict stand-in for CuPy, for tests on machines without a GPU.

    pytest --emulated-gpu -m gpu        # every gpu-marked test, on this module

It is used through `backend._use_device_module(emulated_gpu, emulated_gpu.cupyx)`
and behaves like CuPy where GPU bugs hide, not where it is easy:

- `ndarray` is a type of its own that holds a NumPy array; it is NOT an ndarray
  subclass, so NumPy code cannot use it by accident.
- Implicit conversion to the host raises TypeError as CuPy does: `np.asarray(x)`,
  `__array__`, the buffer protocol (so MPI cannot read it), mixing with NumPy
  arrays in an operation, and `float()`/`int()`/`bool()` of a non-scalar.
- `float()` of a one-element array works, and counts as a device-to-host
  transfer AND a synchronization, as in CuPy.
- MPI can read device memory only when the test sets DDP_CUDA_AWARE=1: then
  `__cuda_array_interface__` exposes the backing buffer, as a CUDA-aware MPI
  would be handed it.
- Every array lives on a device (the thread's current one when it was made);
  an operation on an array of another device raises ValueError, as CuPy's
  kernels do. `DEVICE_COUNT` says how many devices there are.
- `counter` counts device-to-host transfers, host-to-device transfers and
  synchronizations. Every D2H copy is blocking, so it counts a sync too.
- Kernels are asynchronous: every write is stamped with its device's kernel
  count, and only a synchronization (or a blocking copy) of that device marks
  it finished. Memory still being written must not be read outside the stream:
  handing it to MPI (`__cuda_array_interface__`) or peer-copying it from another
  device raises RuntimeError.

Views share memory with their base (the model's layers are views of the flat
arena), and `.data.ptr` is the address of the first element.
"""
from __future__ import annotations

import builtins
import operator
import os
import threading
import weakref
from types import SimpleNamespace

import numpy as np

__version__ = "emulated"
DEVICE_COUNT = 1

float16, float32, float64 = np.float16, np.float32, np.float64
int8, int32, int64, uint8, uint16, bool_ = np.int8, np.int32, np.int64, np.uint8, np.uint16, np.bool_
dtype = np.dtype
newaxis = None
inf, nan, pi = np.inf, np.nan, np.pi

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")


class Counter:
    """Device-to-host transfers, host-to-device transfers and synchronizations."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        self.d2h = self.h2d = self.syncs = 0

    def add(self, d2h=0, h2d=0, syncs=0):
        with self._lock:
            self.d2h += d2h
            self.h2d += h2d
            self.syncs += syncs

    def snapshot(self) -> dict:
        return {"d2h": self.d2h, "h2d": self.h2d, "syncs": self.syncs}


counter = Counter()
_local = threading.local()
_pinned = weakref.WeakValueDictionary()       # id -> the pinned host arrays handed out
_allocations = weakref.WeakValueDictionary()  # id -> the NumPy arrays that hold device memory


def _current() -> int:
    return getattr(_local, "device", 0)


_issued = {}      # device -> kernels launched on it
_finished = {}    # device -> kernels known to be finished (at its last synchronization)
_written = {}     # allocation serial -> (device, number of the kernel that last wrote it)


def _launch(arr):
    """A kernel writes arr: it finishes at some later time, unknown to the host."""
    n = _issued[arr._dev] = _issued.get(arr._dev, 0) + 1
    _written[arr._base[0]] = n
    return arr


def _sync(device):
    _finished[device] = _issued.get(device, 0)


def _settled(arr) -> bool:
    return _written.get(arr._base[0], 0) <= _finished.get(arr._dev, 0)


class Device:
    def __init__(self, device=None):
        self.id = _current() if device is None else int(device)
        if not 0 <= self.id < DEVICE_COUNT:
            raise RuntimeError(f"cudaErrorInvalidDevice: device {self.id} of {DEVICE_COUNT}")

    def use(self):
        _local.device = self.id

    def synchronize(self):
        counter.add(syncs=1)
        _sync(self.id)

    def __enter__(self):
        self._prev = _current()
        self.use()
        return self

    def __exit__(self, *exc):
        _local.device = self._prev

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return self.id

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class Stream:
    def synchronize(self):
        counter.add(syncs=1)
        _sync(_current())


Stream.null = Stream()


def _get_device_count():
    return DEVICE_COUNT


cuda = SimpleNamespace(Device=Device, Stream=Stream, get_current_stream=lambda: Stream.null,
                       runtime=SimpleNamespace(getDeviceCount=_get_device_count,
                                               deviceSynchronize=lambda: Device().synchronize()))


_serials = iter(range(1, 1 << 62))


class _MemoryPointer:
    """`ptr` is unique to an allocation (and offset within it, for views): an address is
    never given out twice, the worst case of a memory pool, so that a cache keyed by
    pointer shows every temporary it keeps."""

    def __init__(self, arr):
        serial, start = arr._base
        self.ptr = (serial << 36) + arr._a.ctypes.data - start
        self.device_id = arr._dev


# --------------------------------------------------------------------------- operands

def _dev_operand(x):
    """The NumPy array behind a device operand; host arrays are refused as CuPy refuses them."""
    if isinstance(x, ndarray):
        if x._dev != _current():
            raise ValueError(f"Array device must be same as the current device: array device = {x._dev} "
                             f"while current = {_current()}")
        return x._a
    if isinstance(x, np.ndarray) and x.ndim > 0:
        raise TypeError(f"Unsupported type {type(x)}")
    return x


def _index(key):
    """Indices may be device arrays or (copied to the device, as CuPy does) host arrays."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return _dev_operand(key)
    if isinstance(key, (np.ndarray, list)):
        counter.add(h2d=1)
        return np.asarray(key)
    return key


def _wrap(res, out=None):
    if out is not None and isinstance(out, ndarray) and res is out._a:
        return out
    if isinstance(res, (np.ndarray, np.generic)):
        return ndarray._of(np.asarray(res))
    if isinstance(res, tuple):
        return tuple(_wrap(r) for r in res)
    return res


def _call(fn, *args, out=None, **kwargs):
    args = [_dev_operand(a) for a in args]
    kwargs = {k: _dev_operand(v) for k, v in kwargs.items()}
    if out is not None:
        if not isinstance(out, ndarray):
            raise TypeError(f"out must be a device array, not {type(out)}")
        kwargs["out"] = _dev_operand(out)
    res = _wrap(fn(*args, **kwargs), out)
    return _launch(res) if isinstance(res, ndarray) else res


# --------------------------------------------------------------------------- the array

class ndarray:
    __array_ufunc__ = None         # NumPy must not take over operations with a device array
    __array_priority__ = 100

    def __init__(self, shape, dtype=float, _array=None):
        self._a = a = np.empty(shape, dtype) if _array is None else _array
        self._dev = _current()
        self._base = (next(_serials), a.ctypes.data)     # views replace it with their base's
        if a.base is None:
            _allocations[id(a)] = a

    @classmethod
    def _of(cls, a):
        return cls(None, _array=a)

    # -- no implicit way to the host
    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def _scalar(self, conv):
        if self._a.size != 1:
            raise TypeError("only length-1 arrays can be converted to Python scalars")
        self._blocking_copy()
        return conv(self._a.reshape(()).item())

    def __float__(self):
        return self._scalar(float)

    def __int__(self):
        return self._scalar(int)

    def __index__(self):
        if self._a.ndim != 0 or self._a.dtype.kind not in "iu":
            raise TypeError("only integer scalar arrays can be converted to a scalar index")
        return self._scalar(int)

    def __bool__(self):
        return self._scalar(bool)

    def __format__(self, spec):
        if self._a.ndim == 0:
            return format(self._scalar(lambda v: v), spec)
        return format(str(self), spec)

    def _blocking_copy(self):
        """A device-to-host copy on the stream: it waits for every kernel before it."""
        counter.add(d2h=1, syncs=1)
        _sync(self._dev)

    def __repr__(self):
        self._blocking_copy()
        return "emulated_gpu." + repr(self._a)

    def __str__(self):
        self._blocking_copy()
        return str(self._a)

    @property
    def __cuda_array_interface__(self):
        # Only a test that asks for CUDA-aware MPI lets MPI read the buffer directly.
        if os.environ.get("DDP_CUDA_AWARE", "").strip() != "1":
            raise AttributeError("__cuda_array_interface__ (set DDP_CUDA_AWARE=1 to expose it to MPI)")
        if not _settled(self):
            raise RuntimeError("device memory handed to MPI while a kernel may still be writing it: "
                               "synchronize the stream first")
        a = self._a
        return {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, False), "version": 3,
                "strides": None if a.flags.c_contiguous else a.strides}

    # -- explicit transfers
    def get(self, stream=None, order="C", out=None, blocking=True):
        _dev_operand(self)
        self._blocking_copy()
        if out is None:
            return self._a.copy()
        if not isinstance(out, np.ndarray) or out.shape != self._a.shape or out.dtype != self._a.dtype:
            raise ValueError("out must be a host array of the same shape and dtype")
        np.copyto(out, self._a)
        return out

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray) or arr.shape != self._a.shape or arr.dtype != self._a.dtype:
            raise ValueError("set() needs a host array of the same shape and dtype")
        _dev_operand(self)
        counter.add(h2d=1)
        np.copyto(self._a, arr)

    def item(self):
        return self._scalar(lambda v: v)

    def tolist(self):
        self._blocking_copy()
        return self._a.tolist()

    # -- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    data = property(lambda self: _MemoryPointer(self))
    device = property(lambda self: Device(self._dev))
    T = property(lambda self: self._view(self._a.T))

    def __len__(self):
        return len(self._a)

    def _view(self, a):
        v = ndarray._of(a)
        v._dev, v._base = self._dev, self._base
        return v

    # -- indexing (views alias their base)
    def __getitem__(self, key):
        _dev_operand(self)
        return self._view(self._a[_index(key)])

    def __setitem__(self, key, value):
        _dev_operand(self)
        self._a[_index(key)] = _dev_operand(value)
        _launch(self)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # -- methods
    def astype(self, dtype, copy=True, order="K"):
        _dev_operand(self)
        if not copy and np.dtype(dtype) == self._a.dtype:
            return self
        return _launch(_wrap(self._a.astype(dtype, order=order)))

    def reshape(self, *shape, order="C"):
        _dev_operand(self)
        return self._view(self._a.reshape(*shape, order=order))

    def ravel(self):
        return self.reshape(-1)

    def transpose(self, *axes):
        return self._view(self._a.transpose(*axes))

    def view(self, dtype=None):
        _dev_operand(self)
        return self._view(self._a.view(dtype))

    def copy(self, order="C"):
        # CuPy copies onto the CURRENT device, even from another one (peer copy), on the current
        # device's stream: it does not wait for the kernels of the source's device.
        if self._dev != _current() and not _settled(self):
            raise RuntimeError(f"peer copy from device {self._dev} while a kernel may still be writing the "
                               "source: synchronize its device first")
        return _launch(ndarray._of(self._a.copy(order)))

    def fill(self, value):
        _dev_operand(self)
        self._a.fill(_dev_operand(value))
        _launch(self)

    def sum(self, axis=None, dtype=None, out=None, keepdims=False):
        return _call(np.sum, self, axis=axis, dtype=dtype, out=out, keepdims=keepdims)

    def max(self, axis=None, out=None, keepdims=False):
        return _call(np.max, self, axis=axis, out=out, keepdims=keepdims)

    def min(self, axis=None, out=None, keepdims=False):
        return _call(np.min, self, axis=axis, out=out, keepdims=keepdims)

    def mean(self, axis=None, dtype=None, out=None, keepdims=False):
        return _call(np.mean, self, axis=axis, dtype=dtype, out=out, keepdims=keepdims)

    def argmax(self, axis=None):
        return _call(np.argmax, self, axis=axis)

    def all(self, axis=None):
        return _call(np.all, self, axis=axis)

    def any(self, axis=None):
        return _call(np.any, self, axis=axis)


def _binary(op):
    def f(self, other):
        return _call(op, self, other)
    return f


def _reflected(op):
    def f(self, other):
        return _call(op, other, self)
    return f


def _inplace(op):
    def f(self, other):
        op(_dev_operand(self), _dev_operand(other))
        return _launch(self)
    return f


for _name in ("add", "sub", "mul", "truediv", "floordiv", "pow", "mod", "matmul", "and", "or", "xor", "rshift",
              "lshift"):
    _op = getattr(operator, _name if _name not in ("and", "or") else _name + "_")
    setattr(ndarray, f"__{_name}__", _binary(_op))
    setattr(ndarray, f"__r{_name}__", _reflected(_op))
    setattr(ndarray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_name}__", _binary(getattr(operator, _name)))
ndarray.__neg__ = lambda self: _call(operator.neg, self)
ndarray.__abs__ = lambda self: _call(np.abs, self)
ndarray.__hash__ = None


# --------------------------------------------------------------------------- functions

def _ufunc(fn):
    def f(*args, out=None, **kwargs):
        return _call(fn, *args, out=out, **kwargs)
    f.__name__ = fn.__name__
    return f


for _name in ("add", "subtract", "multiply", "divide", "true_divide", "maximum", "minimum", "tanh", "exp", "log",
              "log1p", "sqrt", "abs", "absolute", "negative", "square", "isfinite", "isnan", "sign", "matmul",
              "where", "sum", "argmax", "ascontiguousarray", "max", "min", "mean", "dot", "clip", "equal", "greater", "less",
              "rint"):
    globals()[_name] = _ufunc(getattr(np, _name))


def vdot(a, b):
    return _call(np.vdot, a, b)


def asarray(x, dtype=None, order=None):
    if isinstance(x, ndarray):
        return x.astype(dtype, copy=False) if dtype is not None else x
    counter.add(h2d=1)
    return ndarray._of(np.array(x, dtype=dtype, order=order or "K", copy=True))


def array(x, dtype=None, copy=True):
    if isinstance(x, ndarray):
        return x.astype(dtype or x.dtype, copy=copy) if copy else asarray(x, dtype)
    return asarray(x, dtype)


def _maker(fn, kernel=True):
    def f(*args, **kwargs):
        a = ndarray._of(fn(*args, **kwargs))
        return _launch(a) if kernel else a
    return f


zeros, empty, ones, full, arange = (_maker(np.zeros), _maker(np.empty, kernel=False), _maker(np.ones),
                                    _maker(np.full), _maker(np.arange))


def _like(fn):
    def f(a, dtype=None):
        return _launch(ndarray._of(fn(_dev_operand(a), dtype=dtype)))
    return f


zeros_like, empty_like, ones_like = _like(np.zeros_like), _like(np.empty_like), _like(np.ones_like)


def concatenate(arrays, axis=0):
    return _launch(_wrap(np.concatenate([_dev_operand(a) for a in arrays], axis=axis)))


def stack(arrays, axis=0):
    return _launch(_wrap(np.stack([_dev_operand(a) for a in arrays], axis=axis)))


def asnumpy(x, stream=None, out=None):
    if isinstance(x, ndarray):
        return x.get(out=out)
    return np.asarray(x)


def get_array_module(*args):
    import sys

    return sys.modules[__name__] if builtins.any(isinstance(a, ndarray) for a in args) else np


def _empty_pinned(shape, dtype=float):
    a = np.empty(shape, dtype)
    _pinned[id(a)] = a
    return a


def is_pinned(a) -> bool:
    """Whether host array `a` (or its base) came from cupyx.empty_pinned."""
    while a is not None:
        if _pinned.get(id(a)) is a:
            return True
        a = a.base if isinstance(a, np.ndarray) else None
    return False


def is_device_address(address: int) -> bool:
    """Whether `address` lies in emulated device memory (what a CUDA-aware MPI would hand
    a reduction op, and what host code such as np.frombuffer must never read)."""
    for a in list(_allocations.values()):
        start = a.ctypes.data
        if start <= address < start + builtins.max(a.nbytes, 1):
            return True
    return False


cupyx = SimpleNamespace(empty_pinned=_empty_pinned)
