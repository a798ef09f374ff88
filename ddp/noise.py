"""The gradient noise scale B_simple (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A.1), free in data parallelism: each rank's gradient before the allreduce is a small-batch estimate
(its b rows), the allreduced one a big-batch estimate (the B rows of the global batch).

    E|G_b|^2 = |G|^2 + tr(S) / b   for a batch of b rows, so from one pair (b, B):
    |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b)        tr(S) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

Both estimates are summed over steps and ranks separately and divided at the end of an epoch (the ratio of
means, which the paper recommends: each estimate alone is noisy and may be negative); the sums ride on the
epoch's one allreduce. B_simple = tr(S) / |G|^2 is roughly the batch size beyond which a larger batch no
longer cuts the number of steps in proportion.
"""
from __future__ import annotations

WARN_FACTOR = 4


class NoiseScale:
    def __init__(self):
        self.sums = [0.0, 0.0, 0.0]                     # |G|^2 estimates, tr(S) estimates, how many

    def add(self, local_sq: float, global_sq: float, b: int, B: int) -> None:
        """local_sq: |this rank's gradient|^2 before the allreduce, as a share of the global mean (its rows'
        sum / B); global_sq: |the averaged gradient|^2; b: this rank's rows, B: the global batch's."""
        if not 0 < b < B:                               # one rank, or a rank without rows: no pair
            return
        small_sq = local_sq * (B / b) ** 2         # the mean over this rank's own rows
        self.sums[0] += (B * global_sq - b * small_sq) / (B - b)
        self.sums[1] += (small_sq - global_sq) / (1 / b - 1 / B)
        self.sums[2] += 1

    def take(self) -> list[float]:
        """This epoch's sums (for the epoch's allreduce), and start the next."""
        sums, self.sums = self.sums, [0.0, 0.0, 0.0]
        return sums


def b_simple(sums) -> float | None:
    """B_simple from the sums over every rank; None without a pair or when |G|^2 is not positive yet."""
    g2, trace, n = sums
    return float(trace / g2) if n and g2 > 0 else None
