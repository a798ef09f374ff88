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
from .autotune import BucketTuner, choose_compress
from .checkpoint import CHECKPOINT, restore, save_checkpoint
from .comm import Communicator, DebugComm
from .comm_simulated import run_on
from .config import Config
from .data import shard
from .errors import Stopped, TrainingError
from .evaluate import final_metrics
from .model import Network
from .noise import WARN_FACTOR, NoiseScale, b_simple
from .optim import clip_grad_norm, parts_sqnorm
from .parallel import DataParallel, check_replicas
from .ps import train_ps
from .report import Reporter
from .run import finished_summary, start_run
from .loop import train_loop
from .setup import Setup, agree, checkpoint_points, is_finished, make_optimizer_for, steps_per_epoch
from .stop import stop_requested
from .trace import NULL, Tracer
from .zero import ShardedOptimizer

def check_finite(model: Network, loss, step: int, local_sq=0.0, shard=None, exact=False) -> tuple[float, float, float]:
    """Raise if the gradients hold NaN or Inf; return the step's loss, gradient norm and `local_sq` (the
    squared norm before the allreduce, for --noise-scale) as Python floats.

    They come to the host together, in ONE transfer: the step's only wait for the GPU. After the
    allreduce every rank holds the same gradients, so every rank reaches the same verdict without
    communicating. shard=(comm, grads view): each rank holds the sum of its part only (--shard-optimizer), so
    the squared norms of the parts and their non-finite counts are summed over the ranks: one verdict."""
    xp = model.xp
    grads = model.grads if shard is None else shard[1]
    trio = xp.empty(3, np.float64)
    trio[0] = loss
    # --deterministic: NumPy's float64 sum, the same for every BLAS thread count (a threaded dot splits the sum)
    trio[1] = xp.vdot(grads, grads) if not exact else xp.sum(xp.square(grads, dtype=np.float64))
    trio[2] = local_sq
    loss, sqnorm, local_sq = (float(v) for v in backend.to_numpy(trio))
    sqnorm, finite = (sqnorm, backend.all_finite(grads, sqnorm)) if shard is None else \
        parts_sqnorm(shard[0], grads, sqnorm)
    if not finite:
        raise TrainingError(f"gradients became NaN or Inf at step {step + 1}; "
                            f"the loss is {loss:.4g}; try a lower learning rate")
    return loss, math.sqrt(sqnorm), local_sq


