"""Peak RSS per rank against dataset size, with the data left on disk (issue 17), and MNIST's load time.

    python benchmarks/bench_memory.py --sizes-gb 0.5,3,13 --dir /tmp      # 2 MPI ranks per size
    python benchmarks/bench_memory.py --mnist ../shared/data/mnist        # load time and RSS of MNIST

For each size it writes an uncompressed .npz of uint8 rows X (3,072 features, like 32x32x3 images) and labels
y, then trains on 2 ranks through launch/mpirun.sh for 30 steps with 1% validation and test splits: the
scaling pass and the evaluations read every row of their shard. It prints the ranks' peak RSS (from
summary.json, ru_maxrss) and deletes the file. --mnist times ddp.setup.load_data (read, split, scaling
statistics) on the idx files in one process; run it with PYTHONPATH set to an older checkout for "before".
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 3072


def write_npz(path: str, n: int) -> None:
    """An uncompressed .npz (what np.savez writes) of n uint8 rows, written in chunks: never all in memory."""
    rng = np.random.default_rng(0)
    y = np.empty(n, np.int64)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("X.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, D)})
            for s in range(0, n, 1 << 15):
                chunk = rng.integers(0, 256, (min(1 << 15, n - s), D), dtype=np.uint8)
                y[s:s + len(chunk)] = chunk[:, 0] > 127      # a label the first feature decides: something to learn
                f.write(chunk.tobytes())
        with z.open("y.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, y)


def train(path: str, out: str) -> dict:
    cmd = ["bash", os.path.join(ROOT, "launch", "mpirun.sh"), "-n", "2", "--", "train", "--data-path", path,
           "--hidden", "32", "--batch-size", "256", "--max-steps", "30", "--val-fraction", "0.01",
           "--test-fraction", "0.01", "--check-every", "0", "--quiet", "--no-progress", "--out", out]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.load(open(os.path.join(out, "summary.json")))
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def mnist(folder: str) -> None:
    from ddp.config import Config
    from ddp.setup import load_data
    f = {k: os.path.join(folder, f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz") for k in ("train-images", "train-labels")}
    f = {k: v if os.path.exists(v) else v.replace("-idx", ".idx") for k, v in f.items()}
    t0 = time.perf_counter()
    train, val, test, _ = load_data(Config(data_path=f"{f['train-images']},{f['train-labels']}").validate())
    t = time.perf_counter() - t0
    print(f"MNIST load_data: {t:.2f} s, {len(train)} training rows, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-gb", default="0.5,3,13", help="dataset sizes in GB (10^9 bytes), comma-separated")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the files (needs the space)")
    p.add_argument("--mnist", help="a folder with the MNIST idx files: time their loading instead")
    a = p.parse_args()
    if a.mnist:
        return mnist(a.mnist)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    print(f"bench_memory: 2 ranks, uint8 rows of {D} features, machine RAM {ram:.1f} GB "
          f"(RAM / ranks = {ram / 2:.1f} GB)")
    print(f"{'file GB':>8} {'rows':>10} {'peak RSS MB rank 0, 1':>22} {'test acc':>9} {'wall s':>7}")
    for gb in (float(s) for s in a.sizes_gb.split(",")):
        work = tempfile.mkdtemp(dir=a.dir)
        try:
            path, n = os.path.join(work, "data.npz"), int(gb * 1e9 // D)
            write_npz(path, n)
            s = train(path, os.path.join(work, "run"))
            rss = ", ".join(f"{v:.0f}" for v in s["peak_rss_mb"])
            print(f"{os.path.getsize(path) / 1e9:8.2f} {n:10,} {rss:>22} {s['test_accuracy']:9.3f} {s['wall_s']:7.1f}",
                  flush=True)
        finally:
            shutil.rmtree(work)
    print(f"reproduce: python benchmarks/bench_memory.py --sizes-gb {a.sizes_gb}")


if __name__ == "__main__":
    sys.exit(main())
