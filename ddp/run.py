"""The life of a training run, shared by allreduce mode (train.py) and parameter-server mode (ps.py).

    given = {"dataset": "digits", "epochs": 5}          # what the user said (flags, TOML, ddp.fit kwargs)
    cfg = resolve_config(given)                        # + the checkpoint's settings when resuming
    setup = agree(comm, build, cfg, comm.local_rank)   # data, preprocessing, model
    reporter = Reporter(cfg, comm.rank == 0, ...)      # report.py: metrics, epoch lines, best.npz, summary

Everything a run writes lives in its folder (--out): config.toml, metrics.jsonl, checkpoint.npz, best.npz,
summary.json. A checkpoint is self-contained: weights, optimizer state, position in the data, the resolved
configuration, and the preprocessing (input standardization, target standardization, the class labels as
they appeared in the data), so `ddp.load` can use the model on raw rows. It loads with allow_pickle=False.
Only rank 0 writes. A folder that holds a run is never overwritten unless asked (--resume, --overwrite).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from . import backend
from .checkpoint import BEST, CHECKPOINT, check_resume, load_checkpoint, saved_config
from .comm import Communicator
from .config import Config, merge_for_resume
from .data import Dataset, Standardizer, batch_size_for, load_dataset, shard, split
from .errors import UsageError
from .model import Network, network_for
from .optim import Schedule, make_optimizer
from .report import restart_count



class Stopped(Exception):
    """SIGTERM asked the run to stop: a checkpoint was saved at the current step (every rank raises it)."""

    exit_code = 143                      # 128 + SIGTERM, as a shell reports a process ended by it

    @classmethod
    def at(cls, step: int, path: str, writer: bool) -> "Stopped":
        """The exception for a stop at `step`; `writer`: this rank wrote the checkpoint at `path`."""
        where = f" to {path}; resume with: ddp train --resume {path}" if writer else ""
        return cls(f"stopped by SIGTERM at step {step}; checkpoint saved{where}")


_signal = {"got": None}


def handle_sigterm() -> None:
    """From now on SIGTERM (Slurm's time limit, docker stop, kill) stops training at the end of the current
    step with a checkpoint, instead of killing it mid-epoch. The CLI calls this; library use does not."""
    import signal

    def note(signum, frame):
        _signal["got"] = signum
    signal.signal(signal.SIGTERM, note)


def got_sigterm() -> bool:
    """Whether this process got SIGTERM since handle_sigterm()."""
    return _signal["got"] is not None


def stop_requested(comm: Communicator) -> bool:
    """The ranks meet at the end of every step, in a 1-number allreduce: whether any rank got SIGTERM (they
    must stop at the same step).

    They meet even when nothing can send SIGTERM (library use), for speed: a blocking allreduce returns
    while this rank's last sends may still sit in its kernel's socket and link queue. A rank that starts
    the next step's rendezvous before they drain gets its peer's go-ahead queued behind them, and a 2-host
    ring then runs one direction at a time. This tiny message travels behind those bytes, so the ranks
    leave it with empty queues and in step: a 2-host step at 1 Gbit/s took 46.0 ms without it and 26.3 ms
    with it (benchmarks/RESULTS.md, the cost model's check); on one node it costs a few microseconds.
    """
    stop = got_sigterm()
    if comm.size == 1:
        return stop
    flag = np.array([1.0 if stop else 0.0])
    comm.allreduce_sum(flag)
    return bool(flag[0])


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
            raise UsageError(e if comm.size == 1 or all(x == e for x in errs) else f"{e} (on rank {r})")
    return result


# --------------------------------------------------------------------------- preprocessing

@dataclass
class Preprocess:
    """What turns raw rows into the model's inputs, and its outputs back into labels or units.

    x: the training set's per-feature mean and std (identity without --standardize).
    y: the same for regression targets (training runs on standardized targets).
    classes: the label each output index stands for, as it appeared in the data (numbers or strings).
    """
    task: str
    x: Standardizer
    y: Standardizer | None = None
    classes: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return int(self.x.mean.shape[0])

    def inputs(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.dtype.kind not in "biuf":
            raise UsageError(f"inputs must be a 2-D numeric array, got shape {X.shape} of {X.dtype}")
        if X.shape[1] != self.n_features:
            raise UsageError(f"inputs have {X.shape[1]} features, the model was trained on {self.n_features}")
        X = X.astype(np.float64)
        if not np.isfinite(X).all():
            raise UsageError(f"inputs contain NaN or Inf ({np.count_nonzero(~np.isfinite(X))} values)")
        return self.x.transform(X)

    def encode(self, y) -> np.ndarray:
        """Raw labels -> class indices (classification), or targets -> standardized (n, k) (regression)."""
        y = np.asarray(y)
        if self.task == "regression":
            y = y.astype(np.float64).reshape(len(y), -1)
            return self.y.transform(y) if self.y is not None else y
        y = y.reshape(-1)
        if y.dtype.kind == "f" and self.classes.dtype.kind in "iu" and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        if y.dtype.kind in "US" and self.classes.dtype.kind not in "US":
            raise UsageError(f"labels are strings, but the model's classes are {self.classes.tolist()[:10]}")
        idx = np.searchsorted(self.classes, y)
        idx = np.minimum(idx, len(self.classes) - 1)
        unknown = self.classes[idx] != y
        if unknown.any():
            raise UsageError(f"label {y[unknown][0]!r} was not among the training classes "
                             f"{self.classes.tolist()[:10]}")
        return idx.astype(np.int64)

    def decode(self, Z) -> np.ndarray:
        """Model outputs (n, k) -> labels (classification) or targets in their own units (regression)."""
        if self.task == "regression":
            out = self.y.inverse(Z) if self.y is not None else Z
            return out[:, 0] if out.shape[1] == 1 else out
        idx = (Z[:, 0] > 0).astype(np.int64) if Z.shape[1] == 1 else Z.argmax(axis=1)
        return self.classes[idx]

    def arrays(self) -> dict:
        out = {"data.x_mean": self.x.mean, "data.x_std": self.x.std}
        if self.y is not None:
            out.update({"data.y_mean": self.y.mean, "data.y_std": self.y.std})
        if self.classes is not None:
            out["data.classes"] = self.classes
        return out

    @classmethod
    def from_arrays(cls, ckpt: dict, task: str, path: str) -> "Preprocess":
        for key in ("data.x_mean", "data.x_std"):
            if key not in ckpt:
                raise UsageError(f"checkpoint {path} has no {key!r}: it was written before ddp saved its "
                                 "preprocessing (format 1); retrain to use it on raw data")
        y = None
        if "data.y_mean" in ckpt:
            y = Standardizer.from_stats(ckpt["data.y_mean"], ckpt["data.y_std"])
        classes = ckpt.get("data.classes")
        if task == "classification" and classes is None:
            raise UsageError(f"checkpoint {path} has no class labels (data.classes)")
        return cls(task, Standardizer.from_stats(ckpt["data.x_mean"], ckpt["data.x_std"]), y, classes)


# --------------------------------------------------------------------------- set-up

@dataclass
class Setup:
    cfg: Config
    train: Dataset
    val: Dataset
    test: Dataset
    model: Network
    batch_size: int
    prep: Preprocess
    fingerprint: str


def raw_splits(cfg: Config) -> tuple[Dataset, Dataset, Dataset]:
    """The configured dataset, split into (train, val, test) before any scaling."""
    ds = load_dataset(cfg.dataset, path=cfg.data_path or None, task=cfg.task, n_samples=cfg.n_samples,
                      n_features=cfg.n_features, n_classes=cfg.n_classes, seed=cfg.seed)
    return split(ds, cfg.val_fraction, cfg.test_fraction, seed=cfg.seed)


def load_data(cfg: Config, raw=None):
    """(train, val, test, Preprocess): standardized with the training set's statistics only.

    raw: (train, val, test) Datasets already in memory (ddp.fit), instead of loading cfg.dataset.
    """
    parts = raw if raw is not None else raw_splits(cfg)
    train = parts[0]
    xs = Standardizer().fit(train.X) if cfg.standardize else Standardizer.from_stats(
        np.zeros(train.X.shape[1]), np.ones(train.X.shape[1]))
    ys = None
    if train.task == "regression" and cfg.standardize:
        # Targets in their own units (diabetes: ~150) make MSE gradients huge; training on standardized
        # targets keeps one learning rate good for all datasets. R² does not change under this affine map.
        ys = Standardizer().fit(train.y)
    prep = Preprocess(train.task, xs, ys, train.classes)
    out = tuple(dataclasses.replace(p, X=xs.transform(p.X), y=ys.transform(p.y) if ys else p.y) for p in parts)
    return (*out, prep)


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


def fingerprint(ds: Dataset) -> str:
    """A digest of the training rows: a resumed run must see the data its checkpoint was trained on."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(ds.X).tobytes())
    h.update(np.ascontiguousarray(ds.y).tobytes())
    return h.hexdigest()


def build(cfg: Config, device_index: int = 0, raw=None) -> Setup:
    cfg.validate()
    train, val, test, prep = load_data(cfg, raw)
    bs = batch_size_for(cfg.batch_mode, cfg.batch_size, len(train))
    loss, n_out = resolve_loss(cfg, train)
    xp = backend.get_xp(cfg.device)
    if xp is not np:
        backend.use_gpu(device_index % max(backend.gpu_count(), 1))
    model = network_for(cfg, train, loss, n_out)
    return Setup(cfg, train, val, test, model, bs, prep, fingerprint(train))


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


def is_finished(cfg: Config, step: int, epoch: int) -> bool:
    return epoch >= cfg.epochs or bool(cfg.max_steps and step >= cfg.max_steps)


def all_finite(x, sqnorm=None) -> bool:
    """No NaN or Inf in x. The squared norm is one fast BLAS pass (pass it in when it is
    already on the host); only when it is not finite (it may overflow on large finite
    values) is every element checked."""
    xp = backend.get_array_module(x)
    if sqnorm is None:
        sqnorm = float(xp.vdot(x, x))
    return math.isfinite(sqnorm) or bool(xp.isfinite(x).all())


# --------------------------------------------------------------------------- evaluation

def evaluate(model: Network, ds: Dataset, comm: Communicator, chunk: int = 4096) -> dict:
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
        acc[0] += float(loss)
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


def epoch_record(model: Network, val: Dataset, comm: Communicator, *, epoch: int, step: int, loss_sum: float,
                 n_steps: int, samples: int, seconds: float, t0: float, finished: bool, **extra) -> dict:
    """One line of metrics.jsonl, the same in both modes: epoch (1-based), step, the mean training loss
    (loss_sum already summed over ranks), val_* metrics, samples/s over the epoch's `seconds`, elapsed_s
    since t0, then `extra`, and "partial" when the epoch was cut short."""
    record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(n_steps, 1)}
    record.update({f"val_{k}": v for k, v in evaluate(model, val, comm).items()})
    record["samples_per_s"] = samples / seconds if seconds > 0 else 0.0
    record["elapsed_s"] = time.perf_counter() - t0
    record.update(extra)
    if not finished:
        record["partial"] = True
    return record


def final_metrics(s: Setup, comm: Communicator, *, step: int, epoch: int, world_size: int, t0: float) -> dict:
    """The summary's figures, the same in both modes: steps, epochs, world size, time, test_* and val_*."""
    return {"steps": step, "epochs": epoch, "world_size": world_size, "elapsed_s": time.perf_counter() - t0,
            **{f"test_{k}": v for k, v in evaluate(s.model, s.test, comm).items()},
            **{f"val_{k}": v for k, v in evaluate(s.model, s.val, comm).items()}}


def start_run(cfg: Config, comm: Communicator, raw=None):
    """Set-up shared by both modes, agreed by every rank: the data and model built, the checkpoint (if
    resuming) checked against them, then the run folder checked (rank 0) before anything is written.
    Returns (setup, checkpoint or None)."""
    s = agree(comm, build, cfg, comm.local_rank, raw)

    def load():
        if not cfg.resume:
            return None
        ckpt = load_checkpoint(cfg.resume)
        check_resume(ckpt, s, cfg.resume)
        return ckpt
    ckpt = agree(comm, load)
    # Last, once every input has been checked: --overwrite clears the folder here, so bad input never costs
    # the user the run it would have replaced.
    agree(comm, lambda: prepare_out(cfg) if comm.rank == 0 and cfg.out else None)
    return s, ckpt


# --------------------------------------------------------------------------- the run's configuration and folder

def resolve_config(given: dict) -> Config:
    """The configuration of a run from the settings the user gave (flags/TOML/kwargs).

    With resume, the checkpoint's saved configuration is the base and `given` may only change run settings
    (config.RUN_SETTINGS); --out defaults to the checkpoint's folder. Under launch/mpirun.sh --max-restarts
    (DDP_RESTART >= 1), a relaunched job resumes from its folder's checkpoint when there is one.
    """
    given = dict(given)
    restart = restart_count()
    if restart and not given.get("resume"):
        out = given.get("out") or latest_auto_out(Config(**{k: v for k, v in given.items() if k != "out"}))
        if out and os.path.exists(os.path.join(out, CHECKPOINT)):
            given.update(resume=os.path.join(out, CHECKPOINT), out=out)
    path = given.get("resume")
    if not path:
        return Config(**given).validate()
    saved = saved_config(path)
    values = merge_for_resume(saved, given, path)
    if not given.get("out"):
        values["out"] = os.path.dirname(os.path.abspath(path))
    values["overwrite"] = False
    return Config(**values).validate()


def auto_out(cfg: Config) -> str:
    """runs/DATASET, or the first runs/DATASET-N that holds no run yet."""
    base = os.path.join("runs", cfg.dataset)
    n, path = 1, base
    while os.path.exists(os.path.join(path, CHECKPOINT)):
        n += 1
        path = f"{base}-{n}"
    return path


def latest_auto_out(cfg: Config) -> str | None:
    """The newest existing runs/DATASET[-N] (a restarted job goes back to the folder it made)."""
    base = os.path.join("runs", cfg.validate().dataset)
    found, n = None, 1
    while os.path.isdir(base if n == 1 else f"{base}-{n}"):
        found = base if n == 1 else f"{base}-{n}"
        n += 1
    return found


def prepare_out(cfg: Config) -> None:
    """Check the run folder before anything is written (rank 0). Refuses to start a new run over one."""
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder")
    ckpt = os.path.join(out, CHECKPOINT)
    if os.path.exists(ckpt) and not cfg.resume and not cfg.overwrite:
        raise UsageError(f"{out} already holds a run ({ckpt}); continue it with --resume {ckpt}, replace it "
                         "with --overwrite, or choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".ddp-write-test-{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("x")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
    if cfg.overwrite and not cfg.resume:
        for name in (CHECKPOINT, BEST, "metrics.jsonl", "summary.json"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))


def finished_summary(cfg: Config, step: int, epoch: int, reporter_active: bool) -> dict:
    """Resuming a run that already reached its end: say so, train nothing, touch nothing."""
    if reporter_active:
        print(f"ddp: the run in {cfg.out} already finished at step {step} (epoch {epoch} of {cfg.epochs}"
              f"{f', max steps {cfg.max_steps}' if cfg.max_steps else ''}); nothing to do. To train further, "
              f"resume with a larger --epochs (or --max-steps).", flush=True)
    path = os.path.join(cfg.out, "summary.json")
    try:
        with open(path) as fh:
            summary = json.load(fh)
    except (OSError, ValueError):
        summary = {"steps": step, "epochs": epoch}
    summary["already_finished"] = True
    return summary
