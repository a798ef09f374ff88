"""One training step of ddp against its GEMM floor and PyTorch eager (issue 2).

    python benchmarks/bench_step.py                       # CPU, float32, batch 128
    python benchmarks/bench_step.py --batch 256 --iters 400 --dtype float64
    python benchmarks/bench_step.py --device gpu          # same code on CuPy

Model: MLP 784-512-512-10, ReLU, softmax cross-entropy, plain SGD (lr 0.01),
random data in fixed, preallocated arrays, one BLAS thread.

Rows, all timed in the same process in alternating rounds (the machine is shared
and noisy, so only side-by-side numbers are comparable):
  ddp step          model.forward_backward(X, y) + optimizer.step()
  GEMM floor        exactly the 8 matmuls that step performs (3 forward X @ W.T,
                    3 dW = dZ.T @ X, 2 dX = dZ @ W), same shapes, dtypes, transposes,
                    preallocated out= buffers: what the step would cost if
                    everything but BLAS were free
  torch step        nn.Linear/ReLU, F.cross_entropy, torch.optim.SGD,
                    zero_grad(set_to_none=True), eager
  torch GEMM floor  the same 8 matmuls through torch's BLAS (informational: it
                    separates "different BLAS" from "overhead around BLAS")
Targets: ddp <= 1.15x its GEMM floor, and ddp <= 1.0x torch. Exit code 0 either way.

With --device gpu it also counts, over 10 untimed steps taken as the trainer takes
them (forward, backward, the loss and the NaN check fetched together, the update),
the device-to-host transfers and host synchronizations per step (through ddp.backend).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (must come before numpy: pins BLAS to one thread)

import numpy as np  # noqa: E402

from ddp import backend  # noqa: E402
from ddp.model import MLP  # noqa: E402
from ddp.optim import SGD  # noqa: E402

SIZES = [784, 512, 512, 10]
LR = 0.01


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128, help="samples per step")
    p.add_argument("--iters", type=int, default=300, help="timed steps per case (split into rounds)")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds the iterations are split into")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    return p.parse_args(argv)


def gemm_floor(model, X, B):
    """The step's matmuls alone, on buffers shaped exactly like the step's."""
    xp, dt = model.xp, model.dtype
    rng = np.random.default_rng(1)
    Ls = model.layers
    ins = [X] + [xp.asarray(rng.standard_normal((B, L.n_out)), dt) for L in Ls[:-1]]   # A_i
    Z = [xp.empty((B, L.n_out), dt) for L in Ls]
    dZ = [xp.asarray(rng.standard_normal((B, L.n_out)), dt) for L in Ls]
    dW = [xp.empty((L.n_out, L.n_in), dt) for L in Ls]
    dX = [xp.empty((B, L.n_in), dt) for L in Ls]
    W = [L.W for L in Ls]
    mm = xp.matmul
    n = len(Ls)

    def run():
        for i in range(n):                           # forward: Z = X @ W.T
            mm(ins[i], W[i].T, out=Z[i])
        for i in reversed(range(n)):                 # backward: dW = dZ.T @ X, dX = dZ @ W
            mm(dZ[i].T, ins[i], out=dW[i])
            if i > 0:
                mm(dZ[i], W[i], out=dX[i])
    return run


def count_transfers(model, opt, X, y, steps=10) -> dict:
    """Device-to-host transfers and host synchronizations per training step, as counted by
    ddp.backend, for the trainer's step: forward_backward, check_finite (which fetches the
    loss and the gradients' squared norm together), optimizer.step."""
    from ddp.train import check_finite

    def step(t):
        check_finite(model, model.forward_backward(X, y), t)
        opt.step()
    step(0)
    before = dict(backend.stats)
    for t in range(steps):
        step(t)
    backend.synchronize()
    after = dict(backend.stats)
    after["syncs"] -= 1                                  # the synchronize() just above
    return {k: (after[k] - before[k]) / steps for k in before}


