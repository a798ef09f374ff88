"""The README's 4-rank quick start with no thread variable set against OMP_NUM_THREADS=1 (issue 9).

    python benchmarks/bench_threads.py                 # 5 alternating rounds of each
    python benchmarks/bench_threads.py --rounds 3 -n 2

ddp caps each rank's BLAS threads at the node's cores / its local ranks (ddp.backend.limit_threads), so
leaving the variables unset should cost nothing against setting them to 1 by hand; before that cap, the
unset run took 112-300 s here, and 3-8 s with OMP_NUM_THREADS=1. The two cases run as whole commands,
one after the other in each round, the order swapped every round (the machine is shared and noisy); the
table gives each case's median wall time and the median of the per-round ratios. Target: <= 1.3x.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
QUICK_START = ["train", "--dataset", "digits", "--hidden", "128,64", "--lr", "0.02", "--momentum", "0.9",
               "--batch-size", "32", "--epochs", "40"]


def run_once(n: int, env: dict, out: str) -> tuple[float, str]:
    cmd = ["bash", os.path.join(ROOT, "launch", "mpirun.sh"), "-n", str(n), "--", *QUICK_START, "--out", out]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"bench_threads: the run failed ({res.returncode}):\n{res.stderr[-2000:]}")
    start = next((ln for ln in res.stdout.splitlines() if "BLAS threads" in ln), "")
    return dt, start[start.find("BLAS threads"):]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=4, help="ranks (default: 4, as in the README)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    args = p.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    base["PYTHON"] = base.get("PYTHON", sys.executable)
    cases = {"no variable set": base, "OMP_NUM_THREADS=1": {**base, "OMP_NUM_THREADS": "1"}}
    times = {c: [] for c in cases}
    notes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for c in order:
                out = os.path.join(tmp, f"r{r}-{list(cases).index(c)}")     # ddp never overwrites a run
                dt, notes[c] = run_once(args.n, cases[c], out)
                times[c].append(dt)
                print(f"round {r + 1}: {c:<16} {dt:6.2f} s", flush=True)
    ratios = [a / b for a, b in zip(times["no variable set"], times["OMP_NUM_THREADS=1"])]
    print(f"\n{'case':<17} {'median s':>8}  {'runs s':<40} start line")
    for c in cases:
        print(f"{c:<17} {statistics.median(times[c]):8.2f}  {' '.join(f'{t:.2f}' for t in times[c]):<40} {notes[c]}")
    ratio = statistics.median(ratios)
    print(f"\nunset / OMP_NUM_THREADS=1: median of per-round ratios {ratio:.2f}x "
          f"({'PASS' if ratio <= 1.3 else 'MISS'}: target <= 1.3x)")
    print("reproduce: " + shlex.join(["python", "benchmarks/bench_threads.py", "-n", str(args.n),
                                      "--rounds", str(args.rounds)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
