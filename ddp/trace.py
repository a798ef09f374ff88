"""A per-rank timeline of a run, in the Chrome trace event format (Perfetto, chrome://tracing).

    ddp train --dataset digits --trace trace.json
    launch/mpirun.sh -n 2 -- train --dataset digits --trace trace.json      # rank 0 merges every rank

One process row per rank (pid = rank). Each span is a complete event ("ph": "X") with a start and a duration
in microseconds: data (the batch's rows), forward/backward of each layer, each allreduce bucket with its bytes,
wait (for a non-blocking allreduce, or for a parameter server's reply), optimizer, evaluate, checkpoint, and in
ps mode push, pull and the server's apply. Times start at a barrier every rank passes together, so the rows
line up.

Tracing off costs one attribute lookup and an empty `with` per span: `NULL.span` returns a shared no-op context
manager. On, a span appends one small dict (benchmarks/RESULTS.md measures both).
"""
from __future__ import annotations

import contextlib
import json
import os
import time

from .checkpoint import write_file

_NOTHING = contextlib.nullcontext()          # reusable: one for every span of a run without tracing


class NullTracer:
    """Tracing off."""

    def span(self, name: str, cat: str = "", **args):
        return _NOTHING


NULL = NullTracer()


class _Span:
    __slots__ = ("tracer", "event")

    def __init__(self, tracer, event):
        self.tracer, self.event = tracer, event

    def __enter__(self):
        self.event["ts"] = self.tracer.now()
        return self

    def __exit__(self, *exc):
        ev = self.event
        ev["dur"] = self.tracer.now() - ev["ts"]
        self.tracer.events.append(ev)
        return False


class Tracer:
    """Records this rank's spans; `merge` gathers every rank's to rank 0, which writes the file."""

    def __init__(self, rank: int, role: str = ""):
        self.rank, self.role = rank, role
        self.events: list[dict] = []
        self.t0 = time.perf_counter()

    def start(self, comm) -> None:
        """Line the ranks' clocks up: time 0 is when every rank has left one barrier."""
        comm.barrier()
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return (time.perf_counter() - self.t0) * 1e6

    def span(self, name: str, cat: str = "", **args):
        ev = {"name": name, "cat": cat or name, "ph": "X", "pid": self.rank, "tid": 0}
        if args:
            ev["args"] = args
        return _Span(self, ev)

    def merge(self, comm, path: str) -> None:
        """Gather every rank's events (small JSON text, not arrays) and write the trace on rank 0."""
        label = f"rank {self.rank}" + (f" ({self.role})" if self.role else "")
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": label}},
                {"name": "process_sort_index", "ph": "M", "pid": self.rank, "args": {"sort_index": self.rank}}]
        every = comm.allgather_obj(json.dumps(meta + self.events))
        if comm.rank != 0:
            return
        events = [e for text in every for e in json.loads(text)]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_file(path, lambda fh: fh.write(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}).encode()))
