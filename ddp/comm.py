"""Communicators: one interface, three strategies, chosen by name.

    serial     world size 1, no MPI needed
    mpi        mpi4py's buffer calls (Allreduce, Iallreduce, Bcast, Isend, ...) on contiguous arrays
    simulated  N logical ranks as N threads of one process (comm_simulated.py)

Array methods take contiguous NumPy or CuPy arrays and work in place; methods
ending in `_obj` are for small metadata only (they pickle). `debug=True`
wraps any of them in `DebugComm`, which checks before each collective that
every rank is making the same call with the same buffer size. Every wait in
MPI reports to the watchdog from here (`--timeout`).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from . import backend
from .errors import NonFiniteError, TrainingError, UsageError
from .launcher import check_launcher, launched, local_position
from .watchdog import WATCHDOG


class Request:
    """A pending operation. `test()` lets MPI make progress; `wait()` finishes it; `cancel()` withdraws a
    receive. `raw`: the mpi4py request, for MPIComm.waitall and waitany."""

    def __init__(self, wait=None, test=None, cancel=None, raw=None):
        self._wait, self._test, self._cancel, self.raw = wait, test, cancel, raw
        self.done = wait is None

    def test(self) -> bool:
        if not self.done and self._test is not None and self._test():
            self.wait()
        return self.done

    def wait(self) -> None:
        if not self.done:
            self._wait()
            self.done = True

    def cancel(self) -> None:
        if not self.done and self._cancel is not None:
            self._cancel()
        self.done = True


class Communicator:
    """Collectives on every communicator. The MPI and simulated ones also have messages between ranks:
    isend(buf, dest, tag) and irecv(buf, source, tag) return Requests; waitall(requests, op) and
    waitany(requests, op, detail) -> the index of a completed one (None entries and finished ones are
    skipped); gatherv(buf, out, counts, root); split(color, key) -> a communicator of the ranks of one
    color; free(). `op` and `detail()` name the wait in the watchdog's message."""

    name = "base"
    rank = 0
    size = 1
    local_rank = 0

    def allreduce_sum(self, buf, compress=None):
        self.iallreduce_sum(buf, compress).wait()

    def allreduce_mean(self, buf):
        self.allreduce_sum(buf)
        buf *= 1.0 / self.size

    def iallreduce_sum(self, buf, compress=None) -> Request:
        raise NotImplementedError

    def bcast(self, buf, root=0):
        raise NotImplementedError

    def reduce_scatter_sum(self, buf, counts) -> None:
        """In place: buf is cut into len(counts) consecutive parts; on return this rank's part holds the sum of
        that part over the ranks (the rest of buf is left as it was). --shard-optimizer (zero.py)."""
        raise NotImplementedError

    def allgather(self, buf, counts) -> None:
        """In place: every rank's part of buf (cut as in reduce_scatter_sum) is copied to every rank."""
        raise NotImplementedError

    def barrier(self):
        raise NotImplementedError

    def allgather_obj(self, obj) -> list:
        raise NotImplementedError

    def bcast_obj(self, obj, root=0):
        return self.allgather_obj(obj)[root]

    def allreduce_obj(self, value, op=sum):
        return op(self.allgather_obj(value))

    def abort(self, code=1):
        raise SystemExit(code)

    def set_timeout(self, seconds: float) -> None:
        """Arm the collective watchdog: a wait in a collective longer than this ends the job."""

    def at_step(self, step: int) -> None:
        """Tell the watchdog which step the next collectives belong to (for its message)."""

    def describe(self) -> str:
        return f"{self.name} (rank {self.rank} of {self.size})"


def _compressed_sum(buf, compress, reduce_fn, halves=None):
    """Reduce `buf` as float16 and scatter back: half the bytes on the wire.

    `halves` (a dict) keeps one float16 buffer per GPU buffer: a new temporary every
    step would have a new device pointer, and the staging cache keyed by pointer
    would then grow by one pinned buffer per step."""
    if compress is None:
        return reduce_fn(buf)
    if compress != "fp16":
        raise UsageError(f"unknown compression {compress!r}: expected fp16")
    xp = backend.get_array_module(buf)
    if halves is not None and backend.is_gpu_array(buf):
        key = (buf.data.ptr, buf.size)
        half = halves.get(key)
        if half is None:
            half = halves[key] = xp.empty(buf.shape, xp.float16)
        half[...] = buf
    else:
        half = buf.astype(xp.float16)
    done = reduce_fn(half)

    def finish():
        done.wait()
        buf[...] = half
    return Request(finish, done.test)


