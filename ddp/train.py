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

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from . import backend
from .comm import Communicator, DebugComm, SerialComm, run_simulated
from .config import Config
from .data import (Dataset, Standardizer, batch_size_for, epoch_batches, load_dataset, micro_batches, shard, split,
                   standardize)
from .errors import TrainingError, UsageError
from .model import MLP
from .optim import Schedule, make_optimizer
from .parallel import DataParallel, check_replicas


# --------------------------------------------------------------------------- set-up

@dataclass
class Setup:
    cfg: Config
    train: Dataset
    val: Dataset
    test: Dataset
    model: MLP
    batch_size: int


def load_data(cfg: Config):
    ds = load_dataset(cfg.dataset, path=cfg.data_path or None, task=cfg.task, n_samples=cfg.n_samples,
                      n_features=cfg.n_features, n_classes=cfg.n_classes, seed=cfg.seed)
    parts = split(ds, cfg.val_fraction, cfg.test_fraction, seed=cfg.seed)
    if not cfg.standardize:
        return parts
    parts = standardize(*parts)
    if ds.task == "regression":
        # Targets in their own units (diabetes: ~150) make MSE gradients huge;
        # training on standardized targets keeps one learning rate good for all
        # datasets. R² does not change under this affine map.
        ys = Standardizer().fit(parts[0].y)
        parts = tuple(dataclasses.replace(p, y=ys.transform(p.y)) for p in parts)
    return parts


def resolve_loss(cfg: Config, ds: Dataset) -> tuple[str, int]:
    """(loss name, number of output units) for this dataset."""
    loss = cfg.loss
    if loss == "auto":
        loss = "softmax_cross_entropy" if ds.task == "classification" else "mse"
    if ds.task == "classification":
        if loss == "mse":
            raise UsageError("loss mse needs a regression dataset; use softmax_cross_entropy or "
                             "binary_cross_entropy for classification")
        if loss == "binary_cross_entropy":
            if ds.n_classes != 2:
                raise UsageError(f"binary_cross_entropy needs 2 classes, dataset {ds.name} has {ds.n_classes}")
            return loss, 1
        return loss, ds.n_classes
    if loss != "mse":
        raise UsageError(f"loss {loss} needs a classification dataset; {ds.name} is regression (use mse)")
    return loss, ds.y.shape[1]


def build(cfg: Config, device_index: int = 0) -> Setup:
    cfg.validate()
    train, val, test = load_data(cfg)
    bs = batch_size_for(cfg.batch_mode, cfg.batch_size, len(train))
    loss, n_out = resolve_loss(cfg, train)
    xp = backend.get_xp(cfg.device)
    if xp is not np:
        backend.use_gpu(device_index % max(backend.gpu_count(), 1))
    model = MLP([train.X.shape[1], *cfg.hidden_sizes(), n_out], activation=cfg.activation, loss=loss,
                init=cfg.init, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
    return Setup(cfg, train, val, test, model, bs)


def make_optimizer_for(cfg: Config, params, grads, total_steps: int):
    sched = Schedule(cfg.schedule, total_steps=total_steps, warmup=cfg.warmup_steps,
                     step_size=cfg.step_size, gamma=cfg.gamma)
    return make_optimizer(cfg.optimizer, params, grads, lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                          betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, schedule=sched)


def steps_per_epoch(cfg: Config, n: int, batch_size: int) -> int:
    return n // batch_size if cfg.drop_last else math.ceil(n / batch_size)


def total_steps(cfg: Config, n: int, batch_size: int) -> int:
    total = cfg.epochs * steps_per_epoch(cfg, n, batch_size)
    return min(total, cfg.max_steps) if cfg.max_steps else total


def agree(comm: Communicator, fn, *args):
    """Run fn on every rank; if it raises UsageError on ANY rank, raise it on all.

    Set-up errors (a checkpoint missing on one node, say) would otherwise leave
    the healthy ranks waiting in the first collective.
    """
    err = None
    try:
        result = fn(*args)
    except UsageError as e:
        err, result = str(e), None
    errs = comm.allgather_obj(err) if comm.size > 1 else [err]
    for r, e in enumerate(errs):
        if e is not None:
            raise UsageError(e if comm.size == 1 else f"{e} (on rank {r})")
    return result


# --------------------------------------------------------------------------- evaluation

def evaluate(model: MLP, ds: Dataset, comm: Communicator, chunk: int = 4096) -> dict:
    """Loss and accuracy (classification) or R² (regression) over `ds`, sharded
    across ranks: each rank evaluates a contiguous slice, and sums are reduced."""
    n = len(ds)
    idx = shard(np.arange(n), comm.rank, comm.size)
    xp = model.xp
    n_out = model.sizes[-1]
    classification = model.loss_name != "mse"
    # [loss sum, correct, sum y, sum y^2, sse] (the last three per output column)
    acc = np.zeros(2 + 3 * n_out)
    for s in range(0, len(idx), chunk):
        rows = idx[s:s + chunk]
        X = xp.asarray(ds.X[rows], model.dtype)
        Z = model.forward(X)
        y = xp.asarray(ds.y[rows]) if classification else xp.asarray(ds.y[rows], model.dtype)
        loss, _ = model.loss_fn(Z, y, denom=1)
        acc[0] += loss
        if classification:
            pred = (Z[:, 0] > 0).astype(np.int64) if n_out == 1 else Z.argmax(axis=1)
            acc[1] += float((pred == y).sum())
        else:
            Yh = backend.to_numpy(Z).astype(np.float64)
            Y = ds.y[rows]
            acc[2:2 + n_out] += Y.sum(0)
            acc[2 + n_out:2 + 2 * n_out] += (Y * Y).sum(0)
            acc[2 + 2 * n_out:] += ((Y - Yh) ** 2).sum(0)
    comm.allreduce_sum(acc)
    if n == 0:
        return {}
    out = {"loss": acc[0] / n}
    if classification:
        out["accuracy"] = acc[1] / n
    else:
        sy, syy, sse = acc[2:2 + n_out], acc[2 + n_out:2 + 2 * n_out], acc[2 + 2 * n_out:]
        sst = syy - sy * sy / n
        out["r2"] = float(np.mean(1 - sse / np.where(sst > 0, sst, 1.0)))
    return out


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, model_state: dict, opt_state: dict, *, step: int, epoch: int, batch: int,
                    cfg: Config) -> None:
    """Write atomically: a crash mid-write never destroys the previous checkpoint."""
    arrays = dict(model_state)
    arrays.update({f"optimizer.{k}": v for k, v in opt_state.items()})
    arrays["step"] = np.array(step, np.int64)
    arrays["epoch"] = np.array(epoch, np.int64)
    arrays["batch_in_epoch"] = np.array(batch, np.int64)
    # Shuffling is a pure function of (seed, epoch), so these two ARE the data RNG state.
    arrays["rng.seed"] = np.array(cfg.seed, np.int64)
    arrays["rng.epoch"] = np.array(epoch, np.int64)
    arrays["config"] = np.array(json.dumps(cfg.to_dict()))
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path} not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:
        raise UsageError(f"checkpoint {path} is corrupt or not an .npz file ({type(e).__name__})") from None
    for key in ("step", "epoch", "batch_in_epoch"):
        if key not in data:
            raise UsageError(f"checkpoint {path} has no {key!r}: not a ddp checkpoint")
    return data


