"""A run folder's lock: ddp.lock, created atomically, holding the PID and host of the run that writes there.

    lock(out)      # or UsageError naming the holder; a lock whose process has ended is taken over with a note
    unlock(out)    # at the end of the run (Reporter.summary), and at exit
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import time

from .errors import UsageError

LOCK = "ddp.lock"


def lock(out: str) -> None:
    """Hold `out` for this process's life. A lock whose process is gone (on this host) is taken over with a
    note; one held by this process (ddp.fit called again) is kept."""
    from .report import restart_count              # report.py releases the lock: imported here, not above
    path, me = os.path.join(out, LOCK), _me()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
            break
        except FileExistsError:
            holder = _read(path)
            pid, _, host = holder.partition(" ")
            if holder == me:
                return
            # A relaunch (--max-restarts) can start while the failed job's rank 0 is still ending.
            if host != socket.gethostname() or not pid.isdigit() or _alive(pid, 10 if restart_count() else 0):
                raise UsageError(f"{out} is in use by another run (pid {pid or '?'} on {host or '?'}, lock file "
                                 f"{path}); wait for it to end, or choose another --out") from None
            print(f"ddp: note: taking over {path} from pid {pid}, which has ended", file=sys.stderr, flush=True)
            os.remove(path)
    else:
        raise UsageError(f"{out} is in use by another run (lock file {path} keeps changing)")
    with os.fdopen(fd, "w") as fh:
        fh.write(me)
    atexit.register(unlock, out)


def unlock(out: str) -> None:
    """Release `out` if this process holds it (at the end of a run, and at exit)."""
    path = os.path.join(out, LOCK)
    with contextlib.suppress(OSError):             # a folder gone read-only keeps its lock: it is stale
        if _read(path) == _me():
            os.remove(path)


def _me() -> str:
    return f"{os.getpid()} {socket.gethostname()}"


def _alive(pid: str, wait: float) -> bool:
    """Whether process `pid` of this host runs (a zombie has ended), after waiting up to `wait` s for it to end."""
    end = time.monotonic() + wait
    while True:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        except OSError:
            return False
        if time.monotonic() >= end:
            return True
        time.sleep(0.1)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read(200).strip()
    except OSError:
        return ""
