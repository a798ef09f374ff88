"""Allreduce data parallelism: the recipe of PyTorch DDP, on a flat gradient arena.

    dp = DataParallel(model, comm, bucket_bytes=1 << 20)
    loss = dp.forward_backward(X_local, y_local, denom=global_batch)
    optimizer.step()          # identical on every rank: the gradients are identical

The constructor (1) checks that every rank built the same model, (2) copies
rank 0's parameters to every rank, so replicas never rely on equal seeds, and
(3) cuts the gradient arena into buckets of whole layers, starting from the
end, which is what backward produces first. During backward each bucket's
non-blocking allreduce starts as soon as its last layer is done, so the
network carries the last layers while the CPU/GPU computes the first.

Averaging: each rank's loss is its local sum divided by the GLOBAL batch size,
so the plain sum over ranks is the exact batch mean, however unevenly the
batch was split. No mean of means, and no counts to communicate.
"""
from __future__ import annotations

import hashlib
import time

from . import backend
from .comm import Communicator
from .exact import ExactSum
from .powersgd import PowerSGD


class Bucket:
    def __init__(self, layers, grads, index=0):
        self.index = index                   # 0 is the last layers' bucket, reduced first
        self.layers = {L.index for L in layers}
        self.start = min(L.start for L in layers)
        self.stop = max(L.stop for L in layers)
        self.view = grads[self.start:self.stop]
        self.pending = 0

    def __repr__(self):
        return f"Bucket(layers={sorted(self.layers)}, elements={self.stop - self.start})"


def make_buckets(model, bucket_bytes: int) -> list[Bucket]:
    """Group whole layers, last first, into buckets of at least bucket_bytes
    (the last bucket may be smaller). bucket_bytes = 0 gives one bucket per layer."""
    itemsize = model.grads.dtype.itemsize
    buckets, group, size = [], [], 0
    for L in reversed(model.layers):
        group.append(L)
        size += (L.stop - L.start) * itemsize
        if size >= bucket_bytes:
            buckets.append(Bucket(group, model.grads, len(buckets)))
            group, size = [], 0
    if group:
        buckets.append(Bucket(group, model.grads, len(buckets)))
    return buckets


