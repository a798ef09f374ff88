"""Evaluation, the same in every mode: metrics over a dataset sharded across the ranks, one epoch's record
of metrics.jsonl, and the summary's final metrics.
"""
from __future__ import annotations

import resource
import time

import numpy as np

from . import backend
from .comm import Communicator
from .data import Dataset, block_table
from .errors import TrainingError
from .model import Network
from .setup import Setup


def evaluate(model: Network, ds: Dataset, comm: Communicator, chunk: int = 1024) -> dict:
    """Loss and accuracy (classification) or R² (regression) over `ds`, sharded across ranks.

    The rows are cut into blocks of `chunk` (fewer for wide inputs), each rank evaluates whole blocks, and every
    rank adds the blocks' sums in block order (data.block_table): the figures do not depend on the world size,
    to the bit."""
    n = len(ds)
    # At most 16 MB of float64 inputs at once, and at least 16 blocks, so that up to 16 ranks share a small set;
    # the block size depends on the set alone, never on the world size.
    chunk = max(1, min(chunk, (1 << 21) // ds.n_features, -(-n // 16)))
    n_out = model.sizes[-1]
    classification = model.loss_name != "mse"

    def fill(b, acc):                      # [loss sum, correct, sum y, sum y^2, sse] (the last three per output)
        rows = np.arange(b * chunk, min(n, (b + 1) * chunk))
        Y = ds.y[rows]                                  # on the host; y below is on the model's device
        Z = model.forward(ds.inputs(rows, model.xp, model.dtype))
        y = model.targets(Y)
        acc[0] = float(model.loss_fn(Z, y, denom=1)[0])
        if classification:
            pred = (Z[:, 0] > 0).astype(np.int64) if n_out == 1 else Z.argmax(axis=1)
            acc[1] = float((pred == y).sum())
        else:
            Yh = backend.to_numpy(Z).astype(np.float64)
            acc[2:].reshape(3, n_out)[:] = Y.sum(0), (Y * Y).sum(0), ((Y - Yh) ** 2).sum(0)
    acc = block_table(-(-n // chunk), 2 if classification else 2 + 3 * n_out, comm, fill).sum(axis=0)
    if n == 0:
        return {}
    if classification:
        return {"loss": acc[0] / n, "accuracy": acc[1] / n}
    sy, syy, sse = acc[2:].reshape(3, n_out)
    sst = syy - sy * sy / n
    return {"loss": acc[0] / n, "r2": float(np.mean(1 - sse / np.where(sst > 0, sst, 1.0)))}


def epoch_record(model: Network, val: Dataset, comm: Communicator, *, epoch: int, step: int, loss_sum: float,
                 n_steps: int, samples: int, seconds: float, t0: float, finished: bool, **extra) -> dict:
    """One line of metrics.jsonl, the same in both modes: epoch (1-based), step, the mean training loss
    (loss_sum already summed over ranks), val_* metrics, samples/s over the epoch's `seconds`, elapsed_s
    since t0, then `extra`, and "partial" when the epoch was cut short."""
    return {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(n_steps, 1),
            **{f"val_{k}": v for k, v in evaluate(model, val, comm).items()},
            "samples_per_s": samples / seconds if seconds > 0 else 0.0, "elapsed_s": time.perf_counter() - t0,
            **extra, **({} if finished else {"partial": True})}


def final_metrics(s: Setup, comm: Communicator, *, step: int, epoch: int, world_size: int, t0: float,
                  stop_reason=None) -> dict:
    """The summary's figures, the same in both modes: steps, epochs, world size, time, test_* and val_*, and
    why the run stopped (early stopping; None when it ran its course)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # KiB on Linux
    summary = {"steps": step, "epochs": epoch, "world_size": world_size, "elapsed_s": time.perf_counter() - t0,
               "stop_reason": stop_reason, "peak_rss_mb": comm.allgather_obj(round(peak, 1)),
               **{f"test_{k}": v for k, v in evaluate(s.model, s.test, comm).items()},
               **{f"val_{k}": v for k, v in evaluate(s.model, s.val, comm).items()}}
    # The same figures on every rank, so every rank raises together: one line, exit 1.
    if bad := [k for k, v in summary.items() if k.startswith(("val_", "test_")) and not np.isfinite(v)]:
        raise TrainingError(f"the final {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite: training "
                            f"diverged at the end (lower --lr, or use the last good checkpoint)")
    # Healthy: the model beats predicting the majority class (accuracy) or the mean (R² 0) on validation.
    if "val_accuracy" in summary:          # (evaluate gives no metric for an empty set)
        summary["healthy"] = bool(summary["val_accuracy"] > np.bincount(s.val.y).max() / len(s.val))
    elif "val_r2" in summary:
        summary["healthy"] = bool(summary["val_r2"] > 0)
    return summary