def torch_cases(torch, model, Xn, yn, dev, dtype):
    import torch.nn.functional as F

    tdt = getattr(torch, dtype)
    layers = []
    for L in model.layers:
        lin = torch.nn.Linear(L.n_in, L.n_out, dtype=tdt, device=dev)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(backend.to_numpy(L.W)))
            lin.bias.copy_(torch.as_tensor(backend.to_numpy(L.b)))
        layers += [lin, torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    X = torch.as_tensor(backend.to_numpy(Xn), device=dev)
    y = torch.as_tensor(backend.to_numpy(yn).astype(np.int64), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(X), y).backward()
        opt.step()

    B = X.shape[0]
    g = torch.Generator(device="cpu").manual_seed(1)
    lins = [m for m in net if isinstance(m, torch.nn.Linear)]
    ins = [X] + [torch.randn(B, m.out_features, generator=g, dtype=tdt).to(dev) for m in lins[:-1]]
    Z = [torch.empty(B, m.out_features, dtype=tdt, device=dev) for m in lins]
    dZ = [torch.randn(B, m.out_features, generator=g, dtype=tdt).to(dev) for m in lins]
    dW = [torch.empty(m.out_features, m.in_features, dtype=tdt, device=dev) for m in lins]
    dX = [torch.empty(B, m.in_features, dtype=tdt, device=dev) for m in lins]
    W = [m.weight.detach() for m in lins]

    def floor():
        for i in range(len(lins)):
            torch.matmul(ins[i], W[i].t(), out=Z[i])
        for i in reversed(range(len(lins))):
            torch.matmul(dZ[i].t(), ins[i], out=dW[i])
            if i > 0:
                torch.matmul(dZ[i], W[i], out=dX[i])
    return step, floor


def main(argv=None):
    args = parse_args(argv)
    torch = None if args.no_torch else common.try_import_torch()
    threads = common.limit_threads(torch)

    model = MLP(SIZES, activation="relu", loss="softmax_cross_entropy", dtype=args.dtype, device=args.device)
    xp = model.xp
    opt = SGD(model.params, model.grads, lr=LR)
    rng = np.random.default_rng(0)
    X = xp.asarray(rng.standard_normal((args.batch, SIZES[0])), model.dtype)
    y = xp.asarray(rng.integers(0, SIZES[-1], args.batch), xp.int64)

    def ddp_step():
        model.forward_backward(X, y)
        opt.step()

    cases = {"ddp step": ddp_step, "GEMM floor": gemm_floor(model, X, args.batch)}
    tdev = "cuda" if args.device == "gpu" else "cpu"
    if torch is not None and (tdev == "cpu" or torch.cuda.is_available()):
        cases["torch step"], cases["torch GEMM floor"] = torch_cases(torch, model, X, y, tdev, args.dtype)

    def sync():
        backend.synchronize()
        if torch is not None and tdev == "cuda":
            torch.cuda.synchronize()

    per_round = max(1, args.iters // args.rounds)
    times = common.interleave(cases, args.rounds, per_round, sync=sync, warmup=20)

    base = common.median(times["ddp step"])
    rows = []
    for name, ts in times.items():
        q1, q3 = common.quartiles(ts)
        rel = common.paired_ratio(times, "ddp step", name, per_round) if name != "ddp step" else 1.0
        rows.append([name, common.ms(common.median(ts)), f"{common.ms(q1)}-{common.ms(q3)}",
                     f"{args.batch / common.median(ts):,.0f}", f"{rel:.3f}"])
    print(f"bench_step: MLP {'-'.join(map(str, SIZES))} relu, softmax CE, SGD lr {LR}, {args.dtype}, "
          f"batch {args.batch}, device {args.device}")
    print(f"threads: {threads}; numpy {np.__version__}" + (f", torch {torch.__version__}" if torch else ""))
    print(f"{len(times['ddp step'])} timed steps per case in {args.rounds} alternating rounds")
    print()
    print(common.table(["case", "median ms", "IQR ms", "samples/s", "ddp / case"], rows))
    print()
    print("ddp / case is the median over rounds of the per-round ratio of medians.")
    print(common.verdict("ddp step / GEMM floor", common.paired_ratio(times, "ddp step", "GEMM floor", per_round),
                         1.15, higher_is_better=False))
    if "torch step" in times:
        print(common.verdict("ddp step / torch step",
                             common.paired_ratio(times, "ddp step", "torch step", per_round),
                             1.0, higher_is_better=False))
    else:
        print("SKIP  ddp step / torch step: torch is not installed (or has no GPU)")
    print(f"ddp step median {common.ms(base)} ms")
    if args.device == "gpu":
        c = count_transfers(model, opt, X, y)
        print(f"per training step: {c['d2h']:g} device-to-host transfer(s), {c['syncs']:g} host "
              "synchronization(s) (ddp.backend's count over 10 steps: forward, backward, loss + NaN check, update)")
    print()
    print("reproduce:", common.command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
