"""`ddp lr-find`: the learning-rate range test (Smith 2017; fastai's lr_find), on any number of ranks.

    ddp lr-find --dataset digits --hidden 128,64 --momentum 0.9 --out runs/lr-find
    launch/mpirun.sh -n 4 -- lr-find --dataset digits --steps 200

Step k trains one global batch at lr_min * (lr_max / lr_min) ** (k / (steps - 1)) and records its loss, until
--steps or until the smoothed loss passes 4x its lowest. The loss decided on is the global batch's, summed over
the ranks, so every rank takes the same steps and none can leave while another waits in a collective. Every
mode runs it with gradient averaging (a synchronous parameter server computes the same gradients).
"""
from __future__ import annotations

import itertools
import math
import os

import numpy as np

from .comm import Communicator
from .comm_simulated import run_on
from .config import Config
from .data import epoch_batches, shard
from .errors import UsageError
from .optim import clip_grad_norm
from .parallel import DataParallel
from .setup import agree, build, make_optimizer_for

BETA, EXPLODE = 0.9, 4.0            # smoothing (debiased EMA) and fastai's divergence rule


def lr_find(cfg: Config, comm: Communicator | None, steps=100, lr_min=1e-7, lr_max=10.0) -> dict:
    """Run the range test; returns {"lr": [...], "loss": [...], "smoothed": [...], "suggestion": lr} on every rank."""
    if not (0 < lr_min < lr_max and math.isfinite(lr_max)) or steps < 2:
        raise UsageError(f"lr-find needs 0 < --lr-min < --lr-max and --steps >= 2, got {lr_min:g}, {lr_max:g}, {steps}")
    return run_on(comm, cfg.simulate_ranks, _find, cfg, steps, lr_min, lr_max)


def _find(comm, cfg, steps, lr_min, lr_max):
    comm.set_timeout(cfg.timeout)                  # a rank that stops waiting ends the job: --timeout
    s = agree(comm, build, cfg, comm.local_rank)
    model, train, B = s.model, s.train, s.batch_size
    xp = model.xp
    dp = DataParallel(model, comm, overlap=False)
    opt = make_optimizer_for(cfg, model.params, model.grads, steps)
    opt.lr, opt.schedule = lr_min, lambda t: (lr_max / lr_min) ** (min(t, steps - 1) / (steps - 1))
    y = model.targets(train.y)
    lrs, losses, smoothed, avg = [], [], [], 0.0
    epochs = (epoch_batches(len(train), B, seed=cfg.seed, epoch=e, drop_last=cfg.drop_last) for e in itertools.count())
    for gb in itertools.chain.from_iterable(epochs):       # the global batches, epoch after epoch, until a break
        comm.at_step(len(lrs) + 1)
        local = shard(gb, comm.rank, comm.size)
        Xb = train.inputs(local, xp, model.dtype)
        loss = np.array([float(dp.forward_backward(Xb, y[local], denom=len(gb), rows=local, step=len(lrs)))])
        comm.allreduce_sum(loss)                   # the global batch's loss: the same number on every rank
        lrs.append(opt.current_lr())
        losses.append(float(loss[0]))
        avg = BETA * avg + (1 - BETA) * losses[-1]
        smoothed.append(avg / (1 - BETA ** len(lrs)))
        if not math.isfinite(smoothed[-1]) or smoothed[-1] > EXPLODE * min(smoothed) or len(lrs) == steps:
            break
        if cfg.clip_grad_norm:                     # the range test steps as training will
            clip_grad_norm(model.grads, math.sqrt(float(xp.vdot(model.grads, model.grads))), cfg.clip_grad_norm)
        opt.step()
    return {"lr": lrs, "loss": losses, "smoothed": smoothed, "suggestion": suggest(lrs, smoothed),
            "exploded": len(lrs) < steps or not math.isfinite(smoothed[-1])}


def suggest(lrs, smoothed) -> float:
    """The lr of the steepest fall of the smoothed loss against log(lr), up to its minimum."""
    sm = np.array(smoothed, np.float64)
    sm[~np.isfinite(sm)] = np.inf
    stop = int(np.argmin(sm)) + 1
    if stop < 3:
        return float(lrs[0])
    slope = np.gradient(sm[:stop], np.log(lrs[:stop]))
    return float(lrs[int(np.argmin(slope))])


def write(result: dict, out: str) -> list[str]:
    """lr_find.csv, and lr_find.png when matplotlib is installed (rank 0). Returns the files written."""
    os.makedirs(out, exist_ok=True)
    csv = os.path.join(out, "lr_find.csv")
    np.savetxt(csv, np.column_stack([result["lr"], result["loss"], result["smoothed"]]), delimiter=",",
               header="lr,loss,smoothed_loss", comments="", fmt="%.9g")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [csv]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result["lr"], result["loss"], alpha=0.3, label="loss")
    ax.plot(result["lr"], result["smoothed"], label="smoothed loss")
    ax.axvline(result["suggestion"], color="k", ls="--", label=f"suggestion {result['suggestion']:.3g}")
    if finite := [v for v in result["smoothed"] if math.isfinite(v)]:
        ax.set_ylim(0, 1.1 * max(finite[:int(np.argmin(finite)) + 1]))      # up to the minimum; losses >= 0
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    ax.legend()
    png = os.path.join(out, "lr_find.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [csv, png]
