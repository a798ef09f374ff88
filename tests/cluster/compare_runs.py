"""Compare two ddp runs: every array of checkpoint.npz must agree to a relative tolerance.

    python tests/cluster/compare_runs.py RUN_A RUN_B [--rtol 1e-12] [--world-size N]

Relative difference of an array: max|a - b| / max(max|b|, tiny). Non-numeric arrays (the
config, which holds --out) are not compared. Prints one line per array and
exits 1 if any array differs by more than --rtol, has another shape, or exists in one run only.
--world-size N also checks that RUN_A's summary.json says it ran on N ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def load(run: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(run, "checkpoint.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol: float) -> list[str]:
    """Return the problems found; print one line per array."""
    problems = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            problems.append(f"{name}: only in run {'A' if name in a else 'B'}")
            continue
        x, y = a[name], b[name]
        if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
            print(f"{name}: dtype {x.dtype}, not numeric: not compared")  # e.g. the config, which names --out
            continue
        if x.shape != y.shape:
            problems.append(f"{name}: shape {x.shape} != {y.shape}")
            continue
        scale = max(float(np.max(np.abs(y.astype(np.float64)), initial=0.0)), np.finfo(np.float64).tiny)
        rel = float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0)) / scale
        print(f"{name}: shape {x.shape} dtype {x.dtype} relative difference {rel:.3e}")
        if not rel <= rtol:
            problems.append(f"{name}: relative difference {rel:.3e} > {rtol:g}")
    if not a:
        problems.append("run A's checkpoint holds no arrays")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--rtol", type=float, default=1e-12)
    p.add_argument("--world-size", type=int, default=None)
    args = p.parse_args(argv)
    problems = compare(load(args.run_a), load(args.run_b), args.rtol)
    if args.world_size is not None:
        with open(os.path.join(args.run_a, "summary.json")) as f:
            got = json.load(f).get("world_size")
        if got != args.world_size:
            problems.append(f"{args.run_a} ran on {got} ranks, expected {args.world_size}")
    for line in problems:
        print("MISMATCH:", line)
    print("runs agree" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
