"""Set-up of a run, the same in every mode: the data, the model, the optimizer and the step arithmetic,
agreed by every rank (a set-up error on one rank is raised on all).

    setup = agree(comm, build, cfg, comm.local_rank)     # Setup: data splits, model, batch size, preprocessing
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import numpy as np

from . import backend
from .comm import Communicator, SerialComm
from .config import FILE_FORMATS, Config
from .data import Dataset, Standardizer, batch_size_for, fit_scale, load_dataset, load_files, split
from .errors import UsageError
from .model import Network, network_for
from .optim import Schedule, make_optimizer
from .preprocess import Preprocess


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
    errs = comm.allgather_obj(err)
    for r, e in enumerate(errs):
        if e is not None:
            raise UsageError(e if all(x == e for x in errs) else f"{e} (on rank {r})")
    return result


def raw_splits(cfg: Config) -> tuple[Dataset, Dataset, Dataset]:
    """The configured dataset as (train, val, test) before any scaling: --val-path and --test-path files as
    they are, and the fractions cut from --data-path only the sets not given."""
    if cfg.dataset in FILE_FORMATS:
        ds, val, test = load_files(cfg.dataset, [cfg.data_path, cfg.val_path, cfg.test_path], cfg.task)
    else:
        ds, val, test = load_dataset(cfg.dataset, task=cfg.task, n_samples=cfg.n_samples,
                                     n_features=cfg.n_features, n_classes=cfg.n_classes, seed=cfg.seed), None, None
    cut = split(ds, 0 if val else cfg.val_fraction, 0 if test else cfg.test_fraction, seed=cfg.seed)
    return cut[0], cut[1] if val is None else val, cut[2] if test is None else test


def load_data(cfg: Config, raw=None, comm: Communicator | None = None):
    """(train, val, test, Preprocess): every split scaled, as its rows are read, with the training set's
    statistics only (data.fit_scale: one pass over the training rows, sharded across the ranks of `comm`).

    raw: (train, val, test) Datasets already in memory (ddp.fit), instead of loading cfg.dataset.
    """
    comm = comm or SerialComm()
    files = [p for path in (cfg.data_path, cfg.val_path, cfg.test_path) for p in path.split(",") if os.path.isfile(p)]
    size = sum(os.path.getsize(p) for p in files) if raw is None else 0
    if size > 1 << 26 and comm.rank == 0:           # a log is never silent for long before the first epoch
        print(f"ddp: reading {size / 1e6:,.0f} MB of data ({', '.join(files)})", flush=True)
    parts = raw if raw is not None else agree(comm, raw_splits, cfg)
    train = parts[0]
    xs = fit_scale(train, cfg.scale, comm)
    # Targets in their own units (diabetes: ~150) make MSE gradients huge; training on standardized
    # targets keeps one learning rate good for all datasets. R² does not change under this affine map.
    ys = Standardizer().fit(train.y) if train.task == "regression" and cfg.scale != "none" else None
    prep = Preprocess(train.task, xs, ys, train.classes)
    return (*(dataclasses.replace(p, scale=xs, y=ys.transform(p.y) if ys else p.y) for p in parts), prep)


@dataclasses.dataclass
class Setup:
    cfg: Config
    train: Dataset
    val: Dataset
    test: Dataset
    model: Network
    batch_size: int
    prep: Preprocess
    fingerprint: str


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
    """A digest of the training data: a resumed run must see the data its checkpoint was trained on. Its
    shape and labels, and up to 8,192 rows spread over it: a changed file is caught without reading it whole."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((len(ds), ds.data.shape[1:], ds.data.dtype.str)).encode())
    sample = np.unique(np.linspace(0, len(ds) - 1, 8192).astype(np.int64))
    for s in range(0, len(sample), 512):
        h.update(ds.take(sample[s:s + 512]))
    h.update(np.ascontiguousarray(ds.y).tobytes())
    return h.hexdigest()


def build(cfg: Config, device_index: int = 0, raw=None, comm: Communicator | None = None) -> Setup:
    """The data, the model and the batch size of `cfg` (validated here too: train_allreduce and train_ps may be
    called directly)."""
    cfg.validate()
    train, val, test, prep = load_data(cfg, raw, comm)
    bs = batch_size_for(cfg.batch_mode, cfg.batch_size, len(train))
    loss, n_out = resolve_loss(cfg, train)
    if cfg.early_stopping and not len(val):
        raise UsageError("--early-stopping needs validation data: --val-fraction > 0 (or X_val, y_val)")
    if backend.get_xp(cfg.device) is not np:
        backend.use_gpu(device_index % max(backend.gpu_count(), 1))
    model = network_for(cfg, train, loss, n_out)
    return Setup(cfg, train, val, test, model, bs, prep, fingerprint(train))


def make_optimizer_for(cfg: Config, params, grads, total_steps: int):
    sched = Schedule(cfg.schedule, total_steps=total_steps, warmup=cfg.warmup_steps,
                     step_size=cfg.step_size, gamma=cfg.gamma)
    return make_optimizer(cfg.optimizer, params, grads, lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                          betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, schedule=sched, exact=cfg.deterministic)


def steps_per_epoch(cfg: Config, n: int, batch_size: int) -> int:
    return n // batch_size if cfg.drop_last else math.ceil(n / batch_size)


def is_finished(cfg: Config, step: int, epoch: int) -> bool:
    return epoch >= cfg.epochs or bool(cfg.max_steps and step >= cfg.max_steps)


def checkpoint_points(cfg: Config, spe: int, step: int, epoch: int, batch: int) -> tuple[dict, int]:
    """The checkpoint schedule, computed once for every mode: the steps after which the loop (loop.py) writes a
    checkpoint, starting from (step, epoch, batch): {step: (epoch, batch_in_epoch) as saved}, and the last step.
    The ps servers checkpoint at exactly these steps without being told."""
    points = {}
    every = cfg.checkpoint_every
    while epoch < cfg.epochs and not (cfg.max_steps and step >= cfg.max_steps):
        n = min(spe - batch, cfg.max_steps - step) if cfg.max_steps else spe - batch
        if every:                             # --checkpoint-every inside the epoch (its end is saved anyway)
            for k in range(step // every + 1, (step + n - 1) // every + 1):
                points[k * every] = (epoch, batch + k * every - step)
        step, batch = step + n, batch + n
        if batch < spe:                       # stopped by --max-steps inside the epoch
            points[step] = (epoch, batch)
            break
        epoch, batch = epoch + 1, 0
        points[step] = (epoch, 0)
    return points, step


def position(spe: int, start: tuple, step: int) -> tuple[int, int]:
    """(epoch, batch in epoch) as saved at `step`, for a run that started at start = (step, epoch, batch)."""
    done = step - start[0] + start[2]
    return start[1] + done // spe, done % spe
