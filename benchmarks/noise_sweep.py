"""Issue 19: the gradient noise scale (--noise-scale) against a batch-size sweep of steps to a target.

    python benchmarks/noise_sweep.py                  # digits, a few minutes on one core

For each global batch size B: the fewest optimizer steps to reach the target validation accuracy over a small
learning-rate grid (SGD, momentum 0.9; mean over seeds), then a fit of McCandlish et al.'s S(B) = S_min (1 +
B_crit / B) and the batch size where doubling it stops nearly halving the steps. Beside them: the noise scale
B_simple that `ddp train --noise-scale` reports on 4 simulated ranks, at the epoch the target is reached.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (one BLAS thread, before numpy)

import numpy as np  # noqa: E402

from ddp.config import Config  # noqa: E402
from ddp.errors import TrainingError  # noqa: E402
from ddp.setup import load_data  # noqa: E402
from ddp.train import run  # noqa: E402


class Reached(Exception):
    pass


def steps_to(cfg, target, every):
    """Optimizer steps until the validation accuracy reaches `target` (checked every `every` steps)."""
    _, val, _, _ = load_data(cfg)
    X, y = val.inputs(np.arange(len(val)), np, np.float32), np.asarray(val.y)

    def check(step, model, comm):
        if step % every == 0 and float((np.asarray(model.forward(X)).argmax(1) == y).mean()) >= target:
            raise Reached(step)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), np.errstate(all="ignore"):
            run(cfg, on_step=check)
    except Reached as r:
        return int(r.args[0])
    except TrainingError:                     # diverged at this learning rate
        pass
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--batches", default="8,16,32,64,128,256,512")
    p.add_argument("--lrs", default="0.003125,0.00625,0.0125,0.025,0.05,0.1,0.2,0.4,0.8")
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="ddp-noise-")
    base = dict(dataset="digits", hidden="64", momentum=0.9, epochs=400, progress=False, quiet=True,
                val_fraction=0.15, test_fraction=0.0)
    rows = []
    for B in [int(b) for b in a.batches.split(",")]:
        best = None
        for lr in [float(x) for x in a.lrs.split(",")]:
            got = [steps_to(Config(out=os.path.join(tmp, f"b{B}-{lr}-{s}"), overwrite=True, batch_size=B, lr=lr,
                                   seed=s, max_steps=3000, **base), a.target, 1) for s in range(a.seeds)]
            if all(g is not None for g in got) and (best is None or np.mean(got) < best[0]):
                best = (float(np.mean(got)), lr)
        rows.append((B, *(best or (None, None))))
        print(f"B {B:5d}: steps to {a.target:.0%} " + (f"{best[0]:8.1f} (lr {best[1]:g})" if best else "not reached"),
              flush=True)
    ok = [(B, S) for B, S, _ in rows if S is not None]
    inv, S = np.array([1 / B for B, _ in ok]), np.array([S for _, S in ok])
    slope, intercept = np.polyfit(inv, S, 1)
    b_crit = slope / intercept
    knee = next((B for (B, s1), (_, s2) in zip(ok, ok[1:]) if s1 / s2 < 1.5), None)
    # the noise scale ddp reports, on 4 simulated ranks at B = 64 (its best lr), at the epoch of the target
    B0, lr0 = 64, dict((B, lr) for B, _, lr in rows).get(64) or 0.1
    out = os.path.join(tmp, "noise")
    cfg = Config(out=out, overwrite=True, batch_size=B0, lr=lr0, seed=0, simulate_ranks=4, noise_scale=True,
                 **{**base, "epochs": 60})
    reached = steps_to(Config(**{**cfg.to_dict(), "simulate_ranks": 0, "out": out + "-1"}), a.target, 1)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        run(cfg)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    at = next((r for r in records if reached and r["step"] >= reached and r["noise_scale"]), records[-1])
    scales = [r["noise_scale"] for r in records if r["noise_scale"] is not None]
    print(f"fit S(B) = S_min (1 + B_crit / B): S_min {intercept:.1f}, B_crit {b_crit:.0f}; doubling B stops "
          f"cutting the steps by a third from B = {knee}")
    upto = [round(r["noise_scale"]) for r in records if r["noise_scale"] and r["epoch"] <= at["epoch"]]
    print(f"--noise-scale at B = {B0} on 4 simulated ranks: {at['noise_scale']:.0f} at epoch {at['epoch']} "
          f"(step {at['step']}, the target at step {reached}); epochs to there: {upto}; all {len(scales)} epochs: "
          f"min {min(scales):.0f}, median {np.median(scales):.0f}, max {max(scales):.0f}")
    # B_simple over the steps the sweep counts: each epoch's value weighted by its steps before the target
    w, prev = [], 0
    for r in records:
        if r["noise_scale"] and prev < (reached or 0):
            w.append((min(r["step"], reached) - prev, r["noise_scale"]))
        prev = r["step"]
    b_simple = sum(n * v for n, v in w) / sum(n for n, _ in w)
    print(f"B_simple over the {reached} steps to the target (epochs weighted by their steps): {b_simple:.0f}; "
          f"B_crit / B_simple = {b_crit / b_simple:.2f}")
    print("steps ratio S(B) / S(2B): " + ", ".join(f"{B1}->{B2}: {s1 / s2:.2f}"
                                                   for (B1, s1), (B2, s2) in zip(ok, ok[1:])))


if __name__ == "__main__":
    main()
