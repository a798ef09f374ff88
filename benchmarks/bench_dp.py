"""Data-parallel step: ddp over MPI against 1 rank, a raw Allreduce and torch DDP (issue 3).

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=^ofi \\
    OMPI_MCA_mpi_yield_when_idle=1 mpiexec -n 2 --oversubscribe python benchmarks/bench_dp.py

Model: MLP 784-512-512-10, ReLU, softmax cross-entropy, plain SGD (lr 0.01),
float32, random data, batch 128 PER RANK, one BLAS thread per process.
Everything below runs in one mpiexec job, in alternating rounds, so the
ratios compare numbers taken under the same load:

(a) step throughput: DataParallel(model, MPIComm()) + optimizer.step(), with the
    CPU default (--overlap auto = off: one blocking allreduce after backward),
    and with --overlap on for a sweep of bucket sizes;
(b) gradient averaging alone (a barrier before each call, so the collective is
    timed by itself): comm.allreduce_sum(model.grads) and the bucketed path
    against a raw MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf) of the same bytes;
(c) the 1-rank step (DataParallel over SerialComm), run on every rank at once,
    so each rank has one core as in the 2-rank run: scaling efficiency =
    throughput_N / (N * throughput_1) = t_1 / t_N;
(d) torch DistributedDataParallel over gloo on the same model and batch, set up
    inside this job (rank/world from MPI, the port broadcast by rank 0);
(e) the collective watchdog (issue 9): the default step with the watchdog armed
    (--timeout 300: its thread polls every 0.5 s) against the same step disarmed,
    in the same alternating rounds; and its bookkeeping per collective (timeit).
Targets: ddp >= 1.6x torch DDP's throughput; sync <= 1.05x raw Allreduce;
scaling efficiency >= 0.9; the armed watchdog costs <= 1% of the step. Only rank 0
prints; the exit code is 0 either way.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (must come before numpy: pins BLAS to one thread)

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from ddp.comm import MPIComm, SerialComm  # noqa: E402
from ddp.watchdog import WATCHDOG  # noqa: E402
from ddp.model import MLP  # noqa: E402
from ddp.optim import SGD  # noqa: E402
from ddp.parallel import DataParallel  # noqa: E402

SIZES = [784, 512, 512, 10]
LR = 0.01
MB = 1 << 20
WHITESPACE_NUL = " \t\x00"   # Open MPI ends its version string with a NUL


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128, help="samples per rank per step")
    p.add_argument("--iters", type=int, default=300, help="timed steps per case (split into rounds)")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds the iterations are split into")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="ddp's default bucket size, in MB")
    p.add_argument("--sweep", default="0,0.25,1,4", help="bucket sizes in MB to sweep (0: one per layer)")
    p.add_argument("--no-torch", action="store_true", help="skip torch DDP")
    return p.parse_args(argv)


def describe_buckets(dp) -> str:
    if not dp.overlap:
        return "whole arena, blocking"
    return " + ".join(f"{(b.stop - b.start) * 4 / MB:.2f}" for b in dp.buckets) + " MB"


def setup_torch(torch, mpi, model, X, y):
    """torch DDP over gloo in this MPI job: rank 0 picks a free port and broadcasts it."""
    import torch.distributed as dist
    import torch.nn.functional as F

    port = None
    if mpi.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = mpi.bcast(port, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=mpi.Get_rank(), world_size=mpi.Get_size())
    layers = []
    for L in model.layers:
        lin = torch.nn.Linear(L.n_in, L.n_out)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(L.W))
            lin.bias.copy_(torch.from_numpy(L.b))
        layers += [lin, torch.nn.ReLU()]
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(*layers[:-1]))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    tX, ty = torch.from_numpy(X), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(tX), ty).backward()
        opt.step()
    return step, dist


def main(argv=None):
    args = parse_args(argv)
    mpi = MPI.COMM_WORLD
    rank, size = mpi.Get_rank(), mpi.Get_size()
    torch = None if args.no_torch else common.try_import_torch()
    threads = common.limit_threads(torch)

    comm = MPIComm()
    model = MLP(SIZES, activation="relu", loss="softmax_cross_entropy", dtype="float32")
    opt = SGD(model.params, model.grads, lr=LR)
    rng = np.random.default_rng(rank)
    X = rng.standard_normal((args.batch, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], args.batch).astype(np.int64)
    global_batch = args.batch * size

    # Every DataParallel shares the one model: the same memory, so the same caches.
    serial = DataParallel(model, SerialComm())
    default = DataParallel(model, comm, bucket_bytes=int(args.bucket_mb * MB), overlap=True)
    blocking = DataParallel(model, comm, overlap=False)     # what --overlap auto gives on CPU
    sweep = {mb: DataParallel(model, comm, bucket_bytes=int(mb * MB), overlap=True)
             for mb in (float(s) for s in args.sweep.split(",")) if mb != args.bucket_mb}

    def dp_step(dp, denom):
        def step():
            dp.forward_backward(X, y, denom=denom)
            opt.step()
        return step

    def raw_step():                 # the hand-written reference: numpy + one in-place Allreduce
        model.forward_backward(X, y, denom=global_batch)
        mpi.Allreduce(MPI.IN_PLACE, model.grads, op=MPI.SUM)
        opt.step()

    overlap_name = f"ddp --overlap on, bucket {args.bucket_mb:g} MB"
    default_name = "ddp default (--overlap off on CPU)"
    steps = {"1 rank (SerialComm)": dp_step(serial, args.batch),
             default_name: dp_step(blocking, global_batch),
             overlap_name: dp_step(default, global_batch),
             "numpy + raw Allreduce": raw_step}
    watched = "ddp default, watchdog armed (--timeout 300)"
    steps[watched] = dp_step(blocking, global_batch)
    layouts = {overlap_name: describe_buckets(default), default_name: describe_buckets(blocking),
               watched: describe_buckets(blocking)}
    for mb, dp in sweep.items():
        name = f"ddp --overlap on, bucket {mb:g} MB" if mb else "ddp --overlap on, bucket per layer"
        steps[name] = dp_step(dp, global_batch)
        layouts[name] = describe_buckets(dp)
    dist = None
    if torch is not None:
        steps["torch DDP (gloo)"], dist = setup_torch(torch, mpi, model, X, y)
        layouts["torch DDP (gloo)"] = "torch default (25 MB, first 1 MB)"

    # ---- (a), (c), (d): whole steps, alternating rounds
    per_round = max(1, args.iters // args.rounds)
    def arm(name):                  # only the watched case runs with the watchdog's thread
        if name == watched:
            WATCHDOG.start(300, mpi)
        else:
            WATCHDOG.stop()

    t_steps = common.interleave(steps, args.rounds, per_round, barrier=mpi.Barrier, warmup=10, before_round=arm)
    WATCHDOG.stop()
    bookkeeping = min(timeit.repeat(lambda: WATCHDOG.watch("allreduce").__enter__() or WATCHDOG.__exit__(),
                                    number=100_000, repeat=5)) / 100_000

    # ---- (b): gradient averaging alone, a barrier before each call
    raw = np.empty_like(model.grads)
    grads = model.grads
    fresh = np.random.default_rng(7).standard_normal(grads.size).astype(np.float32) * 1e-3

    def bucketed(dp):
        def run():                  # as DataParallel does it: the last bucket blocking
            reqs = [comm.iallreduce_sum(b.view) for b in dp.buckets[:-1]]
            comm.allreduce_sum(dp.buckets[-1].view)
            for r in reqs:
                r.wait()
        return run

    syncs = {"raw Allreduce(IN_PLACE)": lambda: mpi.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM),
             "comm.allreduce_sum(grads)": lambda: comm.allreduce_sum(grads),
             f"bucketed iallreduce, {args.bucket_mb:g} MB": bucketed(default)}
    for mb, dp in sweep.items():
        syncs[f"bucketed iallreduce, {mb:g} MB" if mb else "bucketed iallreduce, per layer"] = bucketed(dp)

    def reset(name):                # sums double the values every call: start each round small
        raw[...] = fresh
        grads[...] = fresh

    t_sync = common.interleave(syncs, args.rounds, per_round, before_call=mpi.Barrier, before_round=reset,
                               warmup=10)
    if dist is not None:
        dist.destroy_process_group()

    # Medians from every rank: the slowest rank's median is what the job gets.
    med = {k: common.median(v) for k, v in {**t_steps, **t_sync}.items()}
    worst = mpi.gather(med, root=0)
    if rank != 0:
        return 0
    worst = {k: max(w[k] for w in worst) for k in med}

    t1 = "1 rank (SerialComm)"
    thr1 = args.batch / med[t1]
    rows = []
    for name, ts in t_steps.items():
        n = 1 if name == t1 else size
        thr = n * args.batch / med[name]
        eff = "" if name == t1 else f"{common.paired_ratio(t_steps, t1, name, per_round):.3f}"
        rows.append([name, n, layouts.get(name, "-"), common.ms(med[name]), common.ms(worst[name]),
                     f"{thr:,.0f}", eff])
    sync_rows = []
    for name, ts in t_sync.items():
        rel = common.paired_ratio(t_sync, name, "raw Allreduce(IN_PLACE)", per_round)
        sync_rows.append([name, common.ms(med[name]), common.ms(worst[name]), f"{rel:.3f}"])

    nbytes = model.grads.nbytes
    print(f"bench_dp: MLP {'-'.join(map(str, SIZES))}, float32, batch {args.batch} per rank, {size} ranks, "
          f"gradient arena {model.grads.size:,} elements = {nbytes / MB:.2f} MB")
    print(f"threads: {threads}; MPI: {MPI.Get_library_version().splitlines()[0].strip(WHITESPACE_NUL)}")
    print(f"{len(t_steps[t1])} timed calls per case in {args.rounds} alternating rounds; "
          "median on rank 0, and the slowest rank's median")
    print()
    print("(a, c, d) training step")
    print(common.table(["case", "ranks", "buckets", "median ms", "slowest ms", "samples/s", "scaling eff."],
                       rows))
    print()
    print("(b) gradient averaging alone (barrier before each call)")
    print(common.table(["case", "median ms", "slowest ms", "/ raw (paired)"], sync_rows))
    print()
    print(f"1-rank throughput {thr1:,.0f} samples/s; scaling eff. = t_1 / t_{size} paired per round")
    eff = common.paired_ratio(t_steps, t1, default_name, per_round)
    if size == 1:
        print("note: run under mpiexec -n 2; with 1 rank the collectives are trivial")
    if "torch DDP (gloo)" in t_steps:
        print(common.verdict("ddp throughput / torch DDP", common.paired_ratio(
            t_steps, "torch DDP (gloo)", default_name, per_round), 1.6, higher_is_better=True))
        print(common.verdict("ddp --overlap on throughput / torch DDP", common.paired_ratio(
            t_steps, "torch DDP (gloo)", overlap_name, per_round), 1.6, higher_is_better=True))
    else:
        print("SKIP  ddp throughput / torch DDP: torch is not installed (or --no-torch)")
    print(common.verdict("sync time / raw Allreduce (comm.allreduce_sum)", common.paired_ratio(
        t_sync, "comm.allreduce_sum(grads)", "raw Allreduce(IN_PLACE)", per_round), 1.05, higher_is_better=False))
    print(common.verdict(f"sync time / raw Allreduce (bucketed {args.bucket_mb:g} MB)", common.paired_ratio(
        t_sync, f"bucketed iallreduce, {args.bucket_mb:g} MB", "raw Allreduce(IN_PLACE)", per_round), 1.05,
        higher_is_better=False))
    print(common.verdict("watchdog armed / disarmed (step time)", common.paired_ratio(
        t_steps, watched, default_name, per_round), 1.01, higher_is_better=False))
    print(f"watchdog bookkeeping per collective (timeit, rank 0): {bookkeeping * 1e6:.2f} us "
          f"= {bookkeeping / med[default_name] * 100:.4f}% of the default step")
    print(common.verdict(f"{size}-rank scaling efficiency (default)", eff, 0.9, higher_is_better=True))
    print(common.verdict(f"{size}-rank scaling efficiency (--overlap on)", common.paired_ratio(
        t_steps, t1, overlap_name, per_round), 0.9, higher_is_better=True))
    print()
    print("reproduce:", common.command_line(size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