class Allreduce:
    """Allreduce mode's side of the loop (see loop.py): gradients summed in buckets during backward, then
    the same finite check and optimizer step on every rank; rank 0 writes records and checkpoints."""

    identical = True

    def __init__(self, s: Setup, comm: Communicator, optimizer, dp: DataParallel, reporter: Reporter, tuner=None):
        self.s, self.comm, self.world, self.optimizer, self.dp, self.reporter = s, comm, comm, optimizer, dp, reporter
        self.tuner = tuner                 # --bucket-mb auto: autotune.BucketTuner, until it has chosen
        self.span = s.model.tracer.span
        self.path = os.path.join(s.cfg.out, CHECKPOINT)
        self.norm_sum = 0.0                # this epoch's gradient norms, for its record
        self.clipped = 0                   # and the steps whose gradient --clip-grad-norm scaled down
        self.noise = NoiseScale() if s.cfg.noise_scale else None
        dp.measure_local = self.noise is not None
        self.rows, self.warned = (0, 0), False
        # --shard-optimizer after a reduce-scatter: this rank's part of the gradient is the only summed one
        self.shard = (comm, optimizer.grads) if isinstance(optimizer, ShardedOptimizer) and dp.scatter else None

    def denom(self, global_rows: int, my_rows: int) -> int:
        self.rows = (global_rows, my_rows)
        return global_rows                 # a share of the global-batch mean: the allreduce sums the shares

    def backward(self, X, y, denom, accumulate, last, rows, step):
        return self.dp.forward_backward(X, y, denom=denom, accumulate=accumulate, sync=last, rows=rows, step=step)

    def take_wait(self) -> float:
        """Seconds spent in the gradient collectives since the last call (straggler.py)."""
        wait, self.dp.wait_s = self.dp.wait_s, 0.0
        return wait

    def apply(self, loss, step):
        with self.span("finite check"):
            loss, norm, local_sq = check_finite(self.s.model, loss, step, self.dp.local_sq, self.shard,
                                                self.dp.exact is not None)
        self.dp.local_sq = 0.0
        if self.dp.exact is not None:      # the sum of every chunk's loss, on rank 0: the epoch sum stays exact
            loss = self.dp.exact.loss if self.comm.rank == 0 else 0.0
        if self.noise is not None:
            self.noise.add(local_sq, norm * norm, self.rows[1], self.rows[0])
        # By the norm of the averaged gradient, the same on every rank, so replicas stay identical.
        self.clipped += clip_grad_norm(self.s.model.grads if self.shard is None else self.shard[1], norm,
                                       self.s.cfg.clip_grad_norm)
        with self.span("optimizer"):
            self.optimizer.step()
        self.norm_sum += norm              # before clipping
        return loss, True

    def save(self, step, position):
        state = self.optimizer.state_dict() if self.s.cfg.shard_optimizer else None     # every rank sends its shard
        if self.reporter.active:
            with self.span("checkpoint"):
                save_checkpoint(self.path, self.s, self.s.model.state_dict(), state or self.optimizer.state_dict(),
                                step=step, epoch=position[0], batch=position[1])
            self.reporter.saved(step)

    def stop(self, step, position) -> bool:
        with self.span("meet", "wait"):                 # the end of step: see stop.stop_requested
            stop = stop_requested(self.comm)
        # --bucket-mb auto times its trial steps here, where the ranks are lined up
        if self.tuner is not None and self.tuner.choice is None and (why := self.tuner.step_done()):
            self.reporter.print(f"ddp: {why}")
        if stop:
            self.save(step, position)
            raise Stopped.at(step, self.path, self.reporter.active)
        return False

    def epoch_sums(self):
        return self.noise.take() if self.noise is not None else []

    def epoch_extra(self, sums, step, n_steps) -> dict:
        extra = {"lr": self.optimizer.current_lr(), "grad_norm": self.norm_sum / max(n_steps, 1)}
        if self.noise is not None:
            extra["noise_scale"] = b_simple(sums)
        if self.s.cfg.clip_grad_norm:
            extra["clipped_steps"] = self.clipped
        self.norm_sum, self.clipped = 0.0, 0
        return extra

    def end_epoch(self, record, step, position):
        self.reporter.epoch(record)
        ns = record.get("noise_scale")
        if ns and self.s.batch_size > WARN_FACTOR * ns and self.reporter.active and not self.warned:
            self.warned = True
            print(f"ddp: warning: --batch-size {self.s.batch_size} is more than {WARN_FACTOR}x the gradient noise "
                  f"scale ({ns:.0f}): beyond about that size a larger batch barely cuts the steps needed, so most "
                  f"of each step's extra samples are wasted", flush=True)
        self.save(step, position)


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
    spe = steps_per_epoch(cfg, len(train), B)
    # The schedule spans the planned epochs: --max-steps stops a run early without
    # reshaping its learning-rate curve, so stopping and resuming changes nothing.
    def make(params, grads):
        return make_optimizer_for(cfg, params, grads, cfg.epochs * spe)
    optimizer = ShardedOptimizer(make, model.params, model.grads, comm) if cfg.shard_optimizer else \
        make(model.params, model.grads)
    start = (0, 0, 0) if ckpt is None else tuple(agree(comm, restore, ckpt, model, optimizer, cfg.resume))
    if is_finished(cfg, start[0], start[1]):        # only a resumed run: a validated Config has epochs >= 1
        return finished_summary(cfg, start[0], start[1], comm.rank == 0), s
    points, n_total = checkpoint_points(cfg, spe, *start)
    overlap = cfg.overlap == "on" or (cfg.overlap == "auto" and (model.device == "gpu" or cfg.bucket_mb == "auto"))
    compress, why, t_tune = cfg.compress, [], 0.0
    if compress == "auto":                           # timed on this job's ranks, before training: autotune.py
        t_tune = time.perf_counter()
        rows = shard(np.arange(min(B, len(train))), comm.rank, comm.size)
        compress, reason = choose_compress(model, comm, train.inputs(rows, model.xp, model.dtype),
                                           model.targets(train.y[rows]), B, cfg.seed)
        t_tune = time.perf_counter() - t_tune
        why.append(f"--compress auto chose {compress} in {t_tune:.2f} s: {reason}")
    dp = DataParallel(model, comm, bucket_bytes=int(0 if cfg.bucket_mb == "auto" else cfg.bucket_mb * (1 << 20)),
                      overlap=overlap, compress=None if compress == "none" else compress, seed=cfg.seed,
                      error_feedback=cfg.error_feedback, chunks=cfg.chunks if cfg.deterministic else 0,
                      scatter=optimizer.counts if cfg.shard_optimizer and not cfg.deterministic else None)
    tuner = BucketTuner(dp) if cfg.bucket_mb == "auto" and dp.overlap else None     # on the first steps
    if cfg.bucket_mb == "auto" and tuner is None:
        why.append(f"--bucket-mb auto: no buckets, {compress} reduces after backward")
    # After the trials: they are not part of the timeline.
    model.tracer = dp.tracer = tracer = Tracer(comm.rank) if cfg.trace else NULL
    # Rank 0's optimizer state is broadcast with the parameters: replicas start identical (sharded: each
    # rank's part of the state came from the same checkpoint, or starts at zero).
    for name in optimizer.state_names if not cfg.shard_optimizer else ():
        comm.bcast(getattr(optimizer, name), root=0)

    rank0 = comm.rank == 0
    if rank0:
        path = getattr(comm, "gpu_path", None)
        gpu = f", MPI on GPU buffers: {path()}" if model.device == "gpu" and path and comm.size > 1 else ""
        out = f", run folder {cfg.out}" if cfg.out else ""
        threads = backend.thread_note or backend.blas_threads()
        print(f"ddp: {model} on {comm.describe()}, {len(train)} training samples, "
              f"global batch {B}, {n_total} steps{gpu}{out}, BLAS threads {threads}", flush=True)
        for line in why:
            print(f"ddp: {line}", flush=True)
    reporter = Reporter(cfg, rank0, n_total, start[0], s.prep.task, start[0] if ckpt is not None else None)
    if cfg.trace:
        tracer.start(comm)
    try:
        step, epoch, t0, _, reason = train_loop(cfg, s, Allreduce(s, comm, optimizer, dp, reporter, tuner), start,
                                        points, reporter, on_step)
        check_replicas(comm, model.params, step)
    finally:
        reporter.close()
    with tracer.span("evaluate"):
        summary = final_metrics(s, comm, step=step, epoch=epoch, world_size=comm.size, t0=t0, stop_reason=reason)
    summary["allreduce_bytes_per_step"] = dp.bytes_per_step           # what each rank sends into the reductions
    summary["compress"] = compress
    if cfg.compress == "auto":
        summary["autotune_s"] = t_tune                               # the trials' seconds: before elapsed_s began
    if tuner is not None:
        summary["bucket_mb"] = tuner.choice                          # None: the run ended while it was trying
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
    return run_on(comm, cfg.simulate_ranks, _run_mode, cfg, on_step, raw)


def _run_mode(comm: Communicator, cfg: Config, on_step=None, raw=None) -> tuple[dict, Setup]:
    return (train_ps if cfg.mode == "ps" else train_allreduce)(cfg, comm, on_step, raw)
