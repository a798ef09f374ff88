"""Stopping on SIGTERM, at the same step on every rank.

    handle_sigterm()                  # the CLI: from now on SIGTERM only sets a flag
    if stop_requested(comm): ...      # the end of every step: did ANY rank get it?

Slurm's time limit, docker stop and kill send SIGTERM; the run then saves a checkpoint at the end of the
current step and raises errors.Stopped on every rank.
"""
from __future__ import annotations

import numpy as np

from .comm import Communicator

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
    flag = np.array([float(stop)])
    comm.allreduce_sum(flag)
    return bool(flag[0])


class EarlyStopping:
    """--early-stopping PATIENCE: stop once --monitor has gone PATIENCE epochs without improving by more than
    --min-delta. It reads only the epoch's record, whose validation figures are reduced over the ranks, so
    every rank takes the same decision after the same epoch without a message of its own (a decision taken
    on one rank would leave the others waiting in the next collective)."""

    def __init__(self, cfg, key: str):
        self.patience, self.delta, self.key = cfg.early_stopping, cfg.min_delta, key
        self.sign = -1 if key == "val_loss" else 1
        self.best, self.best_epoch, self.waited, self.reason = None, 0, 0, None

    def __call__(self, record: dict) -> bool:
        """Whether to stop after this epoch's record."""
        value = record.get(self.key)
        if not self.patience or record.get("partial") or value is None:
            return False
        if self.best is None or self.sign * (value - self.best) > self.delta:
            self.best, self.best_epoch, self.waited = value, record["epoch"], 0
        else:
            self.waited += 1
        if self.waited >= self.patience:
            self.reason = (f"early stopping: {self.key} did not improve by more than {self.delta:g} for "
                           f"{self.patience} epochs (best {self.best:.4g} at epoch {self.best_epoch})")
        return self.reason is not None
