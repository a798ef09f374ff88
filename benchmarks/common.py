"""Helpers shared by the benchmarks: one BLAS thread, interleaved timing, tables.

Import this module BEFORE numpy (or anything that imports numpy): it pins every
BLAS/OpenMP pool to one thread through the environment, which only works if it
is set before the libraries load. `limit_threads()` then enforces it again with
threadpoolctl and torch, in case something was imported earlier.
"""
from __future__ import annotations

import os
import shlex
import statistics
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

# Open MPI settings for a 2-core machine running as root (see shared/ENVIRONMENT.md);
# they only matter for a child mpiexec, but also document what the README's commands use.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_btl": "^ofi", "OMPI_MCA_mpi_yield_when_idle": "1"}


def limit_threads(torch=None) -> str:
    """Enforce one thread in every BLAS pool loaded so far; returns a description."""
    desc = []
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        threadpool_limits(1)
        desc = [f"{i['internal_api']}={i['num_threads']}" for i in threadpool_info()]
    except ImportError:
        desc = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"]
    if torch is not None:
        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:      # too late: inter-op work already started; harmless here
            pass
        desc.append(f"torch={torch.get_num_threads()}")
    return ", ".join(desc)


def try_import_torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def interleave(cases: dict, rounds: int, per_round: int, sync=lambda: None, barrier=lambda: None,
               warmup: int = 5, before_call=None, before_round=None) -> dict:
    """Time each case's callable per call, in alternating rounds (the case order
    rotates every round), so that a noisy neighbour hits every case alike.

    Returns {name: [seconds per call, ...]} with rounds * per_round samples each.
    `sync` waits for queued device work; `barrier` lines the ranks up before a round.
    `before_call()` runs untimed before every timed call (e.g. a barrier, to time
    a collective alone); `before_round(name)` runs untimed before each round.
    """
    names = list(cases)
    for name in names:                     # warm-up: caches, allocations, lazy init
        for _ in range(warmup):
            cases[name]()
        sync()
    times = {n: [] for n in names}
    clock = time.perf_counter
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, out = cases[name], times[name]
            if before_round is not None:
                before_round(name)
            barrier()
            for _ in range(per_round):
                if before_call is not None:
                    before_call()
                t0 = clock()
                fn()
                sync()
                out.append(clock() - t0)
    return times


def timed_on_ranks(cases: dict, args, comm) -> tuple[dict, int] | None:
    """interleave() of the cases over args.iters steps in args.rounds rounds, the ranks lined up before each
    round; (times, steps per round) on rank 0, None on the others."""
    per_round = max(1, args.iters // args.rounds)
    times = interleave(cases, args.rounds, per_round, barrier=comm.barrier)
    return None if comm.rank else (times, per_round)


def median(xs) -> float:
    return statistics.median(xs)


def quartiles(xs) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def paired_ratio(times: dict, a: str, b: str, per_round: int) -> float:
    """Median over rounds of (median of a in round r) / (median of b in round r).

    Robust to slow drift of the machine's load: a and b are compared round by round.
    """
    ta, tb = times[a], times[b]
    n = min(len(ta), len(tb)) // per_round
    ratios = [median(ta[i * per_round:(i + 1) * per_round]) / median(tb[i * per_round:(i + 1) * per_round])
              for i in range(n)]
    return median(ratios)


def table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def verdict(name: str, value: float, target: float, higher_is_better: bool, fmt="{:.3f}") -> str:
    ok = value >= target if higher_is_better else value <= target
    op = ">=" if higher_is_better else "<="
    return f"{'PASS' if ok else 'MISS'}  {name}: {fmt.format(value)} (target {op} {fmt.format(target)})"


def command_line(mpi_ranks: int | None = None) -> str:
    """The command that reproduces this run, from the repository root."""
    script = os.path.relpath(sys.argv[0])
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    cmd = f"python {script} {args}".rstrip()
    if mpi_ranks is not None:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in MPI_ENV.items())
        cmd = f"{env} mpiexec -n {mpi_ranks} --oversubscribe {cmd}"
    return cmd


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"