def restore(ckpt: dict, model: MLP, optimizer, path: str, span: tuple[int, int] | None = None
            ) -> tuple[int, int, int]:
    """Load parameters and optimizer state; return (step, epoch, batch_in_epoch).

    span=(start, stop) loads only that slice of each optimizer state array: a parameter
    server's shard (the model itself is always loaded whole, which checks the architecture).
    """
    model.load_state_dict(ckpt)
    opt_state = {k[len("optimizer."):]: v for k, v in ckpt.items() if k.startswith("optimizer.")}
    if "t" not in opt_state:
        raise UsageError(f"checkpoint {path} has no optimizer state")
    if span is not None:
        n = model.num_params
        for name, arr in opt_state.items():
            if name != "t":
                if arr.shape != (n,):
                    raise UsageError(f"checkpoint {path}: optimizer state {name} has shape {arr.shape}, "
                                     f"expected ({n},)")
                opt_state[name] = arr[span[0]:span[1]]
    optimizer.load_state_dict(opt_state)
    return int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])


# --------------------------------------------------------------------------- output

class Reporter:
    """Metrics, progress and summary, written by rank 0 only."""

    def __init__(self, cfg: Config, active: bool, total: int, initial: int, resumed: bool):
        self.active, self.cfg = active, cfg
        self.bar = None
        if not active:
            return
        os.makedirs(cfg.out, exist_ok=True)
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        self.metrics = open(self.metrics_path, "a" if resumed else "w")
        if cfg.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)

    def tick(self, loss):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def epoch(self, record: dict):
        if self.active:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.active:
            self.metrics.close()

    def print(self, msg: str):
        if self.active:
            print(msg, flush=True)


# --------------------------------------------------------------------------- the loop

def all_finite(x) -> bool:
    """No NaN or Inf in x. The squared norm is one fast BLAS pass; only when it is not
    finite (it may overflow on large finite values) is every element checked."""
    xp = backend.get_array_module(x)
    return math.isfinite(float(xp.vdot(x, x))) or bool(xp.isfinite(x).all())


def check_finite(model: MLP, loss: float, step: int) -> None:
    """After the allreduce every rank holds the same gradients, so every rank
    reaches the same verdict here without further communication."""
    if not all_finite(model.grads):
        raise TrainingError(f"gradients became NaN or Inf at step {step + 1}; "
                            f"the loss is {loss:.4g}; try a lower learning rate")


