"""Stragglers named in the epoch line: each rank's seconds per phase, compared across ranks once an epoch.

A rank that is slower than the others spends longer in data, compute or the optimizer, and the others then wait
for it in the next collective. Each rank's four sums ride on the epoch's one allreduce (a row per rank), so
naming it costs no extra communication, and timing costs a few perf_counter calls per step. The loop judges the
sums over every epoch so far: a rank is named when it is chronically slower, not for one noisy epoch (on the
2-core machine single epochs of an even job differed by up to 12%).
"""
from __future__ import annotations

import time

import numpy as np

PHASES = ("data", "compute", "optimizer", "wait")
THRESHOLD = 0.10            # busier than the others' median by more than this, and waited for by them,
MIN_EXCESS_S = 0.1          # and by this many seconds: below it, timer noise and warm-up dominate


class PhaseClock:
    """This rank's seconds in each phase since the epoch began."""

    def __init__(self):
        self.s = np.zeros(len(PHASES))
        self.t = time.perf_counter()

    def mark(self) -> None:
        self.t = time.perf_counter()

    def lap(self, phase: str, moved: float = 0.0) -> None:
        """The time since the last mark goes to `phase`, but `moved` seconds of it (a collective inside it) to wait."""
        now = time.perf_counter()
        self.s[PHASES.index(phase)] += now - self.t - moved
        self.s[PHASES.index("wait")] += moved
        self.t = now

    def row(self, rank: int, size: int) -> np.ndarray:
        """This rank's row of the (size, phases) table, zeros elsewhere: summed over the ranks, the whole table."""
        table = np.zeros((size, len(PHASES)))
        table[rank] = self.s
        self.s = np.zeros(len(PHASES))
        return table.ravel()


def find(table: np.ndarray) -> dict | None:
    """The rank that held the others up this epoch, and in which phase; None when the ranks ran even.
    table: (ranks, phases) seconds."""
    if len(table) < 2:
        return None
    busy = table[:, :3].sum(1)
    r = int(np.argmax(busy))
    others = np.delete(table, r, axis=0)
    ref = float(np.median(others[:, :3].sum(1)))
    if busy[r] <= (1 + THRESHOLD) * ref or busy[r] - ref < MIN_EXCESS_S or np.median(others[:, 3]) <= table[r, 3]:
        return None
    excess = table[r, :3] - np.median(others[:, :3], axis=0)
    return {"rank": r, "phase": PHASES[int(np.argmax(excess))], "slower_by": round(float(busy[r] / ref - 1), 4)}
