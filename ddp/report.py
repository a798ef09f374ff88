"""What rank 0 writes and prints during a run: config.toml, metrics.jsonl, one line per epoch, the progress
bar (only on a terminal), best.npz and summary.json. Every JSON it writes is valid JSON: a non-finite number is
written as null.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

import numpy as np

from .checkpoint import BEST, CHECKPOINT, write_error, write_file
from .config import Config, to_toml
from .lock import unlock

RISE = 2.0                       # a final validation loss this many times the first one earns a warning


def restart_count() -> int:
    try:
        return max(int(os.environ.get("DDP_RESTART", "0")), 0)
    except ValueError:
        return 0


def finite(obj):
    """JSON has no NaN or Infinity: non-finite floats become null, so every file stays valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return finite(obj.item())
    return obj


def metric_name(task: str) -> str:
    return "val_accuracy" if task == "classification" else "val_r2"


def reporter_key(cfg: Config, task: str) -> str:
    """The record's key that --monitor names: what best.npz and early stopping follow."""
    return "val_loss" if cfg.monitor == "val_loss" else metric_name(task)


class Reporter:
    """What rank 0 writes and prints: config.toml, metrics.jsonl, one line per epoch, the progress bar
    (only on a terminal), best.npz, summary.json. Other ranks hold an inactive Reporter."""

    def __init__(self, cfg: Config, active: bool, total: int, initial: int, task: str, resume_step=None):
        self.cfg, self.task = cfg, task
        self.active = active and bool(cfg.out)
        self.printing = active
        self.bar = None
        self.best, self.best_step, self.saved_step = None, None, None
        self.key = reporter_key(cfg, task)          # what best.npz follows
        self.history = []                  # every rank's records, for the estimators' loss_curve_
        if self.active:
            os.makedirs(cfg.out, exist_ok=True)
            write_file(os.path.join(cfg.out, "config.toml"), lambda fh: fh.write(to_toml(cfg).encode()))
            self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
            kept = self._kept_records(resume_step) if resume_step is not None else []
            for rec in kept:
                self._consider_best(rec)
            write_file(self.metrics_path, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
            # Appended to, never through a symlink; each record is fsynced before its line is printed.
            self.metrics = os.fdopen(os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW), "a")
            self.logger = Logger(cfg.logger, cfg.out, kept)
        if active and cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)

    def _kept_records(self, step: int) -> list[dict]:
        """The records of the run up to its checkpoint: later ones (written before a crash) and the record
        of an epoch the checkpoint stopped inside (it is written again when the epoch ends) are dropped,
        so a resumed run's metrics.jsonl has each epoch once."""
        kept = []
        try:
            with open(self.metrics_path) as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        break                      # a line cut by a crash
                    if rec.get("step", 0) <= step and not rec.get("partial"):
                        kept.append(rec)
        except FileNotFoundError:
            pass
        return kept

    def _consider_best(self, record: dict) -> bool:
        value = record.get(self.key)
        sign = -1 if self.key == "val_loss" else 1
        if value is None or not math.isfinite(value) or (self.best is not None and sign * (value - self.best) <= 0):
            return False
        self.best, self.best_step = value, record["step"]
        return True

    def tick(self, loss):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def epoch(self, record: dict):
        """One epoch's record (already reduced over the ranks)."""
        if not record.get("partial"):
            self.history.append(record)
        if not self.printing:
            return
        record = finite(record)
        if self.active:
            try:
                self.metrics.write(json.dumps(record) + "\n")
                self.metrics.flush()
                os.fsync(self.metrics.fileno())
            except OSError as e:
                raise write_error(self.metrics_path, e) from None
            self.logger.log(record)
            if not record.get("partial") and self._consider_best(record) and self.saved_step == record["step"]:
                self._copy_best()
        if not self.cfg.quiet:
            self.print(self.format_epoch(record))

    def format_epoch(self, r: dict) -> str:
        parts = [f"epoch {r['epoch']}/{self.cfg.epochs}" + (" (stopped inside)" if r.get("partial") else ""),
                 f"step {r['step']}", f"train loss {_fmt(r.get('train_loss'))}"]
        for key in ("val_loss", metric_name(self.task)):
            if key in r:
                parts.append(f"{key.replace('_', ' ')} {_fmt(r[key])}")
        parts.append(f"{r.get('samples_per_s') or 0:,.0f} samples/s")
        if st := r.get("straggler"):
            parts.append(f"slow rank {st['rank']} ({st['phase']} +{100 * st['slower_by']:.0f}%)")
        if r.get("noise_scale") is not None:
            parts.append(f"noise scale {r['noise_scale']:,.0f}")
        return "ddp: " + ", ".join(parts)

    def saved(self, step: int):
        """A checkpoint at `step` was just written: keep it as best.npz if that step's metric is the best."""
        self.saved_step = step
        if self.active and self.best_step == step:
            self._copy_best()

    def _copy_best(self):
        with open(os.path.join(self.cfg.out, CHECKPOINT), "rb") as src:
            write_file(os.path.join(self.cfg.out, BEST), lambda fh: shutil.copyfileobj(src, fh))

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.active and not self.metrics.closed:
            self.metrics.close()
            self.logger.close()

    def print(self, msg: str):
        if self.bar is not None:                # a bar is only made where this rank prints
            self.bar.write(msg)
        elif self.printing:
            print(msg, flush=True)

    def summary(self, summary: dict, extra: str = "") -> dict:
        """summary.json (with the configuration, restarts and the best epoch) and the final line."""
        summary = {**summary, "config": self.cfg.to_dict()}
        if self.best_step is not None:
            summary["best"] = {"step": self.best_step, self.key: self.best}
        if restarts := restart_count():
            summary["restarts"] = restarts
            summary["restart_reasons"] = [r for r in os.environ.get("DDP_RESTART_REASONS", "").split(";") if r]
        summary = finite(summary)
        losses = [(r["epoch"], r["val_loss"]) for r in self.history if finite(r.get("val_loss")) is not None]
        if len(losses) >= 2:
            (e0, first), (e1, last) = losses[0], losses[-1]
            if last > RISE * first:
                self.print(f"ddp: warning: validation loss rose from {first:.4g} (epoch {e0}) to {last:.4g} "
                           f"(epoch {e1}): the learning rate may be too high, or the model overfits")
        if summary.get("healthy") is False:
            self.print("ddp: warning: the final validation metric is no better than predicting the majority class "
                       "(or the mean): the model has not learned; check --lr and the data")
        if self.active:
            write_file(os.path.join(self.cfg.out, "summary.json"),
                       lambda fh: fh.write(json.dumps(summary, indent=1).encode()))
            unlock(self.cfg.out)
        metric = next((k for k in ("test_accuracy", "test_r2") if summary.get(k) is not None), None)
        tail = f", {metric} {summary[metric]:.4f}" if metric else ""
        where = f", outputs in {self.cfg.out}" if self.active else ""
        extra += f"; {summary['stop_reason']}" if summary.get("stop_reason") else ""
        self.print(f"ddp: done: {summary['steps']} steps, {summary['epochs']} epochs, "
                   f"{summary['elapsed_s']:.1f} s{tail}{extra}{where}")
        return {**summary, "history": self.history}


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def scalars(record: dict) -> dict:
    """A record's numbers, lists spread out: grad_norms [a, b] -> grad_norms/0, grad_norms/1."""
    return {name: x for k, v in record.items()
            for name, x in ([(f"{k}/{i}", x) for i, x in enumerate(v)] if isinstance(v, list) else [(k, v)])
            if isinstance(x, (int, float)) and not isinstance(x, bool)}


class Logger:
    """--logger csv: metrics.csv, one row per record and one column per number (rewritten whole each epoch, so
    a column that appears later gets its header); tensorboard: event files in the run folder (`tensorboard
    --logdir runs`), each number a scalar at the record's step, by TensorBoard's own writer; none: nothing."""

    def __init__(self, kind: str, out: str, kept: list):
        self.kind, self.path, self.rows = kind, os.path.join(out, "metrics.csv"), [scalars(r) for r in kept]
        if kind == "tensorboard":
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            self.writer = EventFileWriter(out)

    def log(self, record):
        if self.kind == "csv":
            import csv
            import io
            self.rows.append(scalars(record))
            text = io.StringIO()
            w = csv.DictWriter(text, list(dict.fromkeys(k for r in self.rows for k in r)), lineterminator="\n")
            w.writeheader()
            w.writerows(self.rows)
            write_file(self.path, lambda fh: fh.write(text.getvalue().encode()))
        elif self.kind == "tensorboard":
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            values = [Summary.Value(tag=k, simple_value=v) for k, v in scalars(record).items() if k != "step"]
            self.writer.add_event(Event(wall_time=time.time(), step=record["step"], summary=Summary(value=values)))
            self.writer.flush()

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