class SerialComm(Communicator):
    """World size 1: every collective is the identity."""

    name = "serial"

    def iallreduce_sum(self, buf, compress=None):
        return _compressed_sum(buf, compress, lambda b: Request())

    def bcast(self, buf, root=0):
        pass

    def reduce_scatter_sum(self, buf, counts):
        pass

    def allgather(self, buf, counts):
        pass

    def barrier(self):
        pass

    def allgather_obj(self, obj):
        return [obj]


# --------------------------------------------------------------------------- MPI

def _fp16_sum(inbuf, inoutbuf, datatype):
    # MPI has no standard float16 sum, so float16 travels as 2-byte words and
    # is added here, in float32 to lose nothing more than the final rounding.
    a = np.frombuffer(inbuf, np.float16)
    b = np.frombuffer(inoutbuf, np.float16)
    b[...] = a.astype(np.float32) + b.astype(np.float32)


def cuda_aware_mpi() -> bool:
    """Whether the loaded MPI library can read GPU memory directly.

    Asks the library itself (MPIX_Query_cuda_support, in Open MPI and MPICH);
    DDP_CUDA_AWARE=0/1 overrides the answer (any other value is refused: a wrong "yes" hands device
    pointers to an MPI that cannot read them).
    """
    import ctypes

    env = os.environ.get("DDP_CUDA_AWARE")
    if env is not None:
        if env.strip() not in ("0", "1"):
            raise UsageError(f"DDP_CUDA_AWARE must be 0 or 1, got {env!r}")
        return env.strip() == "1"
    try:
        from mpi4py import MPI  # noqa: F401 (loads libmpi into the process)
        with open("/proc/self/maps") as f:
            libs = sorted({w for w in f.read().split() if "/libmpi" in w and ".so" in w})
        for lib in libs:
            fn = getattr(ctypes.CDLL(lib), "MPIX_Query_cuda_support", None)
            if fn is not None:
                return bool(fn())
    except Exception:
        pass
    return False


RING_TAG = 0x5253          # MPIComm.reduce_scatter_sum's messages, apart from any other's


