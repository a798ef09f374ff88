"""One training step of the MNIST CNN: ddp against PyTorch eager and its own GEMM floor (issue 15).

    python benchmarks/bench_cnn.py                   # CPU, float32, batch 128, one thread
    python benchmarks/bench_cnn.py --iters 120 --rounds 6

Model (the README's MNIST network), input (1, 28, 28):
    conv:32:3,relu,maxpool:2,conv:64:3,relu,maxpool:2,flatten,dense:128,relu,dropout:0.25,dense:10
softmax cross-entropy, plain SGD (lr 0.01), random data in fixed preallocated arrays.

Rows, timed in the same process in alternating rounds (only side-by-side numbers are comparable here):
  ddp step      model.forward_backward(X, y, rows=..., step=t) + optimizer.step()
  GEMM floor    exactly the step's matrix products, on inputs already unfolded (im2col done once, outside
                the timing): per conv the forward cols @ W.T, dW = dY.T @ cols and (but for the first
                layer) dcols = dY @ W; per dense layer the MLP's three. What the step would cost if
                unfolding, pooling, activations, the loss and the update were free.
  torch step    nn.Conv2d/ReLU/MaxPool2d/Linear/Dropout, F.cross_entropy, torch.optim.SGD, eager
Targets: ddp step <= 1.5x torch step (issue 15); the ratio to the GEMM floor is reported beside it.
Exit code 0 either way.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (must come before numpy: pins BLAS to one thread)

import numpy as np  # noqa: E402

import ddp  # noqa: E402
from ddp import backend  # noqa: E402
from ddp.optim import SGD  # noqa: E402

ARCH = "conv:32:3,relu,maxpool:2,conv:64:3,relu,maxpool:2,flatten,dense:128,relu,dropout:0.25,dense:10"
SHAPE = (1, 28, 28)
LR = 0.01


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128, help="samples per step")
    p.add_argument("--iters", type=int, default=150, help="timed steps per case (split into rounds)")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds the iterations are split into")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch row")
    return p.parse_args(argv)


def gemm_floor(B, dt):
    """The CNN step's products alone, on unfolded inputs shaped exactly like the step's."""
    rng = np.random.default_rng(1)
    r = lambda *s: rng.standard_normal(s).astype(dt)                      # noqa: E731
    # (rows, k, n_out, needs dX): conv1 26x26 pixels of 1*3*3, conv2 11x11 of 32*3*3, dense 1600->128, 128->10
    prods = [(B * 26 * 26, 9, 32, False), (B * 11 * 11, 288, 64, True), (B, 1600, 128, True), (B, 128, 10, True)]
    bufs = [(r(m, k), r(n, k), np.empty((m, n), dt), r(m, n), np.empty((n, k), dt), np.empty((m, k), dt), dx)
            for m, k, n, dx in prods]

    def run():
        for cols, W, Y, _, _, _, _ in bufs:                                # forward
            np.matmul(cols, W.T, out=Y)
        for cols, W, _, dY, dW, dcols, dx in reversed(bufs):               # backward
            np.matmul(dY.T, cols, out=dW)
            if dx:
                np.matmul(dY, W, out=dcols)
    return run


def torch_step(torch, model, X, y, dtype):
    import torch.nn.functional as F
    nn = torch.nn
    tdt = getattr(torch, dtype)
    net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Dropout(0.25),
                        nn.Linear(128, 10)).to(tdt)
    # the same weights: ddp's state dict is PyTorch's layouts in PyTorch's order (layers.k.W, layers.k.b)
    state = model.state_dict()
    with torch.no_grad():
        for p, (name, a) in zip(net.parameters(), state.items(), strict=True):
            if tuple(p.shape) != a.shape:
                raise SystemExit(f"bench_cnn: {name} has shape {a.shape}, torch's parameter {tuple(p.shape)}")
            p.copy_(torch.as_tensor(a))
    net.eval()                   # the mapping's check: the same logits without dropout
    gap = np.abs(net(torch.as_tensor(backend.to_numpy(X))).detach().numpy() - backend.to_numpy(model.forward(X))).max()
    if gap > 1e-3:
        raise SystemExit(f"bench_cnn: torch's logits differ from ddp's by {gap:.3g}: the weight mapping is wrong")
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    Xt = torch.as_tensor(backend.to_numpy(X))
    yt = torch.as_tensor(backend.to_numpy(y).astype(np.int64))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(Xt), yt).backward()
        opt.step()
    return step


def main(argv=None):
    args = parse_args(argv)
    torch = None if args.no_torch else common.try_import_torch()
    threads = common.limit_threads(torch)
    model = ddp.Network(ARCH, SHAPE, loss="softmax_cross_entropy", seed=0, dtype=args.dtype)
    opt = SGD(model.params, model.grads, lr=LR)
    rng = np.random.default_rng(0)
    B = args.batch
    X = rng.random((B, *SHAPE)).astype(args.dtype)
    y = rng.integers(0, 10, B)
    rows = np.arange(B, dtype=np.int64)
    t = [0]

    def ddp_step():
        t[0] += 1
        model.forward_backward(X, y, rows=rows, step=t[0])
        opt.step()

    cases = {"ddp step": ddp_step, "GEMM floor": gemm_floor(B, np.dtype(args.dtype))}
    if torch is not None:
        cases["torch step"] = torch_step(torch, model, X, y, args.dtype)
    per_round = max(1, args.iters // args.rounds)
    times = common.interleave(cases, args.rounds, per_round, warmup=5)

    rows_out = []
    for name, ts in times.items():
        q1, q3 = common.quartiles(ts)
        rel = common.paired_ratio(times, "ddp step", name, per_round) if name != "ddp step" else 1.0
        rows_out.append([name, common.ms(common.median(ts)), f"{common.ms(q1)}-{common.ms(q3)}",
                         f"{B / common.median(ts):,.0f}", f"{rel:.3f}"])
    print(f"bench_cnn: {ARCH} on {SHAPE}, softmax CE, SGD lr {LR}, {args.dtype}, batch {B}, "
          f"{model.num_params} parameters")
    print(f"threads: {threads}; numpy {np.__version__}" + (f", torch {torch.__version__}" if torch else ""))
    print(f"{len(times['ddp step'])} timed steps per case in {args.rounds} alternating rounds")
    print()
    print(common.table(["case", "median ms", "IQR ms", "samples/s", "ddp / case"], rows_out))
    print()
    print("ddp / case is the median over rounds of the per-round ratio of medians.")
    print(f"INFO  ddp step / GEMM floor: {common.paired_ratio(times, 'ddp step', 'GEMM floor', per_round):.3f}")
    if "torch step" in times:
        print(common.verdict("ddp step / torch step",
                             common.paired_ratio(times, "ddp step", "torch step", per_round),
                             1.5, higher_is_better=False))
    else:
        print("SKIP  ddp step / torch step: torch is not installed")
    print()
    print("reproduce:", common.command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
