"""--shard-optimizer: ZeRO stage 1 (Rajbhandari et al. 2020). Each rank keeps the optimizer state of one
contiguous shard of the arena only:

    after backward    reduce-scatter the gradients   rank r holds the sum of its shard, grads[a:b]
    the update        the optimizer on that shard    params[a:b], and ceil(P/N) elements per state array
    then              allgather the parameters       every rank holds the whole updated model again

A reduce-scatter and an allgather move what one ring allreduce moves, so the wire carries the same bytes, while
the optimizer state per rank falls as 1/N (Adam's two moments: 8 bytes per parameter, 8/N when sharded). The
optimizers are elementwise, so a shard's update is the unsharded update of those elements. Checkpoints hold the
whole state, gathered to rank 0, in the unsharded format: any world size, sharded or not, resumes them.
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy
from .data import shard_range


class ShardedOptimizer:
    """An optimizer over this rank's shard of (params, grads); make(params_view, grads_view) builds it.
    Everything else (current_lr, t, the state arrays of the shard) is the inner optimizer's."""

    def __init__(self, make, params, grads, comm):
        self.comm, self.params, self.size = comm, params, params.size
        self.counts = [b - a for a, b in (shard_range(params.size, r, comm.size) for r in range(comm.size))]
        a, b = self.span = shard_range(params.size, comm.rank, comm.size)
        self.grads = grads[a:b]                       # the part of the arena the reduce-scatter fills
        self.inner = make(params[a:b], self.grads)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self) -> None:
        self.inner.step()
        self.comm.allgather(self.params, self.counts)

    def state_dict(self) -> dict:
        """The whole state on rank 0 (None arrays elsewhere). Every rank must call it: the shards are gathered."""
        return gather_state(self.inner, self.comm, self.size, self.counts)

    def load_state_dict(self, state: dict) -> None:
        """`state` as a checkpoint holds it, whole: this rank keeps its shard."""
        a, b = self.span
        self.inner.load_state_dict({k: v if k == "t" or v.shape != (self.size,) else v[a:b] for k, v in state.items()})


def gather_state(opt, comm, size: int, counts) -> dict:
    """The state of `opt`, an optimizer over this rank's part of an arena of `size` elements cut in parts of
    `counts` over the ranks of comm (--shard-optimizer's ranks, ps mode's servers): whole on rank 0, in the
    unsharded format (None arrays elsewhere). Every rank must call it."""
    out = {}
    for name in opt.state_names:
        mine = to_numpy(getattr(opt, name))
        if comm.size == 1:
            out[name] = mine.copy()
            continue
        out[name] = np.empty(size, mine.dtype) if comm.rank == 0 else None
        comm.gatherv(np.ascontiguousarray(mine), out[name], counts)
    out["t"] = np.array(opt.t, np.int64)
    return out
