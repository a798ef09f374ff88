"""--deterministic: gradient sums whose bits do not depend on the world size.

A float sum depends on its order, and the order depends on how a global batch is split over the ranks: float32
runs on 1, 2 and 4 ranks differ by about 3e-7. In deterministic mode every global batch is cut into K fixed
chunks (data.chunk_shard: the cut depends on the batch alone), each rank computes the gradient of each of its
chunks on its own, and the chunks are added in FIXED POINT. Integers add associatively, so one rank holding all
K chunks and three ranks holding 3, 3 and 2 of them get the same bits, and so does every MPI reduction order.

The scale comes from the largest element of any chunk of the step, found first with one small allreduce of each
chunk's binary exponent (a histogram: sums of counts are exact as well):

    max |g| < 2^E   ->   q = rint(g * 2^S),  S = 52 - ceil(log2 K) - E,   so |sum of K q's| <= 2^52

Every partial sum is an integer below 2^53, which float64 holds exactly: the sum is exact in any order (and MPI's
float64 sum or a parameter server's adds nothing). The quantum 2^-S is 2^-(52 - ceil(log2 K)) of the largest element, far below float32's
own rounding; the result is rounded once more, to the arena's dtype. The same histogram carries each chunk's loss (float64
bits in the chunk's own slot, zeros elsewhere, so the integer sum IS those bits), and every rank adds the K
losses in chunk order. Cost: the chunks' gradients are kept until the scale is known (ceil(K/N) copies of the
arena), and the reduction moves float64: twice float32's bytes.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .data import shard_range

MAX_S = 1000                  # 2^S stays a finite float64; a step whose largest element is below 2^-948 adds zeros
BLOCK = 1 << 14               # columns per pass of the quantization: 8 chunks of them in float64 fit in L2


class ExactSum:
    """Collects this rank's chunks of one step (add), then sums every rank's chunks exactly (finish).

    comm: the data-parallel communicator; grads: the flat gradient arena; k: chunks per global batch."""

    def __init__(self, comm, grads, k: int):
        self.comm, self.k, self.xp = comm, k, backend.get_array_module(grads)
        # Histogram bins: bin E + offset counts the chunks whose largest |g| is below 2^E (E spans the dtype's
        # exponents, subnormals included); the last bin counts chunks with NaN or Inf; then one slot per chunk.
        info = np.finfo(grads.dtype)
        self.offset = info.nmant - info.minexp + 1
        self.nonfinite = self.offset + info.maxexp + 1
        self.first, stop = shard_range(k, comm.rank, comm.size)
        self.mine = stop - self.first                 # 0 when the world is larger than k
        slots = max(self.mine, 1)
        self.chunks = self.xp.empty((slots, grads.size), grads.dtype)
        self.stats = self.xp.zeros(2 * slots, np.float64)      # each chunk's max |g|, then its loss
        self.count, self.loss = 0, 0.0
        self.acc = self.xp.empty(grads.size, np.float64)         # what the ranks add: see local()
        self._tmp = self.xp.empty((slots, BLOCK), np.float64)

    def add(self, grads, loss) -> None:
        """Keep one chunk's gradient (the flat arena) and its loss; in chunk order."""
        i, n = self.count, len(self.chunks)
        if i >= n:
            raise RuntimeError(f"--deterministic: more than {n} chunks in one step on rank {self.comm.rank}")
        self.chunks[i] = grads
        xp = self.xp
        self.stats[i] = xp.maximum(xp.max(grads), -xp.min(grads)) if grads.size else 0.0   # NaN stays NaN
        self.stats[n + i] = loss
        self.count += 1

    def finish(self, grads) -> None:
        """grads <- the sum of every rank's chunks, rounded once; self.loss <- the sum of their losses."""
        acc = self.local()
        self.comm.allreduce_sum(acc)
        grads[...] = acc

    def local(self):
        """This rank's chunks added exactly: a float64 arena of multiples of 2^-S (NaN if any rank's chunk held
        NaN or Inf). Sums of such arrays from every rank, in any order and any grouping, are exact: allreduce
        mode adds them with one allreduce, ps servers as the workers' pushes arrive. Sets self.loss."""
        n, xp = len(self.chunks), self.xp
        stats = backend.to_numpy(self.stats)           # the step's one wait for the device
        small, bins = np.zeros(self.nonfinite + 1 + self.k, np.int64), self.nonfinite + 1
        for i in range(min(self.count, self.mine)):
            m = stats[i]
            if not math.isfinite(m):
                small[self.nonfinite] += 1
            elif m > 0:
                small[math.frexp(m)[1] + self.offset] += 1
            small[bins + self.first + i] = np.float64(stats[n + i]).view(np.int64)
        self.comm.allreduce_sum(small)
        count, self.count = self.count, 0
        self.loss = float(small[bins:].view(np.float64).sum())      # the same array, in chunk order, everywhere
        self.stats[:] = 0
        acc, used = self.acc, np.flatnonzero(small[:self.nonfinite])
        if small[self.nonfinite] or not len(used):
            acc[...] = np.nan if small[self.nonfinite] else 0.0     # NaN: the finite check names the step
            return acc
        S = min(52 - math.ceil(math.log2(self.k)) - (int(used[-1]) - self.offset), MAX_S)
        scale = 2.0 ** S
        # In column blocks that stay in cache, so each chunk is read once from memory. q = rint(g * 2^S) is an
        # integer below 2^(52 - ceil(log2 K)) (g * 2^S is exact: a power of two), so every partial sum of K of
        # them is an integer below 2^52: exact in float64, in any order. Scaled back by 2^-S (exact too), the
        # sums stay exact: integers in units of 2^-S.
        for a in range(0, acc.size, BLOCK):
            width = min(BLOCK, acc.size - a)
            q = self._tmp[:count, :width]
            xp.multiply(self.chunks[:count, a:a + width], scale, out=q, dtype=np.float64)
            xp.rint(q, out=q)
            xp.sum(q, axis=0, out=acc[a:a + width])
        acc *= 1.0 / scale
        return acc
