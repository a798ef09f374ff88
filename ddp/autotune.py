"""--compress auto: the gradient reduction chosen before training, by timing each candidate on this job's ranks.

    ddp train --compress auto ...     # the start line says which, and why

A cost model needs a link's latency and bandwidth and the reduction's own compute (PowerSGD's matrix products,
fp16's casts); timing the candidates on the real arena, the real ranks and the real link measures all of them
at once. Compression is chosen only when it shortens the whole step (one forward/backward plus the reduction) by
10% or more: it may cost accuracy (benchmarks/RESULTS.md: PowerSGD rank 2 ends within 0.01 points on MNIST,
rank 1 further), plain allreduce cannot.
"""
from __future__ import annotations

import statistics
import time

from . import backend
from .powersgd import PowerSGD
from .trace import NULL

CANDIDATES = ("none", "fp16", "powersgd:2", "powersgd:4")
GAIN = 0.9            # a compression must bring the step below this fraction of plain allreduce's


def _timed(fn, comm, reps: int = 3) -> float:
    """Median seconds of fn() over reps calls after one warm-up, the ranks lined up before each."""
    fn()
    out = []
    for _ in range(reps):
        comm.barrier()
        t = time.perf_counter()
        fn()
        backend.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def choose_compress(model, comm, X, y, denom: int, seed: int) -> tuple[str, str]:
    """(choice, reason): time one forward/backward of this rank's part of the first batch (X, y) and each
    candidate's reduction of the gradient arena; rank 0's figures decide for every rank. The model's state
    (weights, batch-norm statistics) is put back as it was."""
    state = model.state_dict()                         # host copies
    compute = _timed(lambda: model.forward_backward(X, y, denom=denom, step=0), comm)
    grads = model.grads.copy()
    times = {}
    for name in CANDIDATES:
        psgd = PowerSGD(model, comm, int(name.split(":")[1]), seed) if name.startswith("powersgd") else None

        def reduce(name=name, psgd=psgd):
            model.grads[...] = grads
            if psgd is not None:
                psgd.reduce(model.grads, NULL.span)
            else:
                comm.allreduce_sum(model.grads, None if name == "none" else name)
        times[name] = _timed(reduce, comm)
    model.load_state_dict(state)
    model.grads[...] = 0
    return decide(*comm.bcast_obj((compute, times), root=0))


def decide(compute: float, times: dict) -> tuple[str, str]:
    """The candidate whose step (compute + its reduction, seconds) is shortest, if it is a compression only when
    that step is below GAIN times plain allreduce's; and the figures behind it."""
    step = {name: compute + t for name, t in times.items()}
    best = min(step, key=step.get)
    if step[best] > GAIN * step["none"]:
        best = "none"
    figures = ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in step.items())
    return best, f"measured steps: {figures} (compression only below {GAIN:g}x none's)"
