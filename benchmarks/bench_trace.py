"""What --trace costs: the training step with tracing off and on, side by side (issue 10).

    python benchmarks/bench_trace.py
    python benchmarks/bench_trace.py --batch 32 --iters 600

Model: MLP 784-512-512-10, ReLU, softmax cross-entropy, plain SGD, float32, one BLAS thread: the step of
bench_step.py, through DataParallel over SerialComm as train.py runs it (so the allreduce span is there too).
Cases, interleaved in alternating rounds:
  off   model.tracer = trace.NULL (the default): each span is an empty `with`
  on    model.tracer = trace.Tracer(0): each span appends one dict
Also printed: the cost of one span with tracing off (timeit), times the spans per step, over the step time:
what the instrumentation costs a run that does not trace. Target: on <= 1.02x off. Exit code 0 either way.
"""
from __future__ import annotations

import argparse
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (must come before numpy: pins BLAS to one thread)

import numpy as np  # noqa: E402

from ddp.comm import SerialComm  # noqa: E402
from ddp.model import MLP  # noqa: E402
from ddp.optim import SGD  # noqa: E402
from ddp.parallel import DataParallel  # noqa: E402
from ddp.stop import stop_requested  # noqa: E402
from ddp.trace import NULL, Tracer  # noqa: E402

SIZES = [784, 512, 512, 10]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128, help="samples per step")
    p.add_argument("--iters", type=int, default=300, help="timed steps per case (split into rounds)")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds")
    args = p.parse_args(argv)
    threads = common.limit_threads()
    model = MLP(SIZES, dtype="float32")
    comm = SerialComm()
    dp = DataParallel(model, comm)
    opt = SGD(model.params, model.grads, lr=0.01)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.batch, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], args.batch)
    tracer = Tracer(0)

    def step(tr):
        def run():
            model.tracer = dp.tracer = tr
            with tr.span("data"):
                Xb, yb = X, y
            dp.forward_backward(Xb, yb)
            with tr.span("optimizer"):
                opt.step()
            with tr.span("meet", "wait"):
                stop_requested(comm)
        return run

    per_round = max(1, args.iters // args.rounds)
    times = common.interleave({"tracing off": step(NULL), "tracing on": step(tracer)}, args.rounds, per_round,
                              warmup=20)
    spans_per_step = len(tracer.events) / (len(times["tracing on"]) + 20)
    null_span = min(timeit.repeat("with span('x'): pass", globals={"span": NULL.span}, number=100_000,
                                  repeat=5)) / 100_000
    off = common.median(times["tracing off"])
    ratio = common.paired_ratio(times, "tracing on", "tracing off", per_round)
    print(f"bench_trace: MLP {'-'.join(map(str, SIZES))}, float32, batch {args.batch}; threads: {threads}")
    print(f"{len(times['tracing off'])} timed steps per case in {args.rounds} alternating rounds")
    print()
    print(common.table(["case", "median ms", "on / off (paired)"],
                       [["tracing off", common.ms(off), "1.000"],
                        ["tracing on", common.ms(common.median(times["tracing on"])), f"{ratio:.4f}"]]))
    print()
    print(f"spans per step: {spans_per_step:.0f}; one span with tracing off: {null_span * 1e9:.0f} ns; "
          f"instrumentation with tracing off: {spans_per_step * null_span / off * 100:.3f}% of the step")
    print(common.verdict("traced step / untraced step", ratio, 1.02, higher_is_better=False, fmt="{:.4f}"))
    print()
    print("reproduce:", common.command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
