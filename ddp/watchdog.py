"""The collective watchdog (--timeout): a job in which one wait in MPI lasts too long ends, with one line.

    WATCHDOG.start(timeout, MPI.COMM_WORLD)  # MPIComm.set_timeout does this
    with WATCHDOG.watch("allreduce"):       # around every blocking MPI call
        comm.Allreduce(...)

The calling thread only records what it waits in and since when; a daemon thread looks every half second.
This costs about 0.2 us per collective (benchmarks/RESULTS.md). Point-to-point tags on MPI_COMM_WORLD: the
watchdog's side channel and the exit vote of ddp/guard.py. Collectives never match point-to-point messages,
and ps mode uses tags 41-44.
"""
from __future__ import annotations

import atexit
import sys
import threading
import time

import numpy as np

TAG_WATCHDOG, TAG_EXIT = 32101, 32102


class Watchdog:
    """Ends the job when one wait in MPI lasts longer than `timeout` seconds, as NCCL's watchdog does.

    The calling thread only records (op, time) around each blocking call: `with WATCHDOG.watch(op):`.
    A daemon thread looks at that record every `interval` s; it costs the training loop nothing, and
    the blocking Allreduce stays (polling an Iallreduce measured 1.2-1.65x slower here). On expiry it
    asks every rank, over point-to-point messages on MPI_COMM_WORLD, whether it is waiting too: a
    rank that is waiting answers and reports its own stall; a stopped or hung rank cannot answer,
    and is named as not arrived. Each waiting rank prints one line, then MPI_Abort ends the job.
    """

    WAITING, BUSY = 1, 0

    def __init__(self):
        self.waiting = None          # (op, t_enter, detail) while the main thread is in a blocking call
        self.step = 0
        self.timeout = None
        self._pending = ("", None)
        self._thread = None
        self._fired = False
        self._answered = False
        self._peers = {}             # world rank -> (WAITING or BUSY, step)

    # ---- the calling thread
    def watch(self, op, detail=None):
        self._pending = (op, detail)
        return self

    def __enter__(self):
        op, detail = self._pending
        self.waiting = (op, time.monotonic(), detail)

    def __exit__(self, *exc):
        self.waiting = None

    def start(self, timeout: float, world) -> None:
        """Arm with `timeout` seconds; `world` is MPI_COMM_WORLD (the side channel)."""
        self.timeout = float(timeout)
        self.interval = min(0.5, self.timeout / 4)
        # Time for every live rank's watchdog to hear the first one and answer.
        self.grace = 2 * self.interval + 1.0
        if self._thread is None:
            from mpi4py import MPI
            self.MPI, self.world = MPI, world
            self.rank, self.size = world.Get_rank(), world.Get_size()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="ddp-watchdog", daemon=True)
            self._thread.start()
            # Registered after mpi4py's MPI_Finalize, so it runs before it: no Iprobe after finalize.
            atexit.register(self.stop)

    def stop(self) -> None:
        """Disarm (benchmarks compare armed and disarmed in one job)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    # ---- the watchdog thread
    def _run(self):
        while True:
            t = time.monotonic()
            if self._stop.wait(self.interval):
                return
            if time.monotonic() - t > self.interval + 2.0:
                # This process itself was frozen (SIGSTOP, a paused VM): it is the rank the others
                # wait for, not one that waited. The job is being ended around it; stay quiet.
                continue
            if self.MPI.Is_finalized():
                return
            heard = self._poll()
            w = self.waiting
            if w is not None and (heard or time.monotonic() - w[1] > self.timeout):
                self._fire(w)
            elif heard and not self._answered:
                self._answered = True       # busy outside MPI: say so, and keep working
                self._tell(self.BUSY)

    def _poll(self) -> bool:
        MPI, st, heard = self.MPI, self.MPI.Status(), False
        while self.world.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_WATCHDOG, status=st):
            msg = np.empty(2, np.int64)
            self.world.Recv(msg, source=st.Get_source(), tag=TAG_WATCHDOG)
            self._peers[st.Get_source()] = (int(msg[0]), int(msg[1]))
            heard = True
        return heard

    def _tell(self, state):
        self._sent = [np.array([state, self.step], np.int64)]
        self._reqs = [self.world.Isend(self._sent[0], dest=r, tag=TAG_WATCHDOG)
                      for r in range(self.size) if r != self.rank]

    def _fire(self, w):
        if self._fired:
            return
        self._fired = True
        op, _, detail = w
        self._tell(self.WAITING)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and len(self._peers) < self.size - 1:
            time.sleep(0.05)
            self._poll()
        missing = [r for r in range(self.size) if r != self.rank and self._peers.get(r, (self.BUSY,))[0]
                   != self.WAITING]
        line = f"ddp: error: rank {self.rank}: no progress for {self.timeout:g} s at step {self.step}, " \
               f"waiting in {op}"
        if detail is not None:
            line += f" ({detail()})"
        if missing:
            line += f"; ranks {missing} have not arrived"
        print(line, file=sys.stderr, flush=True)
        time.sleep(self.interval + 0.2)     # the other waiting ranks print their line too
        self.world.Abort(1)


WATCHDOG = Watchdog()       # one per process: every communicator of the process reports to it
