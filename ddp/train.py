"""The training loop, the same code for 1 rank, N MPI ranks and N simulated ranks.

    ddp train --dataset digits --hidden 128,64 --lr 0.1 --epochs 20 --out runs/digits
    launch/mpirun.sh -n 4 -- train --dataset digits        # 4 MPI ranks
    ddp train --dataset digits --simulate-ranks 4           # 4 ranks in one process

One optimizer step consumes one GLOBAL batch of --batch-size samples: every
rank draws the same permutation from (seed, epoch), takes its contiguous shard
of each batch, and the gradients are summed with an allreduce after scaling by
the global batch size. So the numbers do not depend on the world size, and
N ranks compute what one rank computes (tests/mpi proves it to 1e-12).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from . import backend
from .checkpoint import CHECKPOINT, restore, save_checkpoint
from .comm import Communicator, DebugComm, SerialComm
from .comm_simulated import run_simulated
from .config import Config
from .data import epoch_batches, micro_batches, shard
from .errors import Stopped, TrainingError, UsageError
from .evaluate import epoch_record, final_metrics
from .model import Network
from .parallel import DataParallel, check_replicas
from .report import Reporter
from .run import finished_summary, start_run
from .setup import Setup, agree, is_finished, make_optimizer_for, steps_per_epoch, total_steps
from .stop import stop_requested
from .trace import NULL, Tracer

# --------------------------------------------------------------------------- the loop

def check_finite(model: Network, loss, step: int) -> float:
    """Raise if the gradients hold NaN or Inf; return the step's loss as a Python float.

    The loss and the gradients' squared norm come to the host together, in ONE
    transfer: the step's only wait for the GPU. After the allreduce every rank holds
    the same gradients, so every rank reaches the same verdict without communicating."""
    xp = model.xp
    pair = xp.empty(2, np.float64)
    pair[0] = loss
    pair[1] = xp.vdot(model.grads, model.grads)
    loss, sqnorm = (float(v) for v in backend.to_numpy(pair))
    if not backend.all_finite(model.grads, sqnorm):
        raise TrainingError(f"gradients became NaN or Inf at step {step + 1}; "
                            f"the loss is {loss:.4g}; try a lower learning rate")
    return loss


def train_allreduce(cfg: Config, comm: Communicator, on_step=None, raw=None) -> tuple[dict, Setup]:
    """Train with gradient averaging on `comm`; returns (summary, setup) on every rank.

    on_step(step, model, comm), if given, runs after every optimizer step: tests use it
    to watch the replicas and to inject failures.
    """
    if cfg.debug:
        comm = DebugComm(comm)
    comm.set_timeout(cfg.timeout)
    s, ckpt = start_run(cfg, comm, raw)
    model, train, B = s.model, s.train, s.batch_size
    model.comm = comm                                # synchronized batch norm sums over it
    xp = model.xp
    n_total = total_steps(cfg, len(train), B)
    # The schedule spans the planned epochs: --max-steps stops a run early without
    # reshaping its learning-rate curve, so stopping and resuming changes nothing.
    optimizer = make_optimizer_for(cfg, model.params, model.grads, cfg.epochs * steps_per_epoch(cfg, len(train), B))
    start_step, start_epoch, start_batch = 0, 0, 0
    if ckpt is not None:
        start_step, start_epoch, start_batch = agree(comm, restore, ckpt, model, optimizer, cfg.resume)
        if is_finished(cfg, start_step, start_epoch):
            return finished_summary(cfg, start_step, start_epoch, comm.rank == 0), s
    tracer = Tracer(comm.rank) if cfg.trace else NULL
    model.tracer = tracer
    overlap = cfg.overlap == "on" or (cfg.overlap == "auto" and model.device == "gpu")
    dp = DataParallel(model, comm, bucket_bytes=int(cfg.bucket_mb * (1 << 20)), overlap=overlap,
                      compress=None if cfg.compress == "none" else cfg.compress)
    # Rank 0's optimizer state is broadcast with the parameters: replicas start identical.
    for name in optimizer.state_names:
        comm.bcast(getattr(optimizer, name), root=0)

    rank0 = comm.rank == 0
    if rank0:
        path = getattr(comm, "gpu_path", None)
        gpu = f", MPI on GPU buffers: {path()}" if model.device == "gpu" and path and comm.size > 1 else ""
        out = f", run folder {cfg.out}" if cfg.out else ""
        threads = backend.thread_note or backend.blas_threads()
        print(f"ddp: {model} on {comm.describe()}, {len(train)} training samples, "
              f"global batch {B}, {n_total} steps{gpu}{out}, BLAS threads {threads}", flush=True)
    reporter = Reporter(cfg, rank0, n_total, start_step, s.prep.task, start_step if ckpt is not None else None)
    ckpt_path = os.path.join(cfg.out, CHECKPOINT)

    def save(step, epoch, nb):
        if reporter.active:
            with tracer.span("checkpoint"):
                save_checkpoint(ckpt_path, s, model.state_dict(), optimizer.state_dict(), step=step, epoch=epoch, batch=nb)
            reporter.saved(step)

    X_dev = xp.asarray(train.X, model.dtype)
    y_dev = xp.asarray(train.y) if model.loss_name != "mse" else xp.asarray(train.y, model.dtype)
    step, epoch = start_step, start_epoch
    span = tracer.span
    if cfg.trace:
        tracer.start(comm)
    t0 = time.perf_counter()
    try:
        while not is_finished(cfg, step, epoch):
            batches = epoch_batches(len(train), B, seed=cfg.seed, epoch=epoch, drop_last=cfg.drop_last)
            first = start_batch if epoch == start_epoch else 0
            loss_sum, n_steps, samples, norms = 0.0, 0, 0, None
            t_epoch = time.perf_counter()
            nb = first                                       # the next batch of this epoch
            while nb < len(batches) and not (cfg.max_steps and step >= cfg.max_steps):
                gb = batches[nb]
                nb += 1
                comm.at_step(step + 1)
                local = shard(gb, comm.rank, comm.size)
                micro = micro_batches(local, cfg.accumulate)
                loss = 0.0
                for j, mb in enumerate(micro):
                    with span("data", rows=len(mb)):
                        Xb, yb = X_dev[mb], y_dev[mb]
                    loss += dp.forward_backward(Xb, yb, denom=len(gb), accumulate=j > 0, sync=j == len(micro) - 1,
                                                rows=mb, step=step)
                with span("finite check"):
                    loss = check_finite(model, loss, step)
                with span("optimizer"):
                    optimizer.step()
                step += 1
                loss_sum += loss
                n_steps += 1
                samples += len(gb)
                if cfg.grad_norms:
                    gn = np.array(model.grad_norms())
                    norms = gn if norms is None else norms + gn
                if cfg.check_every and step % cfg.check_every == 0:
                    check_replicas(comm, model.params, step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and nb < len(batches):
                    save(step, epoch, nb)
                reporter.tick(loss)
                if on_step is not None:
                    on_step(step, model, comm)
                with span("meet", "wait"):                  # the end of step: see stop.stop_requested
                    stop = stop_requested(comm)
                if stop:
                    save(step, *((epoch + 1, 0) if nb >= len(batches) else (epoch, nb)))
                    raise Stopped.at(step, ckpt_path, reporter.active)
            finished_epoch = nb >= len(batches)
            elapsed_epoch = time.perf_counter() - t_epoch
            tot = np.array([loss_sum])
            comm.allreduce_sum(tot)                         # each rank held its share of each loss
            extra = {} if norms is None else {"grad_norms": (norms / max(n_steps, 1)).tolist()}
            with span("evaluate"):
                record = epoch_record(model, s.val, comm, epoch=epoch, step=step, loss_sum=tot[0], n_steps=n_steps,
                                      samples=samples, seconds=elapsed_epoch, t0=t0, finished=finished_epoch,
                                      **extra)
            if not math.isfinite(record["train_loss"]):
                raise TrainingError(f"training loss became {record['train_loss']} in epoch {epoch + 1}")
            reporter.epoch(record)
            if finished_epoch:
                epoch, nb = epoch + 1, 0
            save(step, epoch, nb)
            if not finished_epoch:
                break
        check_replicas(comm, model.params, step)
    finally:
        reporter.close()
    with span("evaluate"):
        summary = final_metrics(s, comm, step=step, epoch=epoch, world_size=comm.size, t0=t0)
    if cfg.trace:
        tracer.merge(comm, cfg.trace)
        summary["trace"] = cfg.trace
    return reporter.summary(summary), s


def run(cfg: Config, comm: Communicator | None = None, on_step=None) -> dict:
    """Entry point: pick the communicator and the mode, and train (see train_allreduce for on_step)."""
    return run_with_setup(cfg, comm, on_step)[0]


def run_with_setup(cfg: Config, comm: Communicator | None = None, on_step=None, raw=None) -> tuple[dict, Setup]:
    """run(), also returning the Setup (the trained model and its preprocessing); raw: in-memory data."""
    cfg.validate()
    if cfg.simulate_ranks:
        if comm is not None and comm.size > 1:
            raise UsageError("--simulate-ranks runs in one process: do not combine it with mpiexec")
        return run_simulated(cfg.simulate_ranks, _run_mode, cfg, on_step, raw)[0]
    return _run_mode(comm or SerialComm(), cfg, on_step, raw)


def _run_mode(comm: Communicator, cfg: Config, on_step=None, raw=None) -> tuple[dict, Setup]:
    if cfg.mode == "ps":
        from .ps import train_ps
        return train_ps(cfg, comm, on_step, raw)
    return train_allreduce(cfg, comm, on_step, raw)
