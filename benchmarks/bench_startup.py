"""Start-up plus one epoch, whole commands timed from outside (issue 10).

    python benchmarks/bench_startup.py                 # 5 interleaved rounds, median wall seconds
    python benchmarks/bench_startup.py --rounds 7 --no-torch

Three commands, each run once per round, the order rotating every round (after one untimed warm-up
round that fills the page cache), so that a noisy neighbour hits all of them alike:

  ddp, 2 ranks    launch/mpirun.sh -n 2 -- train --dataset digits --epochs 1 --no-progress
  ddp, 1 process  python -m ddp train --dataset digits --epochs 1 --no-progress
  torchrun        torchrun --nproc-per-node 2 THIS_FILE --torch-worker: torch DistributedDataParallel over
                  gloo on the same job (the digits split ddp trains on, MLP 64-128-64-10 ReLU as ddp's
                  default --hidden 128,64 gives, SGD lr 0.1, global batch 64 = 32 per rank, one epoch,
                  then test accuracy), one thread per process.

Target: the ddp 2-rank command under 1.0 s (median). The torch row is skipped without torch.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (must come before numpy: pins BLAS to one thread)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["train", "--dataset", "digits", "--epochs", "1", "--no-progress"]


def torch_worker() -> None:
    """One torchrun process: the same data, model, batches per step and epoch as `ddp train` above."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from ddp.data import epoch_batches, load_dataset, shard, split, standardize

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train, _, test = standardize(*split(load_dataset("digits"), 0.1, 0.2, seed=0))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 10))
    model = torch.nn.parallel.DistributedDataParallel(net)      # broadcasts rank 0's weights
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X, y = torch.from_numpy(train.X.astype(np.float32)), torch.from_numpy(train.y)
    for batch in epoch_batches(len(train), 64, seed=0, epoch=0):
        idx = torch.from_numpy(shard(batch, rank, world))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    if rank == 0:
        with torch.no_grad():
            pred = net(torch.from_numpy(test.X.astype(np.float32))).argmax(1).numpy()
        print(f"torch DDP: test_accuracy {np.mean(pred == test.y):.4f}", flush=True)
    dist.barrier()            # a rank that leaves while another still talks makes gloo abort
    dist.destroy_process_group()


def commands(out: str, torch_ok: bool) -> dict:
    py = sys.executable
    cmds = {"ddp, 2 ranks (launch/mpirun.sh)": [os.path.join(ROOT, "launch", "mpirun.sh"), "-n", "2", "--",
                                                *TRAIN, "--out", os.path.join(out, "mpi")],
            "ddp, 1 process": [py, "-m", "ddp", *TRAIN, "--out", os.path.join(out, "one")]}
    torchrun = os.path.join(os.path.dirname(py), "torchrun")
    if torch_ok and os.path.exists(torchrun):
        cmds["torchrun, 2 procs, torch DDP (gloo)"] = [
            torchrun, "--standalone", "--nproc-per-node", "2", os.path.abspath(__file__), "--torch-worker"]
    return cmds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    p.add_argument("--no-torch", action="store_true", help="skip the torchrun row")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_worker:
        torch_worker()
        return 0
    torch_ok = not args.no_torch and importlib.util.find_spec("torch") is not None
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    if os.geteuid() == 0:
        env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    out = tempfile.mkdtemp(prefix="ddp-bench-startup-")
    try:
        cmds = commands(out, torch_ok)
        names = list(cmds)
        times = {n: [] for n in names}
        for r in range(args.rounds + 1):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                t = time.perf_counter()
                res = subprocess.run(cmds[name], env=env, capture_output=True, text=True, timeout=300)
                elapsed = time.perf_counter() - t
                if res.returncode != 0:
                    print(f"{name} failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
                    return 1
                if r > 0:                     # round 0 warms the page cache
                    times[name].append(elapsed)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    print(f"{args.rounds} interleaved rounds (after one warm-up round); wall seconds per command, "
          f"start-up plus one epoch of digits (20 steps of global batch 64)\n")
    rows = [[n, f"{statistics.median(t):.3f}", f"{min(t):.3f}-{max(t):.3f}",
             " ".join(f"{x:.2f}" for x in t)] for n, t in times.items()]
    print(common.table(["command", "median s", "range s", "runs"], rows))
    ddp2 = statistics.median(times[names[0]])
    print(f"\n{'PASS' if ddp2 < 1.0 else 'MISS'}: ddp 2-rank job {ddp2:.3f} s (target < 1.0 s)")
    for name in names[1:]:
        print(f"{name}: {statistics.median(times[name]) / ddp2:.1f}x the ddp 2-rank job")
    print("\ncommands:")
    for name, cmd in cmds.items():
        words = [os.path.relpath(c, ROOT) if c.startswith(ROOT) else c.replace(out, "OUT") for c in cmd]
        print(f"  {name}: {shlex.join(words)}")
    print(f"\nreproduce: python benchmarks/bench_startup.py --rounds {args.rounds}"
          f"{' --no-torch' if args.no_torch else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
