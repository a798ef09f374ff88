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
import os
import socket
import sys
import threading
import time

import numpy as np

TAG_WATCHDOG, TAG_EXIT = 32101, 32102
OPS = ("allreduce", "bcast", "barrier", "allgather", "gatherv", "waitall", "waitany", "reduce_scatter")


class Watchdog:
    """Ends the job when one wait in MPI lasts longer than `timeout` seconds, as NCCL's watchdog does.

    The calling thread only records (op, time) around each blocking call: `with WATCHDOG.watch(op):`.
    A daemon thread looks at that record every `interval` s; it costs the training loop nothing, and
    the blocking Allreduce stays (polling an Iallreduce measured 1.2-1.65x slower here). On expiry it
    asks every rank, over point-to-point messages on MPI_COMM_WORLD, what it is doing: a rank waiting
    in the same call answers and reports its own stall; one waiting in another call, at another step
    or with another buffer size is named with what it waits in; one busy outside MPI is stalled; one
    that cannot answer is named as not arrived, with why where this rank can tell (its process gone or
    stopped, on this host; its host unreachable, on another). Each waiting rank prints one line, then
    MPI_Abort ends the job.
    """

    WAITING, BUSY = 1, 0

    def __init__(self):
        self.waiting = None          # (op, t_enter, detail, count) while the main thread is in a blocking call
        self.step = 0
        self.timeout = None
        self._pending = ("", None, -1)
        self._thread = None
        self._fired = False
        self._answered = False
        self._peers = {}             # world rank -> (WAITING or BUSY, step, op code, count)
        self.failed_in = None

    # ---- the calling thread
    def watch(self, op, detail=None, count=-1):
        """op: the call's name; detail: a callable giving more about it; count: its buffer's elements."""
        self._pending = (op, detail, count)
        return self

    def __enter__(self):
        op, detail, count = self._pending
        self.waiting = (op, time.monotonic(), detail, count)

    def __exit__(self, kind, *exc):
        if kind is not None:
            self.failed_in = self.waiting      # the call an MPI error came from, for guard's line
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
            # Every rank's process and host, for the line that names a rank that cannot answer.
            me = np.zeros(72, np.uint8)
            me[:8] = np.frombuffer(np.int64(os.getpid()).tobytes(), np.uint8)
            name = MPI.Get_processor_name().encode()[:64]
            me[8:8 + len(name)] = np.frombuffer(name, np.uint8)
            table = np.empty((self.size, 72), np.uint8)
            world.Allgather(me, table)
            self.pids = table[:, :8].copy().view(np.int64).ravel().tolist()
            self.hosts = [bytes(row[8:]).rstrip(b"\0").decode(errors="replace") for row in table]
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
            msg = np.empty(4, np.int64)
            self.world.Recv(msg, source=st.Get_source(), tag=TAG_WATCHDOG)
            self._peers[st.Get_source()] = tuple(int(v) for v in msg)
            heard = True
        return heard

    def _tell(self, state):
        w = self.waiting
        op, count = (OPS.index(w[0]) if w and w[0] in OPS else -1), (w[3] if w else -1)
        self._sent = [np.array([state, self.step, op, count], np.int64)]
        self._reqs = [self.world.Isend(self._sent[0], dest=r, tag=TAG_WATCHDOG)
                      for r in range(self.size) if r != self.rank]

    def _fire(self, w):
        if self._fired:
            return
        self._fired = True
        op, _, detail, count = w
        self._tell(self.WAITING)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and len(self._peers) < self.size - 1:
            time.sleep(0.05)
            self._poll()
        line = f"ddp: error: rank {self.rank}: no progress for {self.timeout:g} s at step {self.step}, " \
               f"waiting in {op}" + (f" of {count} elements" if count >= 0 else "")
        if detail is not None:
            line += f" ({detail()})"
        print(line + self.diagnosis(OPS.index(op) if op in OPS else -1, count), file=sys.stderr, flush=True)
        time.sleep(self.interval + 0.2)     # the other waiting ranks print their line too
        self.world.Abort(1)

    def diagnosis(self, op: int, count: int) -> str:
        """What the other ranks are doing, from their answers: '' when every one waits in this very call."""
        missing, why, other = [], [], []
        for r in range(self.size):
            if r == self.rank:
                continue
            state, step, their_op, their_count = self._peers.get(r, (None, 0, -1, -1))
            name = OPS[their_op] if 0 <= their_op < len(OPS) else "another call"
            if state is None:
                missing.append(r)
                why.append(self._absent(r))
            elif state == self.BUSY:
                missing.append(r)
                why.append(f"rank {r}: stalled (alive, busy outside MPI at step {step})")
            elif their_op != op or step != self.step:
                what = "a different collective" if their_op != op else "a different step"
                other.append(f"rank {r} waits in {name} at step {step}: {what}")
            elif their_count != count and min(count, their_count) >= 0:
                other.append(f"rank {r} waits in {name} of {their_count} elements: a different buffer size")
        text = f"; ranks {missing} have not arrived ({'; '.join(why)})" if missing else ""
        return text + "".join("; " + o for o in other)

    def _absent(self, r: int) -> str:
        """Why rank r cannot answer, where this rank can tell: its process (same host) or its host's network."""
        pid, host = self.pids[r], self.hosts[r]
        if host == self.hosts[self.rank]:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    state = fh.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return f"rank {r}: dead (its process {pid} is gone)"
            if state in "TtZX":
                return f"rank {r}: {'stopped' if state in 'Tt' else 'dead'} (process {pid}, state {state})"
            return f"rank {r}: stalled (process {pid} is alive and does not answer)"
        reach = reachable(host)
        if reach is False:
            return f"rank {r}: host {host} unreachable"
        return f"rank {r} on {host}: stalled or dead ({'its host answers' if reach else 'host unknown here'})"


def reachable(host: str, timeout: float = 1.0):
    """Whether `host` answers on the network: a TCP connection refused or accepted says it is up (port 9,
    discard, is normally closed); a timeout or no route says it is not. None when the name does not resolve."""
    try:
        socket.create_connection((host, 9), timeout=timeout).close()
    except socket.gaierror:
        return None
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return True


WATCHDOG = Watchdog()       # one per process: every communicator of the process reports to it
