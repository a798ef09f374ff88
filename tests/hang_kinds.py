"""Issue 19: a hang's cause in one line. Each kind of fault is injected on rank 1 at step 3 of a loop of
allreduces (ddp's MPIComm, --timeout 3) under launch/mpirun.sh, and the job's error line must name it.

    python tests/hang_kinds.py --trials 10        # the table in benchmarks/RESULTS.md (a few minutes)

tests/test_exit_paths.py runs one of each. A host cut off from the others is the partition trial of
tests/run_trials.py (network namespaces, root).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 3
# kind -> (what the one line must contain, the exit code)
KINDS = {
    "dead": (["ddp: error: rank 1 died: its process", "signal 9 (Killed)"], 137),
    "stopped": (["ranks [1] have not arrived (rank 1: stopped (process"], 1),
    "busy": (["ranks [1] have not arrived (rank 1: stalled (alive, busy outside MPI at step 3))"], 1),
    "collective": (["waiting in", "at step 3: a different collective", "barrier", "allreduce"], 1),  # either rank
    "size": (["MPI_ERR_TRUNCATE", "at step 3: the ranks passed buffers of different sizes"], 1),
}


def rank_main(kind):
    import numpy as np
    from mpi4py import MPI

    from ddp.comm import MPIComm
    from ddp.guard import run_main

    def loop():
        comm = MPIComm(MPI.COMM_WORLD)
        comm.set_timeout(TIMEOUT)
        x = np.ones(10)
        for step in range(1, 100000):
            comm.at_step(step)
            if step == 3 and comm.rank == 1:
                if kind == "dead":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif kind == "stopped":
                    os.kill(os.getpid(), signal.SIGSTOP)
                elif kind == "busy":
                    time.sleep(3600)
                elif kind == "collective":
                    comm.barrier()
                elif kind == "size":
                    x = np.ones(1000)
            comm.allreduce_sum(x)
            time.sleep(0.005)
        return 0
    sys.exit(run_main(loop))


def trial(kind):
    """Run one job with `kind` injected: (the line was right and alone, the exit code, seconds, stderr)."""
    from helpers import LAUNCHER, ROOT
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    t0 = time.monotonic()
    res = subprocess.run(["bash", LAUNCHER, "-n", "2", "--", "python", os.path.abspath(__file__), "--rank", kind],
                         env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("ddp: error:")]
    words, code = KINDS[kind]
    good = res.returncode == code and len(lines) >= 1 and all(w in lines[0] for w in words) and \
        all(ln.startswith("ddp: error: rank") for ln in lines) and "Traceback" not in res.stderr
    return good, res.returncode, took, res.stderr


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--rank", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank:
        rank_main(a.rank)
    sys.path.insert(0, HERE)
    for kind in KINDS:
        results = [trial(kind) for _ in range(a.trials)]
        took = sorted(r[2] for r in results)
        print(f"{kind:10s} named in the line: {sum(r[0] for r in results)}/{a.trials}; seconds min {took[0]:.1f}, "
              f"max {took[-1]:.1f} (--timeout {TIMEOUT})", flush=True)
        for r in results:
            if not r[0]:
                print(f"    exit {r[1]}: {r[3][-600:]!r}")


if __name__ == "__main__":
    main()
