"""Simulated ranks: N logical ranks as N threads of one process, with every collective and message of MPI.

    run_simulated(4, fn, cfg)      # fn(comm, cfg) on 4 SimulatedComm ranks; returns their 4 results
    ddp train --simulate-ranks 4   # the same, from the command line (both modes: allreduce and ps)

Reductions add the ranks' buffers in rank order, so every rank gets bitwise the same result. Messages match
as MPI's do: by (source, tag), in the order the receives were posted, and a send whose receive is not posted
yet waits in an unexpected queue. No rank waits forever: if one fails, every other wait raises; a wait
longer than --timeout is a stall, reported as a TrainingError that names the ranks not arrived.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from . import backend
from .comm import Communicator, Request, SerialComm, _compressed_sum
from .errors import TrainingError, UsageError


class SimulatedWorld:
    """State shared by the ranks of one simulated communicator: a slot per rank, a barrier, mailboxes.
    `root` is the world of run_simulated; split() makes sub-worlds that fail and stall with it."""

    def __init__(self, size, timeout=300.0, root=None):
        self.size, self.timeout = size, timeout
        self.root = root or self
        self.family = [self] if root is None else None     # every world of the job (on the root only)
        self.slots = [None] * size
        self.barrier = threading.Barrier(size)
        self.waiting = [None] * size       # (op, step) of each rank inside the barrier
        self.posted = [[] for _ in range(size)]       # per destination: [source, tag, buf, box]
        self.unexpected = [[] for _ in range(size)]   # per destination: [source, tag, data]
        self.failed = False
        self.stall = None                  # the message, fixed by the first rank to see the stall
        self.lock = threading.Condition()  # an RLock inside: a request's test() may wait() under it

    def fail(self):
        root = self.root
        root.failed = True
        for w in root.family:
            w.barrier.abort()
            with w.lock:
                w.lock.notify_all()


class SimulatedComm(Communicator):
    """Rank `rank` of a SimulatedWorld."""

    name = "simulated"

    def __init__(self, world: SimulatedWorld, rank: int):
        self.world, self.rank, self.size, self.local_rank = world, rank, world.size, rank
        self.step = 0

    def set_timeout(self, seconds):
        self.world.timeout = seconds

    def at_step(self, step):
        self.step = step

    def _stalled(self, op, missing) -> TrainingError:
        root = self.world.root
        with root.lock:
            if root.stall is None:
                root.stall = (f"rank {self.rank}: no progress for {self.world.timeout:g} s at step {self.step}, "
                              f"waiting in {op}; {missing}")
        return TrainingError(root.stall)

    def _sync(self, op="barrier"):
        w = self.world
        w.waiting[self.rank] = (op, self.step)
        try:
            w.barrier.wait(w.timeout)
        except threading.BrokenBarrierError:
            if w.root.failed:
                raise RuntimeError(f"simulated rank {self.rank}: another rank failed") from None
            missing = [r for r in range(w.size) if w.waiting[r] is None]
            raise self._stalled(op, f"ranks {missing} have not arrived") from None
        w.waiting[self.rank] = None     # only after success: a stall must still see who was waiting

    def _exchange(self, value, op):
        w = self.world
        w.slots[self.rank] = value
        self._sync(op)
        got = list(w.slots)
        self._sync(op)            # nobody may overwrite a slot before everyone has read it
        return got

    def iallreduce_sum(self, buf, compress=None):
        if compress is not None:
            return _compressed_sum(buf, compress, self.iallreduce_sum)
        # Ranks may sit on different GPUs: the sum is done on this rank's device, from peer copies.
        parts = [backend.to_device_of(p, buf) for p in self._exchange(buf.copy(), "allreduce")]
        buf[...] = sum(parts[1:], parts[0].astype(np.float32) if buf.dtype == np.float16 else parts[0])
        return Request()

    def bcast(self, buf, root=0):
        src = self._exchange(buf.copy() if self.rank == root else None, "bcast")[root]
        buf[...] = backend.to_device_of(src, buf)

    def reduce_scatter_sum(self, buf, counts):
        start = sum(counts[:self.rank])
        part = slice(start, start + counts[self.rank])
        parts = [backend.to_device_of(p[part], buf) for p in self._exchange(buf.copy(), "reduce_scatter")]
        buf[part] = sum(parts[1:], parts[0])

    def allgather(self, buf, counts):
        starts = np.cumsum([0, *counts]).tolist()
        peers = self._exchange(buf.copy(), "allgather")
        for r, p in enumerate(peers):
            if r != self.rank:
                buf[starts[r]:starts[r + 1]] = backend.to_device_of(p[starts[r]:starts[r + 1]], buf)

    def gatherv(self, buf, out, counts, root=0):
        parts = self._exchange(buf.copy(), "gatherv")
        if self.rank == root:
            out[...] = backend.to_device_of(np.concatenate([backend.to_numpy(p) for p in parts]), out)

    def barrier(self):
        self._sync()

    def allgather_obj(self, obj):
        return self._exchange(obj, "allgather")

    def split(self, color, key=0):
        w = self.world
        mine = self._exchange((color, key), "split")
        ranks = [r for _, r in sorted((k, r) for r, (c, k) in enumerate(mine) if c == color)]
        sub = None
        if ranks[0] == self.rank:                  # the group's leader makes its world
            sub = SimulatedWorld(len(ranks), w.timeout, w.root)
            with w.root.lock:
                w.root.family.append(sub)
        return SimulatedComm(self._exchange(sub, "split")[ranks[0]], ranks.index(self.rank))

    def free(self):
        pass

    # ---- messages: a send is buffered (complete at once); a receive completes when its message arrives
    def isend(self, buf, dest, tag):
        w, data = self.world, buf.copy()
        with w.lock:
            entry = next((e for e in w.posted[dest] if e[:2] == [self.rank, tag]), None)
            if entry is None:
                w.unexpected[dest].append([self.rank, tag, data])
            else:
                w.posted[dest].remove(entry)
                _deliver(entry[2], data, entry[3])
            w.lock.notify_all()
        return Request()

    def irecv(self, buf, source, tag):
        w, box = self.world, {}
        with w.lock:
            entry = next((e for e in w.unexpected[self.rank] if e[:2] == [source, tag]), None)
            if entry is None:
                entry = [source, tag, buf, box]
                w.posted[self.rank].append(entry)
            else:
                w.unexpected[self.rank].remove(entry)
                _deliver(buf, entry[2], box)

        def cancel():
            with w.lock:
                if entry in w.posted[self.rank]:
                    w.posted[self.rank].remove(entry)
        return Request(lambda: self._await(lambda: box, "recv"), lambda: bool(box), cancel)

    def _await(self, ready, op, detail=None):
        w = self.world
        deadline = time.monotonic() + w.timeout
        with w.lock:
            while not ready():
                if w.root.failed:
                    raise RuntimeError(f"simulated rank {self.rank}: another rank failed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._stalled(op, detail() if detail else "no message came")
                w.lock.wait(min(left, 0.5))

    def waitall(self, requests, op="waitall"):
        self._await(lambda: all(r.done or r.test() for r in requests), op)

    def waitany(self, requests, op="waitany", detail=None):
        live = [i for i, r in enumerate(requests) if r is not None and not r.done]
        if not live:
            return None
        found = []

        def ready():               # test() finishes a request: stop at the first, as MPI_Waitany does
            found[:] = [next((i for i in live if requests[i].test()), None)]
            return found[0] is not None
        self._await(ready, op, detail)
        return found[0]

    def abort(self, code=1):
        self.world.fail()
        raise SystemExit(code)


def _deliver(buf, data, box):
    buf.reshape(-1)[:data.size] = backend.to_device_of(data, buf).reshape(-1)
    box["done"] = True


def run_on(comm, simulated: int, fn, *args):
    """fn(comm, *args) on this process's communicator (serial when None), or, with --simulate-ranks N, on N
    simulated ranks, returning rank 0's result. Simulated ranks under an MPI launch of several ranks are refused:
    each MPI rank would train alone."""
    if not simulated:
        return fn(comm or SerialComm(), *args)
    if comm is not None and comm.size > 1:
        raise UsageError("--simulate-ranks runs in one process: do not combine it with mpiexec")
    return run_simulated(simulated, fn, *args)[0]


def run_simulated(size, fn, *args, **kwargs):
    """Run fn(comm, *args, **kwargs) as `size` simulated ranks, one thread each.

    Returns the list of the ranks' return values. The first exception raised
    by any rank is re-raised here, with the others unblocked.
    """
    if size < 1:
        raise UsageError(f"--simulate-ranks must be >= 1, got {size}")
    world = SimulatedWorld(size)
    results, errors = [None] * size, [None] * size

    def body(r):
        try:
            results[r] = fn(SimulatedComm(world, r), *args, **kwargs)
        except BaseException as e:
            errors[r] = e
            world.fail()

    # Daemon threads: a rank stuck for good (the watchdog's case) must not keep the process alive.
    threads = [threading.Thread(target=body, args=(r,), name=f"sim-rank-{r}", daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    deadline = None
    for t in threads:
        while t.is_alive() and (deadline is None or time.monotonic() < deadline):
            t.join(0.05)
            if deadline is None and world.stall is not None:
                deadline = time.monotonic() + 1.0   # the others' errors, but not the stuck rank
    # re-raise the root cause, not the ranks that merely saw the barrier break
    real = [(r, e) for r, e in enumerate(errors) if e is not None
            and not (isinstance(e, RuntimeError) and "another rank failed" in str(e))]
    if real:
        r, e = real[0]
        if hasattr(e, "add_note") and not isinstance(e, (UsageError, SystemExit, KeyboardInterrupt)):
            e.add_note(f"(raised on simulated rank {r})")
        raise e
    if any(errors):
        raise next(e for e in errors if e is not None)
    return results
