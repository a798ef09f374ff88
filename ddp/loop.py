"""The one training loop: allreduce mode and every ps consistency, on 1 rank, N MPI ranks or N simulated ranks.

Every rank draws the same permutation from (seed, epoch), takes its contiguous shard of each global batch and
runs forward and backward on it in --accumulate micro-batches. What the modes do differently sits behind a
small synchronization object, `sync` (train.Allreduce, ps_worker.Worker):

    comm, world                   the data-parallel ranks (shards, epoch sums, replica checks); the whole job
    identical                     whether every replica holds the same weights after each step
    denom(global_rows, my_rows)   what the loss is averaged over
    backward(X, y, denom, accumulate, last, rows, step) -> loss    one micro-batch; `last` starts the exchange
    apply(loss, step) -> (loss share for the epoch sum, ok)         the exchange finished and the update taken
    save(step, position)          a checkpoint inside an epoch (--checkpoint-every); ps workers get no points
    stop(step, position) -> bool  end of step: stop here? (SIGTERM)
    epoch_sums() / epoch_extra(sums, step, n_steps)                 mode figures of an epoch's record
    end_epoch(record, step, position)                               the record written, the epoch's checkpoint
    take_wait() -> seconds in collectives since the last call       optional: the straggler table's "wait"

The checkpoint schedule is setup.checkpoint_points, computed once: the servers save at exactly those steps.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .config import Config
from .data import chunk_shard, epoch_batches, micro_batches, shard
from .errors import TrainingError
from .evaluate import epoch_record
from .parallel import check_replicas
from .report import reporter_key
from .setup import Setup, is_finished
from .stop import EarlyStopping
from .straggler import PHASES, PhaseClock, find


def train_loop(cfg: Config, s: Setup, sync, start: tuple, points: dict, reporter, on_step=None) -> tuple:
    """Train from start = (step, epoch, batch in epoch) until the run is finished or stopped.
    Returns (step, epoch, t0, stopped, why early stopping ended it or None). Raises TrainingError on every rank of sync.comm together."""
    model, train, B, comm = s.model, s.train, s.batch_size, sync.comm
    span = model.tracer.span
    y_dev = model.targets(train.y)
    step, epoch, first = start
    stopped, early = False, EarlyStopping(cfg, reporter_key(cfg, s.prep.task))
    clock, so_far = PhaseClock(), None                       # straggler.py: seconds per phase on this rank
    take_wait = getattr(sync, "take_wait", lambda: 0.0)      # ps workers do not tell their waits apart
    t0 = time.perf_counter()
    while not is_finished(cfg, step, epoch):
        batches = epoch_batches(len(train), B, seed=cfg.seed, epoch=epoch, drop_last=cfg.drop_last)
        nb = first if epoch == start[1] else 0               # the next batch of this epoch
        loss_sum, n_steps, samples, norms, failed = 0.0, 0, 0, None, False
        t_epoch = time.perf_counter()
        clock.mark()
        while nb < len(batches) and not (cfg.max_steps and step >= cfg.max_steps):
            gb = batches[nb]
            nb += 1
            sync.world.at_step(step + 1)
            # --deterministic: fixed chunks, whatever the world size (exact.py)
            micro = chunk_shard(gb, comm.rank, comm.size, cfg.chunks) if cfg.deterministic else \
                micro_batches(shard(gb, comm.rank, comm.size), cfg.accumulate)
            denom = sync.denom(len(gb), sum(map(len, micro)))
            loss = 0.0
            for j, mb in enumerate(micro):
                with span("data", rows=len(mb)):
                    Xb, yb = train.inputs(mb, model.xp, model.dtype), y_dev[mb]
                clock.lap("data")
                loss += sync.backward(Xb, yb, denom, j > 0, j == len(micro) - 1, mb, step)
                clock.lap("compute", take_wait())
            loss, ok = sync.apply(loss, step)
            clock.lap("optimizer")
            step += 1
            loss_sum += loss
            n_steps += 1
            samples += len(gb)
            if not ok:                         # ps: a server could not apply it; the verdict is the epoch's
                failed = True
                break
            if cfg.grad_norms and sync.identical:
                gn = np.array(model.grad_norms())
                norms = gn if norms is None else norms + gn
            if sync.identical and cfg.check_every and step % cfg.check_every == 0:
                check_replicas(comm, model.params, step)
            here = (epoch + 1, 0) if nb >= len(batches) else (epoch, nb)
            if step in points and here[1] and not (cfg.max_steps and step >= cfg.max_steps):
                sync.save(step, here)          # inside the epoch; its end is saved below, after its record
            reporter.tick(loss)
            if on_step is not None:
                on_step(step, model, comm)
            clock.mark()
            if sync.stop(step, here):
                stopped = True
                break
            clock.lap("wait")
        finished = nb >= len(batches)
        seconds = time.perf_counter() - t_epoch
        # Every rank of comm reaches this point, failed or not, so the verdicts below are collective.
        sums = sync.epoch_sums()
        tot = np.concatenate([[loss_sum, float(failed), *sums], clock.row(comm.rank, comm.size)])
        comm.allreduce_sum(tot)                              # each rank held its share of each loss
        extra = sync.epoch_extra(tot[2:2 + len(sums)], step, n_steps)
        if comm.size > 1 and sync.identical and not cfg.simulate_ranks:     # threads of one process share a GIL
            table = tot[2 + len(sums):].reshape(comm.size, len(PHASES))
            so_far = table if so_far is None else so_far + table     # chronic: judged on every epoch so far
            extra["straggler"], extra["phase_s"] = find(so_far), np.round(table, 4).tolist()
        if tot[1]:
            raise TrainingError(f"gradients became NaN or Inf by step {extra.pop('last_step', step)}; lower the "
                                f"learning rate (now {cfg.lr:g}, {model.dtype.name})")
        extra.pop("last_step", None)
        if norms is not None:
            extra["grad_norms"] = (norms / max(n_steps, 1)).tolist()
        with span("evaluate"):
            record = epoch_record(model, s.val, comm, epoch=epoch, step=step, loss_sum=tot[0], n_steps=n_steps,
                                  samples=samples, seconds=seconds, t0=t0, finished=finished, **extra)
        if not math.isfinite(record["train_loss"]):
            raise TrainingError(f"training loss became {record['train_loss']} in epoch {epoch + 1}")
        if finished:
            epoch, nb = epoch + 1, 0
        sync.end_epoch(record, step, (epoch, nb))
        if stopped or not finished or early(record):    # every rank holds the same record
            break
    return step, epoch, t0, stopped, early.reason
