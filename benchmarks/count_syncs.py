"""Device-to-host transfers and host synchronizations per training step (issue 11).

    python benchmarks/count_syncs.py --emulated                        # serial, on tests/emulated_gpu.py
    python benchmarks/count_syncs.py --emulated --simulate-ranks 2
    mpiexec -n 2 python benchmarks/count_syncs.py --emulated --cuda-aware 0     # staged MPI path
    mpiexec -n 2 python benchmarks/count_syncs.py --emulated --cuda-aware 1     # CUDA-aware MPI path
    mpiexec -n 3 python benchmarks/count_syncs.py --emulated --mode ps
    python benchmarks/count_syncs.py                                   # a real GPU (CuPy)

It runs the real training loop (ddp.train.run) on synthetic_classification, MLP 20-64-64-3, global
batch 16, one epoch of 27 steps, and counts between consecutive steps (the on_step hook), so the
epoch's end (validation, checkpoint) is left out. On the emulated device every transfer and sync is
seen, implicit ones (float() of a device array) included; on a real GPU only those made through
ddp.backend (backend.stats). Simulated ranks share one counter: their counts are summed. Rank 0
prints the counts of rank 0 (ps mode: of the first worker). The figures go in RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ddp import backend  # noqa: E402
from ddp.comm import world_comm  # noqa: E402
from ddp.config import Config  # noqa: E402
from ddp.train import run  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--emulated", action="store_true", help="use the emulated device of tests/emulated_gpu.py")
    p.add_argument("--cuda-aware", choices=("0", "1"), help="sets DDP_CUDA_AWARE for the MPI path")
    p.add_argument("--simulate-ranks", type=int, default=0)
    p.add_argument("--mode", choices=("allreduce", "ps"), default="allreduce")
    p.add_argument("--compress", choices=("none", "fp16"), default="none")
    p.add_argument("--bucket-mb", type=float, default=0.01, help="0.01 MB: 3 buckets for this model")
    args = p.parse_args(argv)
    if args.cuda_aware is not None:
        os.environ["DDP_CUDA_AWARE"] = args.cuda_aware
    counter = None
    if args.emulated:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import emulated_gpu
        backend._use_device_module(emulated_gpu, emulated_gpu.cupyx)
        counter = emulated_gpu.counter
    comm = world_comm()
    snaps = []

    def snap(step, model, c):
        if c.rank == 0 or args.mode == "ps":          # simulated ranks: one snapshot per step
            snaps.append(counter.snapshot() if counter else dict(backend.stats))

    with tempfile.TemporaryDirectory() as out:
        cfg = Config(out=os.path.join(out, str(comm.rank)), device="gpu", dataset="synthetic_classification",
                     n_samples=600, n_features=20, hidden="64,64", batch_size=16, epochs=1, max_steps=30,
                     progress=False, mode=args.mode, servers=1, simulate_ranks=args.simulate_ranks,
                     compress=args.compress, bucket_mb=args.bucket_mb, overlap="on", check_every=0)
        run(cfg, comm if comm.size > 1 else None, on_step=snap)
    per_step = [{k: b[k] - a[k] for k in a} for a, b in zip(snaps, snaps[1:])]
    everyone = comm.allgather_obj(per_step)
    if comm.rank == 0:
        mine = next((s for s in everyone if s), [])
        where = "the emulated device" if counter else "ddp.backend"
        world = f"{comm.size} MPI ranks" if comm.size > 1 else (
            f"{args.simulate_ranks} simulated ranks (summed)" if args.simulate_ranks else "1 process")
        med = {k: statistics.median(s[k] for s in mine) for k in mine[0]}
        print(f"count_syncs: {args.mode}, {world}, DDP_CUDA_AWARE={os.environ.get('DDP_CUDA_AWARE', 'unset')}, "
              f"compress {args.compress}, counted by {where} over {len(mine)} steps")
        print("per step (median): " + ", ".join(f"{k} {v:g}" for k, v in med.items())
              + f"; max syncs in a step {max(s['syncs'] for s in mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