class DataParallel:
    def __init__(self, model, comm: Communicator, bucket_bytes: int = 1 << 20, overlap: bool = True,
                 compress: str | None = None, seed: int = 0, error_feedback: bool = True, chunks: int = 0,
                 scatter=None):
        self.model, self.comm = model, comm
        # --shard-optimizer (zero.py): one reduce-scatter after backward, in parts of these sizes
        self.scatter = scatter
        # --deterministic: chunks added in fixed point after backward (exact.py)
        self.exact = ExactSum(comm, model.grads, chunks) if chunks else None
        self.psgd = PowerSGD(model, comm, int(compress.split(":")[1]), seed, error_feedback) \
            if compress and compress.startswith("powersgd:") else None
        self.compress = None if self.psgd else compress
        # The reduce-scatter, the chunks and PowerSGD's two allreduces all follow backward: nothing to overlap
        self.overlap = overlap and scatter is None and not chunks and self.psgd is None
        self.bytes_per_step = (self.psgd.bytes_per_step if self.psgd else model.grads.size * 8 if chunks else
                               model.grads.nbytes // (2 if compress == "fp16" else 1))
        verify_model(model, comm)
        comm.bcast(model.params, root=0)
        self.set_buckets(bucket_bytes)
        self.tracer = model.tracer
        self._requests = []
        self.measure_local = False     # --noise-scale: keep |this rank's gradient|^2 from before the allreduce
        self.wait_s = 0.0              # seconds in blocking collectives, for straggler.py
        self.local_sq = 0.0

    def set_buckets(self, bucket_bytes: int) -> None:
        self.buckets = make_buckets(self.model, bucket_bytes) if self.overlap else []
        self._by_layer = {i: b for b in self.buckets for i in b.layers}

    def _local(self, view):
        if self.measure_local:
            self.local_sq += self.model.xp.vdot(view, view)     # on the device: no wait for it here

    def _layer_done(self, i):
        b = self._by_layer[i]
        b.pending -= 1
        if b.pending:
            return
        self._local(b.view)
        if b is self.buckets[-1]:
            # The bucket holding layer 0 is ready only when backward is over:
            # nothing is left to overlap, and a blocking Allreduce is faster
            # than Iallreduce + Wait in Open MPI (benchmarks/RESULTS.md).
            t = time.perf_counter()
            with self.tracer.span(f"allreduce bucket {b.index}", "allreduce", bytes=b.view.nbytes, blocking=True):
                self.comm.allreduce_sum(b.view, self.compress)
            self.wait_s += time.perf_counter() - t
            return
        with self.tracer.span(f"allreduce bucket {b.index}", "allreduce", bytes=b.view.nbytes, blocking=False):
            self._requests.append(self.comm.iallreduce_sum(b.view, self.compress))
        # Open MPI progresses non-blocking collectives only inside MPI calls:
        # testing between layers keeps the earlier buckets moving.
        for r in self._requests[:-1]:
            r.test()

    def forward_backward(self, X, y, denom=None, accumulate=False, sync=True, **kw) -> float:
        """This rank's share of the loss (local sum / denom); on return with
        sync=True, model.grads holds the global gradient on every rank.
        sync=False only accumulates locally (the no_sync of gradient accumulation).
        kw (rows, step) go to the model's forward_backward."""
        if self.exact is not None:            # one chunk: its own gradient, kept until the step's last chunk
            loss = self.model.forward_backward(X, y, denom=denom, **kw)
            self.exact.add(self.model.grads, loss)
            if sync:
                t = time.perf_counter()
                with self.tracer.span("exact sum", "allreduce", bytes=self.bytes_per_step, blocking=True):
                    self.exact.finish(self.model.grads)
                self.wait_s += time.perf_counter() - t
            return loss
        if not (sync and self.overlap):
            loss = self.model.forward_backward(X, y, denom=denom, accumulate=accumulate, **kw)
            if sync:
                self._local(self.model.grads)
                t = time.perf_counter()
                if self.psgd is not None:
                    self.psgd.reduce(self.model.grads, self.tracer.span)
                elif self.scatter is not None:
                    with self.tracer.span("reduce-scatter", "allreduce", bytes=self.model.grads.nbytes, blocking=True):
                        self.comm.reduce_scatter_sum(self.model.grads, self.scatter)
                else:
                    with self.tracer.span("allreduce", "allreduce", bytes=self.model.grads.nbytes, blocking=True):
                        self.comm.allreduce_sum(self.model.grads, self.compress)
                self.wait_s += time.perf_counter() - t
            return loss
        for b in self.buckets:
            b.pending = len(b.layers)
        self._requests = []
        loss = self.model.forward_backward(X, y, denom=denom, accumulate=accumulate, on_grad=self._layer_done, **kw)
        t = time.perf_counter()
        with self.tracer.span("wait", "wait", buckets=len(self._requests)):
            for r in self._requests:
                r.wait()
        self.wait_s += time.perf_counter() - t
        self._requests = []
        return loss


def params_hash(params) -> str:
    """A short digest of the parameters' exact bits, for the replica check."""
    return hashlib.blake2b(backend.to_numpy(params).tobytes(), digest_size=8).hexdigest()


def verify_model(m, comm: Communicator) -> None:
    """Every rank must hold the same architecture, or a reduction would mix unrelated numbers (or hang on
    different buffer sizes)."""
    sigs = comm.allgather_obj((m.arch, m.input_shape, m.loss_name, m.dtype.name, m.num_params))
    for r, s in enumerate(sigs):
        if s != sigs[0]:
            raise RuntimeError(f"rank {r} built model {s}, but rank 0 built {sigs[0]}")


def check_replicas(comm: Communicator, params, step: int) -> None:
    """Raise on every rank, with the same message, if any rank's parameters differ from rank 0's."""
    if comm.size == 1:
        return                  # nothing to compare, and the hash would copy the parameters off the GPU
    hashes = comm.allgather_obj(params_hash(params))
    bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if bad:
        raise RuntimeError(f"replicas diverged at step {step}: rank(s) {bad} hold parameters different "
                           f"from rank 0's")
