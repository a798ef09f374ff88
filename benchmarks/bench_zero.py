"""--shard-optimizer (ZeRO stage 1): what it costs in time and what it saves in memory (issue 16).

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=^ofi \\
    OMPI_MCA_mpi_yield_when_idle=1 mpiexec -n 2 --oversubscribe python benchmarks/bench_zero.py time
    python benchmarks/bench_zero.py memory          # starts launch/mpirun.sh runs itself

time: Adam steps of the benchmarks' MLP 784-512-512-10 (float32, batch 128 per rank, one BLAS thread per rank),
    in alternating rounds: DataParallel's blocking allreduce + Adam over the whole arena, against a reduce-scatter,
    Adam over this rank's shard (zero.ShardedOptimizer) and an allgather. Target: sharded <= 1.05x.
wire: the bytes the loopback interface carries (/proc/net/dev) for 10 gradient reductions of 20.9M float32
    elements: MPIComm.allreduce_sum against reduce_scatter_sum + allgather. Run it with Open MPI on TCP over lo,
    so that every byte crosses an interface: OMPI_MCA_btl=tcp,self OMPI_MCA_btl_tcp_if_include=lo mpiexec -n N
    python benchmarks/bench_zero.py wire. Target: sharded within 1% of allreduce.
memory: `ddp train` with Adam on a 20.9M-parameter MLP (1000-4096-4096-10, float32, 3 steps on 256 synthetic
    rows) at 1, 2 and 4 ranks, sharded and not; each rank's peak RSS from summary.json. The state Adam keeps
    (two moments and one scratch array: 12 bytes per parameter) falls to 12/N bytes per parameter when sharded:
    the measured saving is set beside that arithmetic.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (must come before numpy: pins BLAS to one thread)

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = ["--dataset", "synthetic_classification", "--n-samples", "320", "--n-features", "1000", "--hidden",
       "4096,4096", "--n-classes", "10", "--batch-size", "64", "--max-steps", "3", "--optimizer", "adam",
       "--momentum", "0", "--val-fraction", "0.1", "--test-fraction", "0.1", "--quiet", "--no-progress"]
STATE_BYTES = 12          # Adam: exp_avg, exp_avg_sq and the update's scratch array, float32


def time_steps(args):
    from ddp.comm import MPIComm, SerialComm
    from ddp.model import MLP
    from ddp.optim import make_optimizer
    from ddp.parallel import DataParallel
    from ddp.zero import ShardedOptimizer

    threads = common.limit_threads()
    comm = MPIComm() if "OMPI_COMM_WORLD_SIZE" in os.environ else SerialComm()
    rng = np.random.default_rng(comm.rank)
    X = rng.standard_normal((args.batch, 784)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    cases = {}
    for name in ("allreduce", "sharded"):
        model = MLP([784, 512, 512, 10], dtype="float32", seed=1)

        def make(p, g):
            return make_optimizer("adam", p, g, lr=1e-3)
        opt = ShardedOptimizer(make, model.params, model.grads, comm) if name == "sharded" else \
            make(model.params, model.grads)
        dp = DataParallel(model, comm, overlap=False, scatter=opt.counts if name == "sharded" else None)

        def step(dp=dp, opt=opt):
            dp.forward_backward(X, y, denom=args.batch * comm.size)
            opt.step()
        cases[name] = step
    got = common.timed_on_ranks(cases, args, comm)
    if got is None:
        return
    times, per_round = got
    ratio = common.paired_ratio(times, "sharded", "allreduce", per_round)
    print(f"MLP 784-512-512-10, Adam, float32, batch {args.batch} per rank x {comm.size} ranks, BLAS {threads}")
    print(common.table(["case", "step ms (median)"], [[k, common.ms(common.median(v))] for k, v in times.items()]))
    print(common.verdict("sharded / allreduce", ratio, 1.05, higher_is_better=False))
    print("reproduce:", common.command_line(comm.size if comm.size > 1 else None))


def lo_bytes() -> int:
    for line in open("/proc/net/dev"):
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])           # bytes received on lo = bytes sent on it
    raise SystemExit("no loopback interface in /proc/net/dev")


def wire(args):
    from ddp.comm import MPIComm
    comm = MPIComm()
    p = 1000 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 10 + 10
    buf = np.ones(p, np.float32)
    counts = [b - a for a, b in ((p * r // comm.size, p * (r + 1) // comm.size) for r in range(comm.size))]
    cases = {"allreduce": lambda: comm.allreduce_sum(buf),
             "reduce-scatter + allgather": lambda: (comm.reduce_scatter_sum(buf, counts), comm.allgather(buf, counts))}
    got = {}
    for name, fn in cases.items():
        fn()
        comm.barrier()
        before = lo_bytes()
        for _ in range(10):
            fn()
        comm.barrier()
        got[name] = (lo_bytes() - before) / 10
    if comm.rank == 0:
        ideal = 2 * (comm.size - 1) / comm.size * p * 4 * comm.size      # a ring allreduce, all ranks together
        print(f"{comm.size} ranks, {p / 1e6:.1f}M float32 elements, bytes on lo per reduction (all ranks)")
        print(common.table(["case", "MB", "vs ring arithmetic"],
                           [[k, f"{v / 1e6:.1f}", f"{v / ideal:.3f}"] for k, v in got.items()]))
        print(common.verdict("sharded / allreduce bytes", got["reduce-scatter + allgather"] / got["allreduce"], 1.01,
                             higher_is_better=False))
        cmd = common.command_line(comm.size).replace("OMPI_MCA_btl='^ofi'", "OMPI_MCA_btl=tcp,self")
        print("reproduce: OMPI_MCA_btl_tcp_if_include=lo", cmd)


def memory(args):
    rows = []
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2, 4):
            peaks = {}
            for sharded in (False, True):
                out = os.path.join(tmp, f"n{n}-{sharded}")
                cmd = ["bash", os.path.join(ROOT, "launch", "mpirun.sh"), "-n", str(n), "--", "train", *BIG,
                       "--out", out, *(["--shard-optimizer"] if sharded else [])]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                if res.returncode:
                    sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
                summary = json.load(open(os.path.join(out, "summary.json")))
                peaks[sharded] = summary["peak_rss_mb"]
                params = summary.get("params") or 1000 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 10 + 10
            saved = np.mean(peaks[False]) - np.mean(peaks[True])
            expected = STATE_BYTES * params * (1 - 1 / n) / 2 ** 20
            rows.append([n, " ".join(f"{v:.0f}" for v in peaks[False]), " ".join(f"{v:.0f}" for v in peaks[True]),
                         f"{saved:.0f}", f"{expected:.0f}", f"{STATE_BYTES * params / n / 2 ** 20:.0f}"])
    print(f"ddp train {' '.join(BIG)}: {params / 1e6:.1f}M parameters, peak RSS per rank in MB")
    print(common.table(["ranks", "unsharded", "sharded", "saved (mean)", "saved by arithmetic",
                        "Adam state per rank, sharded"], rows))
    print("reproduce:", common.command_line())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["time", "wire", "memory"])
    p.add_argument("--batch", type=int, default=128, help="samples per rank per step (time)")
    p.add_argument("--iters", type=int, default=200, help="timed steps per case (time)")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)
    {"time": time_steps, "wire": wire, "memory": memory}[args.what](args)


if __name__ == "__main__":
    main()
