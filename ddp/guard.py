"""Every exit path ends the whole job, with one line and the right exit code.

    code = run_main(fn, *args)      # the CLI: prints the error once, returns the exit code
    with one_job():                 # the Python API (ddp.fit): re-raises, or ends the job
        ...

Under MPI a rank that leaves on its own strands the others: they wait in a
collective, and it waits in MPI_Finalize. So when an exception leaves a rank,
the ranks vote: each tells every other rank its exit code and listens for
theirs for AGREE_S seconds. If every rank raised with the same code (a
UsageError from train.agree, a TrainingError, a parse error, Ctrl-C to the
whole job), they exit together and normally: rank 0 prints the line, no abort
banner. Otherwise this rank prints `ddp: error: rank R: ...` (with a traceback
only for a bug) and MPI_Abort(code) ends every rank.

Exit codes: 0 ok, 1 failure, 2 usage, 130 SIGINT, 143 SIGTERM (SystemExit(143)).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
import warnings

from .errors import TrainingError, UsageError
from .launcher import launched

AGREE_S = 2.0       # how long a failing rank waits to hear whether every rank failed alike
EXIT_FAILURE, EXIT_USAGE, EXIT_SIGINT = 1, 2, 130


def exit_code(e: BaseException) -> int:
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAILURE)
    if isinstance(e, KeyboardInterrupt):
        return EXIT_SIGINT
    return EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILURE


def is_bug(e: BaseException) -> bool:
    return not isinstance(e, (UsageError, TrainingError, KeyboardInterrupt, SystemExit))


def message(e: BaseException) -> str | None:
    """The line to print for e ('' for a silent SystemExit), with the traceback after it for a bug."""
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, str) else ""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    if type(e).__module__ == "mpi4py.MPI" and "MPI_ERR_TRUNCATE" in str(e):
        from .watchdog import WATCHDOG
        w = WATCHDOG.failed_in
        where = f"{w[0]}{f' of {w[3]} elements' if w[3] >= 0 else ''}" if w else "a collective"
        return (f"{e} in {where} at step {WATCHDOG.step}: the ranks passed buffers of different sizes "
                f"(--debug names the rank and the call)")
    if is_bug(e):
        return f"unexpected {type(e).__name__}: {e}\n{''.join(traceback.format_exception(e)).rstrip()}"
    return str(e)


def _world():
    """MPI_COMM_WORLD when this process is one of several MPI ranks, else None. Initialises MPI
    if the error came before it was (a bad flag): the vote needs it, and the others wait in it."""
    if "mpi4py.MPI" not in sys.modules and not launched():
        return None
    from mpi4py import MPI
    if MPI.Is_finalized():
        return None
    world = MPI.COMM_WORLD
    return world if world.Get_size() > 1 else None


def _vote(world, code: int) -> bool:
    """True if every rank reports the same exit code within AGREE_S seconds."""
    import numpy as np
    from mpi4py import MPI

    from .watchdog import TAG_EXIT
    me, size = world.Get_rank(), world.Get_size()
    mine = np.array([code], np.int64)
    theirs = {r: np.empty(1, np.int64) for r in range(size) if r != me}
    sends = [world.Isend(mine, dest=r, tag=TAG_EXIT) for r in theirs]
    recvs = [world.Irecv(buf, source=r, tag=TAG_EXIT) for r, buf in theirs.items()]
    deadline = time.monotonic() + AGREE_S
    while not MPI.Request.Testall(recvs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    MPI.Request.Waitall(sends)
    return all(int(b[0]) == code for b in theirs.values())


def settle(e: BaseException) -> int | None:
    """After e left this rank: None outside a multi-rank MPI job; this rank's number if every rank
    left with the same exit code; otherwise print this rank's line and end the job (no return)."""
    world = _world()
    if world is None:
        return None
    rank, code = world.Get_rank(), exit_code(e)
    if _vote(world, code):
        return rank
    print(f"ddp: error: rank {rank}: {message(e) or f'exited with code {code}'}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    world.Abort(code)
    os._exit(code)      # pragma: no cover (MPI_Abort does not return)


@contextlib.contextmanager
def one_job():
    """For the Python API: an exception that every rank raises propagates on every rank;
    one that only some ranks raise ends the whole job (see the module docstring)."""
    try:
        yield
    except BaseException as e:
        settle(e)
        raise


def run_main(fn, *args) -> int:
    """For the CLI: fn(*args) -> exit code, with every error printed as one line and turned
    into its exit code, on every rank of the job together."""
    # Overflow warnings would precede, and bury, the one line that says what went wrong.
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message=r"(overflow|invalid value|divide by zero|underflow) encountered")
    try:
        return fn(*args)
    except BaseException as e:
        rank = settle(e)
        text = message(e)
        # quiet: every task of a launch saw the same problem, and the first one says it (comm.world_comm)
        if text and not rank and not getattr(e, "quiet", False):
            print(f"ddp: error: {text}", file=sys.stderr, flush=True)
        return exit_code(e)
