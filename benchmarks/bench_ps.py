"""Parameter servers against allreduce: step throughput and bytes per step (issue 4).

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=^ofi \\
    OMPI_MCA_mpi_yield_when_idle=1 mpiexec -n 4 --oversubscribe python benchmarks/bench_ps.py

Model: MLP 784-512-512-10, ReLU, softmax cross-entropy, plain SGD (lr 0.01), float32, synthetic data,
batch 128 PER WORKER, 2 workers. One job of 4 ranks runs the real trainers (ddp.train.run) on
sub-communicators, in alternating rounds, while the ranks a case does not use sleep in a barrier:

    allreduce     ranks 0-1, both workers
    ps, 1 server  rank 0 serves, ranks 1-2 work               (--consistency sync unless --consistency)
    ps, 2 servers ranks 0-1 serve, ranks 2-3 work

Step time: the time between consecutive steps on the first worker (from on_step), after --warmup
steps, median over all rounds. Bytes: every ps process counts what its push/pull messages carry
(summary step_bytes_sent/received) and the table divides by the steps. The model: each worker sends
and receives M per step (M = model bytes); with n workers one server receives and sends n·M, and each
of S servers n·M/S. The allreduce's bytes are MPI's business: the ring model says 2(p-1)/p·M each way.
On 2 cores with 3 or 4 ranks the machine is oversubscribed, and the servers' waits (MPI polls, even
with mpi_yield_when_idle) take CPU from the workers: compare the cases with each other, not with other tables. Only rank 0 prints; the exit code is 0 either way.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (must come before numpy: pins BLAS to one thread)

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from ddp.comm import MPIComm  # noqa: E402
from ddp.config import Config  # noqa: E402
from ddp.train import run  # noqa: E402

SIZES = [784, 512, 512, 10]
MB = 1 << 20
WORKERS = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128, help="samples per worker per step")
    p.add_argument("--steps", type=int, default=40, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=8, help="steps of each run left out of the timing")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (each case runs once per round)")
    p.add_argument("--consistency", default="sync", choices=["sync", "async", "ssp"], help="ps consistency")
    p.add_argument("--staleness", type=int, default=2, help="ssp bound")
    return p.parse_args(argv)


def config(args, out, **kw) -> Config:
    gb = WORKERS * args.batch
    # enough rows for every step in one epoch: no evaluation or checkpoint inside the timed steps
    n_samples = int(gb * (args.steps + 1) / 0.9) + 1
    return Config(dataset="synthetic_classification", n_samples=n_samples, n_features=SIZES[0],
                  n_classes=SIZES[-1], hidden=",".join(map(str, SIZES[1:-1])), dtype="float32", lr=0.01,
                  batch_size=gb, epochs=1, max_steps=args.steps, val_fraction=0.05, test_fraction=0.05,
                  progress=False, check_every=0, out=out, **kw)


def quiet_barrier(comm, poll=0.002):
    """A barrier that sleeps while it waits: ranks a case does not use leave the cores to those it does
    (a plain Barrier spins, even with mpi_yield_when_idle)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(poll)


def main(argv=None):
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    threads = common.limit_threads()
    if size < 4:
        if rank == 0:
            print(f"bench_ps: needs 4 ranks (2 workers plus up to 2 servers), got {size}; "
                  "run under mpiexec -n 4 --oversubscribe")
        return 0
    out = world.bcast(tempfile.mkdtemp(prefix="bench_ps-") if rank == 0 else None)
    ps_kw = dict(mode="ps", consistency=args.consistency, staleness=args.staleness)
    cases = {"allreduce": (2, {}), "ps, 1 server": (3, dict(servers=1, **ps_kw)),
             "ps, 2 servers": (4, dict(servers=2, **ps_kw))}
    times = {name: [] for name in cases}
    traffic = {}
    names = list(cases)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            ranks, kw = cases[name]
            sub = world.Split(0 if rank < ranks else MPI.UNDEFINED, rank)
            quiet_barrier(world)
            if sub != MPI.COMM_NULL:
                stamps = []
                summary = run(config(args, os.path.join(out, f"{name}-{r}".replace(" ", "_").replace(",", "")), **kw),
                              MPIComm(sub), on_step=lambda step, model, c: stamps.append(time.perf_counter()))
                first_worker = kw.get("servers", 0)
                if rank == first_worker:       # its step times go to rank 0 (a short list: pickled)
                    steps = np.diff(stamps)[args.warmup:].tolist()
                    if rank != 0:
                        world.send(steps, dest=0, tag=7)
                    else:
                        times[name] += steps
                if rank == 0:
                    if first_worker != 0:
                        times[name] += world.recv(source=first_worker, tag=7)
                    traffic[name] = summary
                sub.Free()
            quiet_barrier(world)
    if rank != 0:
        return 0

    n_params = sum(o * i + o for i, o in zip(SIZES[:-1], SIZES[1:]))
    M = traffic["ps, 1 server"]["model_bytes"]          # = 4 * n_params
    gb = WORKERS * args.batch
    print(f"bench_ps: MLP {'-'.join(map(str, SIZES))}, float32, {n_params:,} parameters (M = {M / MB:.2f} MB), "
          f"batch {args.batch} per worker, {WORKERS} workers, ps consistency {args.consistency}")
    print(f"threads: {threads}; MPI: {MPI.Get_library_version().split(',')[0].strip()}; {size} ranks on "
          f"{os.cpu_count()} cores (oversubscribed if more ranks than cores)")
    print(f"{args.rounds} alternating rounds x {args.steps - args.warmup - 1} timed steps per case "
          f"(first {args.warmup} steps of each run left out); median step time on the first worker")
    print()
    base = common.median(times["allreduce"])
    rows = []
    for name in names:
        med = common.median(times[name])
        q1, q3 = common.quartiles(times[name])
        rows.append([name, cases[name][0], common.ms(med), f"{common.ms(q1)}-{common.ms(q3)}", f"{gb / med:,.0f}",
                     f"{base / med:.2f}"])
    print(common.table(["case", "ranks", "median ms/step", "IQR ms", "samples/s", "vs allreduce"], rows))
    print()
    rows = [["allreduce", "each of 2 ranks", "-", "-", f"{M / MB:.3f} each way (ring: 2(p-1)/p·M)"]]
    for name in names[1:]:
        s = traffic[name]
        S, steps = s["servers"], s["steps"]
        for r in range(cases[name][0]):
            role = f"server {r}" if r < S else f"worker {r - S}"
            sent, recv = s["step_bytes_sent"][r] / steps, s["step_bytes_received"][r] / steps
            model = WORKERS * M / S if r < S else M
            rows.append([name, role, f"{sent / MB:.3f}", f"{recv / MB:.3f}",
                         f"{model / MB:.3f} each way ({'n·M/S' if r < S else 'M'})"])
    print("bytes per step per process, measured (push/pull payloads plus 24-byte replies' meta) vs the model")
    print(common.table(["case", "process", "sent MB/step", "received MB/step", "model"], rows))
    print()
    print("busiest link per step: allreduce (ring, p = 2) M each way; ps with 1 server n·M = "
          f"{WORKERS * M / MB:.2f} MB; with 2 servers n·M/2 = {WORKERS * M / 2 / MB:.2f} MB per server")
    print()
    print("reproduce:", common.command_line(size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
