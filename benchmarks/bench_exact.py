"""--deterministic's cost: the training step with and without it, side by side (issue 16).

    python benchmarks/bench_exact.py                       # one process
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=^ofi \\
    OMPI_MCA_mpi_yield_when_idle=1 mpiexec -n 2 --oversubscribe python benchmarks/bench_exact.py

Model: MLP 784-512-512-10 (the benchmarks' model) or --hidden, float32, plain SGD, random data, --batch samples
PER RANK, one BLAS thread per process. Each round times, in alternating order:

    plain          DataParallel over this job's ranks: one forward/backward, one blocking float32 allreduce
    deterministic  the same global batch cut into --chunks fixed chunks (data.chunk_shard), each rank's chunks
                   one by one, then exact.ExactSum: the exponent histogram and the int64 allreduce

Target: deterministic <= 1.3x plain. Only rank 0 prints; the exit code is 0 either way.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (must come before numpy: pins BLAS to one thread)

import numpy as np  # noqa: E402

from ddp.comm import SerialComm  # noqa: E402
from ddp.data import chunk_shard, shard  # noqa: E402
from ddp.model import MLP  # noqa: E402
from ddp.optim import SGD  # noqa: E402
from ddp.parallel import DataParallel  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128, help="samples per rank per step")
    p.add_argument("--hidden", default="512,512", help="hidden layer sizes")
    p.add_argument("--chunks", type=int, default=8, help="--deterministic's chunks per global batch")
    p.add_argument("--iters", type=int, default=200, help="timed steps per case (split into rounds)")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)
    threads = common.limit_threads()
    comm = SerialComm()
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
        from ddp.comm import MPIComm
        comm = MPIComm()
    sizes = [784, *map(int, args.hidden.split(",")), 10]
    n = args.batch * comm.size
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 784)).astype(np.float32)
    y = rng.integers(0, 10, n)
    batch = np.arange(n)
    cases = {}
    for name in ("plain", "deterministic"):
        model = MLP(sizes, dtype="float32", seed=1)
        dp = DataParallel(model, comm, overlap=False, chunks=args.chunks if name == "deterministic" else 0)
        opt = SGD(model.params, model.grads, lr=0.01)
        parts = (chunk_shard(batch, comm.rank, comm.size, args.chunks) if name == "deterministic"
                 else [shard(batch, comm.rank, comm.size)])

        def step(dp=dp, opt=opt, parts=parts):
            for j, rows in enumerate(parts):
                dp.forward_backward(X[rows], y[rows], denom=n, sync=j == len(parts) - 1)
            opt.step()
        cases[name] = step
    got = common.timed_on_ranks(cases, args, comm)
    if got is None:
        return
    times, per_round = got
    ratio = common.paired_ratio(times, "deterministic", "plain", per_round)
    print(f"MLP {'-'.join(map(str, sizes))}, float32, batch {args.batch} per rank x {comm.size} ranks, "
          f"{args.chunks} chunks, BLAS {threads}")
    print(common.table(["case", "step ms (median)", "vs plain"],
                       [[k, common.ms(common.median(v)), f"{common.paired_ratio(times, k, 'plain', per_round):.3f}"]
                        for k, v in times.items()]))
    print(common.verdict("deterministic / plain", ratio, 1.3, higher_is_better=False))
    print("reproduce:", common.command_line(comm.size if comm.size > 1 else None))


if __name__ == "__main__":
    main()
