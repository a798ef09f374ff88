"""PowerSGD (Vogels, Karimireddy and Jaggi, NeurIPS 2019, Algorithm 1): rank-R compression of each weight
matrix's gradient, with error feedback and a warm start, in two allreduces of small factors per step.

    M = G + E                  this rank's share of the gradient, plus what compression lost last step
    P = sum_ranks M Q          (n, R): the first allreduce, Q (m, R) is last step's, the same on every rank
    P <- orthonormal columns   (Gram-Schmidt, on the same P on every rank)
    Q = sum_ranks M^T P        (m, R): the second allreduce
    E = M - P (M^T P)^T        this rank's own error, with its own, not the summed, M^T P
    G <- P Q^T                 the sum's projection onto span(P): the compressed global gradient

A matrix is compressed only where R (n + m) < n m elements; biases, norm weights and smaller matrices go in
the first allreduce uncompressed. Everything is linear in the ranks' shares, so N ranks compute what one
process computes (to rounding), and without error feedback training stalls or diverges (the paper's finding).
"""
from __future__ import annotations

import math

import numpy as np


class PowerSGD:
    def __init__(self, model, comm, rank: int, seed: int = 0, error_feedback: bool = True):
        xp, dtype = model.xp, model.grads.dtype
        self.comm, self.r, self.ef, self.xp = comm, rank, error_feedback, xp
        self.mats, plain = [], []                       # (offset, n, m); uncompressed index ranges
        for L in model.layers:
            o = L.start
            for shape in L.shapes.values():
                size = math.prod(shape)
                n, m = shape[0], size // shape[0]
                if len(shape) >= 2 and rank * (n + m) < n * m:
                    self.mats.append((o, n, m))
                else:
                    plain.append(np.arange(o, o + size))
                o += size
        self.plain = xp.asarray(np.concatenate(plain) if plain else np.zeros(0, np.int64))
        rng = np.random.default_rng(seed)               # the same start on every rank
        self.q = [xp.asarray(rng.standard_normal((m, rank)), dtype) for _, _, m in self.mats]
        self.err = [xp.zeros((n, m), dtype) for _, n, m in self.mats]
        n_p = sum(n for _, n, _ in self.mats) * rank
        self.pbuf = xp.empty(n_p + len(self.plain), dtype)       # the P factors, then the uncompressed part
        self.qbuf = xp.empty(sum(m for _, _, m in self.mats) * rank, dtype)
        self.bytes_per_step = (self.pbuf.size + self.qbuf.size) * dtype.itemsize

    def reduce(self, grads, span) -> None:
        """Replace `grads` (this rank's share) with the compressed sum over the ranks, in place."""
        xp, r = self.xp, self.r
        Ms, Ps, Qs, po, qo = [], [], [], 0, 0
        for (o, n, m), q, e in zip(self.mats, self.q, self.err):
            M = grads[o:o + n * m].reshape(n, m)
            if self.ef:
                M += e
            P = self.pbuf[po:po + n * r].reshape(n, r)
            xp.matmul(M, q, out=P)
            Ms.append(M), Ps.append(P), Qs.append(self.qbuf[qo:qo + m * r].reshape(m, r))
            po, qo = po + n * r, qo + m * r
        self.pbuf[po:] = grads[self.plain]
        with span("allreduce P", "allreduce", bytes=self.pbuf.nbytes, blocking=True):
            self.comm.allreduce_sum(self.pbuf)
        grads[self.plain] = self.pbuf[po:]
        for M, P, Q, e in zip(Ms, Ps, Qs, self.err):
            orthonormalize(P, xp)
            xp.matmul(M.T, P, out=Q)
            if self.ef:
                xp.matmul(P, Q.T, out=e)
                xp.subtract(M, e, out=e)              # what this rank's share lost to the compression
        with span("allreduce Q", "allreduce", bytes=self.qbuf.nbytes, blocking=True):
            self.comm.allreduce_sum(self.qbuf)
        for M, P, Q, q in zip(Ms, Ps, Qs, self.q):
            xp.matmul(P, Q.T, out=M)
            q[...] = Q                                  # the warm start: the same on every rank


def orthonormalize(P, xp) -> None:
    """Gram-Schmidt on the columns of P (n, R), in place; a zero column stays zero."""
    for i in range(P.shape[1]):
        col = P[:, i]
        if i:
            col -= P[:, :i] @ (P[:, :i].T @ col)
        col /= xp.sqrt(xp.vdot(col, col)) + 1e-8
