"""--compress auto and --bucket-mb auto: the gradient reduction chosen by timing each candidate on this job's ranks.

    ddp train --compress auto --bucket-mb auto ...     # the start line says which, and why

A cost model needs a link's latency and bandwidth and the reduction's own compute (PowerSGD's matrix products,
fp16's casts); timing the candidates on the real arena, the real ranks and the real link measures all of them
at once. Compression is chosen only when it shortens the whole step (one forward/backward plus the reduction) by
10% or more: it may cost accuracy (benchmarks/RESULTS.md: PowerSGD rank 2 ends within 0.01 points on MNIST,
rank 1 further), plain allreduce cannot.

Buckets cost nothing in accuracy, so the fastest step wins. Buckets are whole layers (parallel.make_buckets), so a
grid of sizes gives only a few distinct bucketings (an MLP of 3 layers: at most 4), and each is tried on a few of
the first training steps (BucketTuner): a trial before training that timed forward, backward and the reductions
alone measured 25-28 ms for bucketings whose whole steps took 30 and 41 ms (2 hosts at 1 Gbit/s). The grid's last
point holds every layer in one bucket, which is the blocking allreduce after backward: auto may find that overlap
does not pay.
"""
from __future__ import annotations

import statistics
import time

from . import backend
from .parallel import make_buckets
from .powersgd import PowerSGD
from .trace import NULL

CANDIDATES = ("powersgd:1", "powersgd:2", "powersgd:4", "fp16", "none")      # fewest bytes first: see PROBES
GAIN = 0.9            # a compression must bring the step below this fraction of plain allreduce's
PROBES = (32, 8, 2)   # fp16 and none reduce 1/32, 1/8, 1/2 of the arena first, and stop where they cannot win
GRID_MB = (0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 32)       # 0: one bucket per layer


def _timed(fn, comm, reps: int = 3, warm: bool = True, stat=statistics.median) -> float:
    """stat (the median) of fn()'s seconds over reps calls after one warm-up, the ranks lined up before each."""
    if warm:
        fn()
    out = []
    for _ in range(reps):
        comm.barrier()
        t = time.perf_counter()
        fn()
        backend.synchronize()
        out.append(time.perf_counter() - t)
    return stat(out)


def choose_compress(model, comm, X, y, denom: int, seed: int) -> tuple[str, str]:
    """(choice, reason): time one forward/backward of this rank's part of the first batch (X, y) and each
    candidate's reduction of the gradient arena; rank 0's figures decide for every rank. The model's state
    (weights, batch-norm statistics) is put back as it was.

    On a slow link one reduction of the whole arena costs as much as many compressed steps, and a trial that
    timed it 4 times would cost more than compression saves in a short run. So the compressions go first, and
    fp16 and none first reduce growing parts of the arena (PROBES; each twice, the faster counting): beyond one
    latency, bytes cost at least their share of a part (a shaper's burst, a TCP window, only make small messages
    cheaper), so latency + (arena / part) * (probe - latency) bounds the whole reduction from below; when even that
    bound makes the step twice the best one so far, the candidate is out, its bound shown as "> ..."."""
    state = model.state_dict()                         # host copies
    compute = _timed(lambda: model.forward_backward(X, y, denom=denom, step=0), comm)
    grads = model.grads.copy()
    one = model.grads[:1]
    latency = _timed(lambda: comm.allreduce_sum(one), comm)
    times, bounds = {}, {}
    for name in CANDIDATES:
        psgd = PowerSGD(model, comm, int(name.split(":")[1]), seed) if name.startswith("powersgd") else None
        code = None if name == "none" else name

        def reduce(psgd=psgd, code=code):
            model.grads[...] = grads
            if psgd is not None:
                psgd.reduce(model.grads, NULL.span)
            else:
                comm.allreduce_sum(model.grads, code)
        for frac in PROBES if psgd is None else ():
            part = model.grads[:max(1, model.grads.size // frac)]
            probe = _timed(lambda: comm.allreduce_sum(part, code), comm, reps=2, warm=False, stat=min)
            bound = latency + model.grads.size / part.size * max(probe - latency, 0.0)
            if comm.bcast_obj(compute + bound > 2 * (compute + min(times.values())), root=0):   # one answer
                bounds[name] = bound
                break
        if name not in bounds:
            times[name] = _timed(reduce, comm)
    model.load_state_dict(state)
    model.grads[...] = 0
    return decide(*comm.bcast_obj((compute, times, bounds), root=0))


def decide(compute: float, times: dict, bounds: dict | None = None) -> tuple[str, str]:
    """The candidate whose step (compute + its reduction, seconds) is shortest, if it is a compression only when
    that step is below GAIN times plain allreduce's; and the figures behind it. bounds: reductions known only to
    take longer than this (they lost already)."""
    bounds = bounds or {}
    step = {name: compute + t for name, t in {**times, **bounds}.items()}
    best = min(times, key=step.get)
    if step[best] > GAIN * step["none"]:
        best = "none"
    figures = ", ".join(f"{name} {'> ' * (name in bounds)}{t * 1e3:.2f} ms" for name, t in step.items())
    return best, f"measured steps: {figures} (compression only below {GAIN:g}x none's)"


class BucketTuner:
    """--bucket-mb auto: the first training steps try each distinct bucketing of GRID_MB in turn, one step to settle
    and TRY_STEPS timed; then the fastest is kept. Nothing is wasted: these are training steps (a bucketing changes
    only how the sum travels), timed whole, from one step's end to the next (data, forward, backward, the buckets'
    reductions, the optimizer, and the end-of-step meeting that lines the ranks up). Rank 0's clock decides."""

    TRY_STEPS = 3

    def __init__(self, dp):
        self.dp, self.t, self.choice = dp, None, None
        distinct = {}              # bucketing (layers per bucket) -> the smallest size giving it
        for mb in GRID_MB:
            distinct.setdefault(tuple(tuple(b.layers) for b in make_buckets(dp.model, int(mb * (1 << 20)))), mb)
        self.buckets = {mb: len(b) for b, mb in distinct.items()}
        self.plan = [(mb, k > 0) for mb in self.buckets for k in range(self.TRY_STEPS + 1)]   # (bucketing, timed)
        self.times = {mb: [] for mb in self.buckets}
        dp.set_buckets(int(self.plan[0][0] * (1 << 20)))

    def step_done(self) -> str | None:
        """Call at the end of every step, on every rank, until `choice` is set; returns the reason then."""
        now = time.perf_counter()
        mb, timed = self.plan.pop(0)
        if timed:
            self.times[mb].append(now - self.t)
        self.t = now
        if self.plan:
            self.dp.set_buckets(int(self.plan[0][0] * (1 << 20)))
            return None
        step = self.dp.comm.bcast_obj({mb: statistics.median(t) for mb, t in self.times.items()}, root=0)
        self.choice = min(step, key=step.get)
        self.dp.set_buckets(int(self.choice * (1 << 20)))
        figures = ", ".join(f"{mb:g} MB ({n} bucket{'s' * (n > 1)}) {step[mb] * 1e3:.2f} ms"
                            for mb, n in self.buckets.items())
        return f"--bucket-mb auto chose {self.choice:g} after {len(self.buckets) * (self.TRY_STEPS + 1)} steps " \
               f"of trying: median steps {figures}"