class MPIComm(Communicator):
    """mpi4py's buffer-based collectives. GPU arrays go to MPI directly when the
    library is CUDA-aware; otherwise they are staged through pinned host buffers."""

    name = "mpi"

    def __init__(self, mpi_comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        if mpi_comm is None:
            self.local_rank, self.local_size = local_position(self.local_rank, self.local_size)
        self._staging = {}
        self._halves = {}
        self._fp16_op = None

    @functools.cached_property
    def cuda_aware(self) -> bool:
        return cuda_aware_mpi()

    def gpu_path(self) -> str:
        return "CUDA-aware MPI (device buffers)" if self.cuda_aware else "staged through pinned host buffers"

    def _host_view(self, buf, fill=True):
        """(array MPI should use, copy-back: a no-op unless staged). Makes GPU buffers safe for MPI.
        fill=False: a receive buffer, whose old contents MPI need not see."""
        if not backend.is_gpu_array(buf):
            return buf, lambda: None
        # float16 is summed by a Python op (_fp16_sum) that reads HOST memory with
        # np.frombuffer: a CUDA-aware MPI would hand it device pointers, so float16
        # is always staged.
        if self.cuda_aware and buf.dtype != np.float16:
            backend.synchronize(buf)       # MPI must not read memory a kernel is still writing
            return buf, lambda: None
        key = (backend.pointer(buf), buf.size, buf.dtype.str)
        host = self._staging.get(key)
        if host is None:
            if len(self._staging) >= 64:   # a bound, whatever buffers come: pending copies keep theirs alive
                self._staging.clear()
            host = self._staging[key] = backend.pinned_empty(buf.shape, buf.dtype)
        if fill:                           # blocking, on the stream that wrote buf: no separate sync
            backend.copy_to_host(buf, host)
        return host, lambda: backend.copy_to_device(host, buf)

    def _spec(self, arr):
        if arr.dtype == np.float16:
            if self._fp16_op is None:
                self._fp16_op = self.MPI.Op.Create(_fp16_sum, commute=True)
            return [arr.view(np.uint16), self.MPI.UINT16_T], self._fp16_op
        return arr, self.MPI.SUM

    def iallreduce_sum(self, buf, compress=None):
        if compress is not None:
            return _compressed_sum(buf, compress, self.iallreduce_sum, self._halves)
        host, copy_back = self._host_view(buf)
        req = self.comm.Iallreduce(self.MPI.IN_PLACE, *self._spec(host))

        def wait():
            with WATCHDOG.watch("allreduce", count=host.size):
                req.Wait()
            copy_back()
        return Request(wait, req.Test)

    def allreduce_sum(self, buf, compress=None):
        if compress is not None:
            return _compressed_sum(buf, compress, self.iallreduce_sum, self._halves).wait()
        host, copy_back = self._host_view(buf)
        with WATCHDOG.watch("allreduce", count=host.size):
            self.comm.Allreduce(self.MPI.IN_PLACE, *self._spec(host))
        copy_back()

    def bcast(self, buf, root=0):
        host, copy_back = self._host_view(buf)
        with WATCHDOG.watch("bcast", count=host.size):
            self.comm.Bcast(host, root=root)
        copy_back()

    def reduce_scatter_sum(self, buf, counts):
        # A ring of sends, not MPI_Reduce_scatter: Open MPI's took 3x an Allreduce's time and twice the buffer in
        # scratch memory (21M floats on 2 ranks: 133 ms and +161 MB, against 17 ms and +41 MB for this ring).
        # Step s: send the part accumulated so far to the right, add the one from the left; after size - 1 steps
        # rank r holds part r summed over every rank.
        host, copy_back = self._host_view(buf)
        n, r = self.size, self.rank
        starts = np.cumsum([0, *counts]).tolist()
        recv = backend.get_array_module(host).empty(max(counts), host.dtype)   # on the device with CUDA-aware MPI
        right, left = (r + 1) % n, (r - 1) % n
        for s in range(n - 1):
            out, into = (r - 1 - s) % n, (r - 2 - s) % n
            got = recv[:counts[into]]
            reqs = [self.comm.Irecv(got, source=left, tag=RING_TAG),
                    self.comm.Isend(host[starts[out]:starts[out + 1]], dest=right, tag=RING_TAG)]
            with WATCHDOG.watch("reduce_scatter", count=host.size):
                self.MPI.Request.Waitall(reqs)
            host[starts[into]:starts[into + 1]] += got
            backend.synchronize(host)          # the next send reads it: MPI must not see a kernel still writing
        copy_back()

    def allgather(self, buf, counts):
        host, copy_back = self._host_view(buf)
        displs = np.cumsum([0, *counts[:-1]]).tolist()
        with WATCHDOG.watch("allgather", count=host.size):
            self.comm.Allgatherv(self.MPI.IN_PLACE, [host, (list(counts), displs)])
        copy_back()

    def barrier(self):
        with WATCHDOG.watch("barrier"):
            self.comm.Barrier()

    def allgather_obj(self, obj):
        with WATCHDOG.watch("allgather"):
            return self.comm.allgather(obj)

    def bcast_obj(self, obj, root=0):
        with WATCHDOG.watch("bcast"):
            return self.comm.bcast(obj, root=root)

    def isend(self, buf, dest, tag):
        host, _ = self._host_view(buf)
        raw = self.comm.Isend(host, dest=dest, tag=tag)
        return Request(raw.Wait, raw.Test, raw=raw)

    def irecv(self, buf, source, tag):
        host, copy_back = self._host_view(buf, fill=False)
        raw = self.comm.Irecv(host, source=source, tag=tag)

        def wait():
            raw.Wait()
            copy_back()

        def cancel():
            raw.Cancel()
            raw.Wait()
        return Request(wait, raw.Test, cancel, raw)

    def waitall(self, requests, op="waitall"):
        with WATCHDOG.watch(op):
            self.MPI.Request.Waitall([r.raw for r in requests if not r.done])
        for r in requests:
            r.wait()                       # the copies back to the device

    def waitany(self, requests, op="waitany", detail=None):
        raws = [self.MPI.REQUEST_NULL if r is None or r.done else r.raw for r in requests]
        with WATCHDOG.watch(op, detail):
            i = self.MPI.Request.Waitany(raws)
        if i == self.MPI.UNDEFINED:
            return None
        requests[i].wait()
        return i

    def gatherv(self, buf, out, counts, root=0):
        displs = np.cumsum([0, *counts[:-1]]).tolist()
        with WATCHDOG.watch("gatherv"):
            if self.rank != root:
                return self.comm.Gatherv(buf, None, root=root)
            out[displs[root]:displs[root] + counts[root]] = buf      # a no-op when buf is that slice already
            self.comm.Gatherv(self.MPI.IN_PLACE, [out, (counts, displs)], root=root)

    def split(self, color, key=0):
        return MPIComm(self.comm.Split(color, key))

    def free(self):
        self.comm.Free()

    def abort(self, code=1):
        self.comm.Abort(code)

    def set_timeout(self, seconds):
        WATCHDOG.start(seconds, self.MPI.COMM_WORLD)

    def at_step(self, step):
        WATCHDOG.step = step


# --------------------------------------------------------------------------- debug

def _to_inner(method, op=None):
    """A DebugComm method that calls the wrapped communicator's; with `op`, a collective whose call and buffer
    (the first argument, where it has one) the ranks compare first."""
    def call(self, *args, **kwargs):
        if op:
            self._check(op, *args[:1])
        return getattr(self.inner, method)(*args, **kwargs)
    return call


class DebugComm(Communicator):
    """Wraps a communicator; before every collective all ranks compare what they
    are about to call, and a mismatch names the rank that differs instead of
    hanging or silently mixing buffers."""

    def __init__(self, inner: Communicator):
        self.inner = inner
        self.name, self.rank, self.size = f"{inner.name}+debug", inner.rank, inner.size
        self.local_rank = inner.local_rank

    def _check(self, op, buf=None):
        finite = buf is None or op == "bcast" or bool(backend.get_array_module(buf).isfinite(buf).all())
        sig = (op, None if buf is None else (int(buf.size), str(buf.dtype)))
        got = self.inner.allgather_obj((sig, finite))     # every rank sees every verdict: no rank waits alone
        bad = [r for r, (s, _) in enumerate(got) if s != got[0][0]]
        if bad:
            raise TrainingError(f"--debug: collective mismatch: rank 0 calls {got[0][0]}, but rank {bad[0]} "
                                f"calls {got[bad[0]][0]}")
        nonfinite = [r for r, (_, f) in enumerate(got) if not f]
        if nonfinite:
            raise NonFiniteError(f"--debug: rank {nonfinite[0]} passes NaN or Inf to {op}")

    iallreduce_sum = _to_inner("iallreduce_sum", "allreduce")
    allreduce_sum = _to_inner("allreduce_sum", "allreduce")
    bcast = _to_inner("bcast", "bcast")
    reduce_scatter_sum = _to_inner("reduce_scatter_sum", "reduce_scatter")
    allgather = _to_inner("allgather", "allgather")
    barrier = _to_inner("barrier", "barrier")
    # Not checked (_check itself uses allgather_obj), but Communicator defines them: __getattr__ would not forward
    allgather_obj = _to_inner("allgather_obj")
    abort = _to_inner("abort")
    set_timeout = _to_inner("set_timeout")
    at_step = _to_inner("at_step")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def world_comm() -> Communicator:
    """The MPI world when launched under mpiexec with more than one rank, else serial.

    mpi4py is imported lazily so that single-process use needs no MPI at all.
    """
    if launched() and (comm := MPIComm()).size > 1:
        return comm
    check_launcher(os.environ)
    return SerialComm()