def train_allreduce(cfg: Config, comm: Communicator, on_step=None) -> dict:
    """Train with gradient averaging on `comm`; returns the summary (on every rank).

    on_step(step, model, comm), if given, runs after every optimizer step: tests use it
    to watch the replicas and to inject failures.
    """
    if cfg.debug:
        comm = DebugComm(comm)
    comm.set_timeout(cfg.timeout)
    s = agree(comm, build, cfg, comm.local_rank)
    model, train, B = s.model, s.train, s.batch_size
    xp = model.xp
    n_total = total_steps(cfg, len(train), B)
    # The schedule spans the planned epochs: --max-steps stops a run early without
    # reshaping its learning-rate curve, so stopping and resuming changes nothing.
    optimizer = make_optimizer_for(cfg, model.params, model.grads, cfg.epochs * steps_per_epoch(cfg, len(train), B))
    start_step, start_epoch, start_batch = 0, 0, 0
    if cfg.resume:
        ckpt = agree(comm, load_checkpoint, cfg.resume)
        start_step, start_epoch, start_batch = agree(comm, restore, ckpt, model, optimizer, cfg.resume)
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
        print(f"ddp: {model} on {comm.describe()}, {len(train)} training samples, "
              f"global batch {B}, {n_total} steps{gpu}", flush=True)
    reporter = Reporter(cfg, rank0, n_total, start_step, resumed=bool(cfg.resume))
    X_dev = xp.asarray(train.X, model.dtype)
    y_dev = xp.asarray(train.y) if model.loss_name != "mse" else xp.asarray(train.y, model.dtype)
    step, epoch = start_step, start_epoch
    t0 = time.perf_counter()
    try:
        while epoch < cfg.epochs and not (cfg.max_steps and step >= cfg.max_steps):
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
                    loss += dp.forward_backward(X_dev[mb], y_dev[mb], denom=len(gb), accumulate=j > 0,
                                                sync=j == len(micro) - 1)
                check_finite(model, loss, step)
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
                reporter.tick(loss)
                if on_step is not None:
                    on_step(step, model, comm)
            finished_epoch = nb >= len(batches)
            elapsed_epoch = time.perf_counter() - t_epoch
            tot = np.array([loss_sum])
            comm.allreduce_sum(tot)                         # each rank held its share of each loss
            record = {"epoch": epoch + 1, "step": step, "train_loss": tot[0] / max(n_steps, 1)}
            record.update({f"val_{k}": v for k, v in evaluate(model, s.val, comm).items()})
            record["samples_per_s"] = samples / elapsed_epoch if elapsed_epoch > 0 else 0.0
            record["elapsed_s"] = time.perf_counter() - t0
            if norms is not None:
                record["grad_norms"] = (norms / max(n_steps, 1)).tolist()
            if not math.isfinite(record["train_loss"]):
                raise TrainingError(f"training loss became {record['train_loss']} in epoch {epoch + 1}")
            reporter.epoch(record)
            if finished_epoch:
                epoch, nb = epoch + 1, 0
            if rank0:
                save_checkpoint(os.path.join(cfg.out, "checkpoint.npz"), model.state_dict(),
                                optimizer.state_dict(), step=step, epoch=epoch, batch=nb, cfg=cfg)
            if not finished_epoch:
                break
        check_replicas(comm, model.params, step)
    finally:
        reporter.close()
    summary = {"steps": step, "epochs": epoch, "world_size": comm.size,
               "elapsed_s": time.perf_counter() - t0,
               **{f"test_{k}": v for k, v in evaluate(model, s.test, comm).items()},
               **{f"val_{k}": v for k, v in evaluate(model, s.val, comm).items()}}
    if rank0:
        write_summary(cfg, summary)
    return summary


def write_summary(cfg: Config, summary: dict, extra: str = "") -> None:
    """summary.json and the one-line final report (rank 0 only)."""
    with open(os.path.join(cfg.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    metric = next((k for k in ("test_accuracy", "test_r2") if k in summary), None)
    tail = f", {metric} {summary[metric]:.4f}" if metric else ""
    print(f"ddp: done: {summary['steps']} steps, {summary['epochs']} epochs, {summary['elapsed_s']:.1f} s{tail}"
          f"{extra}, outputs in {cfg.out}", flush=True)


def run(cfg: Config, comm: Communicator | None = None, on_step=None) -> dict:
    """Entry point: pick the communicator and the mode, and train (see train_allreduce for on_step)."""
    cfg.validate()
    if cfg.simulate_ranks:
        if comm is not None and comm.size > 1:
            raise UsageError("--simulate-ranks runs in one process: do not combine it with mpiexec")
        return run_simulated(cfg.simulate_ranks, _run_mode, cfg, on_step)[0]
    return _run_mode(comm or SerialComm(), cfg, on_step)


def _run_mode(comm: Communicator, cfg: Config, on_step=None) -> dict:
    if cfg.mode == "ps":
        from .ps import train_ps
        return train_ps(cfg, comm, on_step)
    return train_allreduce(cfg, comm, on_step)
