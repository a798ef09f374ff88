"""Checkpoints: one .npz file holds everything a run needs to resume and a model needs to be used.

    save_checkpoint(path, setup, model.state_dict(), optimizer.state_dict(), step=s, epoch=e, batch=b)
    ckpt = load_checkpoint(path)        # checked: fields, kinds, finite weights; config and meta as dicts
    restore(ckpt, model, optimizer, path)

Arrays: layers.i.W and layers.i.b, optimizer.*, step, epoch, batch_in_epoch, rng.seed, rng.epoch, and the
preprocessing data.x_mean, data.x_std (data.y_mean, data.y_std for regression, data.classes for
classification), layers.k.running_mean/_var for batch norm; config (the resolved configuration) and meta
(architecture: arch and input_shape, or the MLP's sizes and activation; task, ddp version, data
fingerprint) as JSON strings. Nothing is pickled: np.load(path, allow_pickle=False) reads it.

Every file of a run folder is written by write_file: atomic and durable (fsynced, then renamed, then the folder
fsynced), so after a crash or an I/O error the disk holds the old file or the new one, and a run never reports a
step it has not made durable.
"""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from .config import merge_for_resume
from .errors import TrainingError, UsageError, regular_file
from .version import __version__

CHECKPOINT, BEST = "checkpoint.npz", "best.npz"
FORMAT = 2                       # checkpoint format: 2 added meta and data.* (preprocessing)


class WriteError(TrainingError):
    """An OSError writing a run's file (disk full, read-only, I/O error): one line, exit 1."""


def write_file(path: str, write) -> None:
    """write(fh) fills a binary file that then replaces `path` atomically and durably. The temporary name
    is this process's and created exclusively, and rename replaces a symlink rather than writing through it."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)      # a rename is durable only once its folder is
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)                 # the partial file must not hold the last free bytes
        raise write_error(path, e) from None


def write_error(path: str, e: OSError) -> WriteError:
    """The line for a failed write: what failed, and the last checkpoint that is safe on disk."""
    last = os.path.join(os.path.dirname(os.path.abspath(path)), CHECKPOINT)
    try:
        with np.load(last, allow_pickle=False) as f:
            note = f"; the last durable checkpoint is {last} (step {int(f['step'])})"
    except Exception:
        note = "; no checkpoint was saved"
    return WriteError(f"cannot write {path}: {e.strerror or e}{note}")


def save_checkpoint(path: str, setup, model_state: dict, opt_state: dict, *, step: int, epoch: int,
                    batch: int) -> None:
    """Write atomically and durably (write_file): a crash mid-write never destroys the previous checkpoint."""
    cfg = setup.cfg
    # Shuffling is a pure function of (seed, epoch), so rng.seed and rng.epoch ARE the data RNG state.
    counters = {"step": step, "epoch": epoch, "batch_in_epoch": batch, "rng.seed": cfg.seed, "rng.epoch": epoch}
    write_npz(path, {**model_state, **{f"optimizer.{k}": v for k, v in opt_state.items()},
                     **{k: np.array(v, np.int64) for k, v in counters.items()},
                     **model_arrays(cfg.to_dict(), model_meta(setup.model, setup.prep, setup.fingerprint), setup.prep)})


def model_meta(model, prep, fingerprint) -> dict:
    """The checkpoint's meta: what ddp.load needs to rebuild the model."""
    return {"format": FORMAT, "ddp_version": __version__, "sizes": model.sizes, "activation": model.activation,
            "arch": model.arch, "input_shape": list(model.input_shape),
            "loss": model.loss_name, "task": prep.task, "dtype": model.dtype.name, "init": model.init,
            "n_classes": None if prep.classes is None else len(prep.classes), "data_fingerprint": fingerprint}


def model_arrays(config: dict, meta: dict, prep) -> dict:
    return {"config": np.array(json.dumps(config)), "meta": np.array(json.dumps(meta)), **prep.arrays()}


def write_npz(path: str, arrays: dict) -> None:
    """Write atomically and durably (write_file): a crash mid-write never destroys the previous file."""
    write_file(path, lambda fh: np.savez(fh, **arrays))


def _json_field(data: dict, key: str, path: str) -> dict:
    try:
        value = json.loads(str(data[key][()]))
    except (ValueError, TypeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"checkpoint {path}: {key!r} is not a JSON object")
    return value


def load_checkpoint(path: str) -> dict:
    """The checkpoint's arrays, checked: every field a ddp checkpoint needs, of the right kind, and finite
    weights (a checkpoint saved after a blow-up must not be resumed or used)."""
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"a checkpoint is a path to an .npz file, got {path!r}")
    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path} not found")
    if os.path.isdir(path):
        raise UsageError(f"checkpoint {path} is a folder; give the .npz file in it, e.g. {os.path.join(path, CHECKPOINT)}")
    regular_file(path, "checkpoint")
    return read_checkpoint(path, path)


def _read_npz(source, path: str, keys=None) -> dict:
    """The arrays `keys` (default: all) of the .npz `source` (an open file or a path), or one line naming `path`."""
    try:
        with np.load(source, allow_pickle=False) as f:
            return {k: f[k] for k in f.files if keys is None or k in keys}
    except Exception as e:
        raise UsageError(f"checkpoint {path} is corrupt or not an .npz file ({type(e).__name__})") from None


def read_checkpoint(source, path: str) -> dict:
    """load_checkpoint's checks on an open file or a path; `path` names it in messages."""
    data = _read_npz(source, path)
    for key in ("step", "epoch", "batch_in_epoch"):
        if key not in data:
            raise UsageError(f"checkpoint {path} has no {key!r}: not a ddp checkpoint")
        a = data[key]
        if a.shape != () or a.dtype.kind not in "iu" or int(a) < 0:
            raise UsageError(f"checkpoint {path}: {key!r} must be a non-negative integer, got {a!r}")
    data.update({key: _json_field(data, key, path) for key in ("config", "meta") if key in data})
    for key, a in data.items():
        if key.startswith(("layers.", "optimizer.", "data.x_", "data.y_")) and key != "optimizer.t":
            if a.dtype.kind != "f":
                raise UsageError(f"checkpoint {path}: {key} has dtype {a.dtype}, expected floating point")
            if not np.isfinite(a).all():
                raise UsageError(f"checkpoint {path}: {key} holds NaN or Inf; it was saved after training "
                                 "diverged and cannot be used")
    return data


def restore(ckpt: dict, model, optimizer, path: str, span: tuple[int, int] | None = None
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


def check_resume(ckpt: dict, setup, path: str) -> None:
    """The run being resumed must be the checkpoint's: same settings that shape the computation, same data."""
    if (saved := ckpt.get("config")) is not None:
        merge_for_resume(saved, setup.cfg.to_dict(), path)
    if ckpt.get("meta", {}).get("data_fingerprint") not in (None, setup.fingerprint):
        raise UsageError(f"the training data differs from the data checkpoint {path} was trained on "
                         f"(dataset {setup.cfg.dataset!r}); resume with the same data, or start a new run")


def saved_config(path: str) -> dict:
    """The configuration stored in a checkpoint, read without loading its arrays (start_run loads and
    checks the whole checkpoint later, on every rank)."""
    if not os.path.isfile(path):
        load_checkpoint(path)                      # the one place that words a missing path
    data = _read_npz(path, path, ("config",))
    if "config" not in data:
        raise UsageError(f"checkpoint {path} has no saved configuration: not a ddp checkpoint")
    return _json_field(data, "config", path)
