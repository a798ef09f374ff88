"""2-D convolution as im2col + one GEMM, channels last (see layers.py for the protocol).

    conv:OUT:K[:STRIDE[:PAD]]     X: (B, H, W, C) -> Y: (B, Ho, Wo, OUT), Ho = (H + 2 PAD - K) // STRIDE + 1

The unfolded input `cols` has one row per output pixel and one column per (kh, kw, c): K*K strided copies
fill it (a loop over the kernel's taps, never over samples or pixels), then Y = cols @ Wk.T is one GEMM
whose (B*Ho*Wo, OUT) result already is Y in channels-last order. Wk is W, kept in PyTorch's (OUT, C, K, K)
layout in the arena, as (OUT, K, K, C): a copy of the small weight, not of the large activations.
"""
from __future__ import annotations

import numpy as np

from .layers import Layer, _he_or_xavier


class Conv(Layer):
    def __init__(self, shape, item, out: int, k: int, stride: int = 1, pad: int = 0):
        super().__init__(shape, item)
        H, W, C = self.image()
        if k > min(H, W) + 2 * pad:
            raise self.error(f"kernel {k} is larger than its input {H}x{W}" + (f" padded by {pad}" if pad else ""))
        self.k, self.s, self.pad = k, stride, pad
        self.out_shape = ((H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1, out)
        self.shapes = {"W": (out, C, k, k), "b": (out,)}

    def init(self, rng, how):
        O, C, k, _ = self.shapes["W"]
        return [_he_or_xavier(rng, how, self.shapes["W"], C * k * k, O * k * k), np.zeros(O)]

    def taps(self, Xp):
        """Each kernel tap (i, j)'s input pixels for every output pixel: (B, Ho, Wo, C) views of padded Xp."""
        k, s, (Ho, Wo, _) = self.k, self.s, self.out_shape
        for i in range(k):
            for j in range(k):
                yield i, j, Xp[:, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s]

    def forward(self, X, ctx):
        """X: (B, H, W, C) -> Y: (B, Ho, Wo, O);  Y = cols @ Wk.T + b."""
        B, (H, W, C), p, k = len(X), self.in_shape, self.pad, self.k
        (Ho, Wo, O) = self.out_shape
        if p:
            Xp = self.buf("Xp", (B, H + 2 * p, W + 2 * p, C))
            Xp.fill(0)
            Xp[:, p:p + H, p:p + W] = X
            X = Xp
        cols = self.buf("cols", (B, Ho, Wo, k, k, C))
        for i, j, tap in self.taps(X):
            cols[:, :, :, i, j] = tap
        self.cols = cols.reshape(B * Ho * Wo, k * k * C)
        self.Wk = self.W.transpose(0, 2, 3, 1).reshape(O, -1)
        Y = self.xp.matmul(self.cols, self.Wk.T, out=self.buf("Y", (B * Ho * Wo, O)))
        Y += self.b
        return Y.reshape(B, Ho, Wo, O)

    def backward(self, dY, grads, need_dX):
        """dY: (B, Ho, Wo, O) -> dX: (B, H, W, C);  dW = dY.T @ cols (as (O, C, K, K)), db = dY summed,
        dcols = dY @ Wk folded back onto the input pixels it came from (col2im, a sum over the taps)."""
        xp, (H, W, C), p, k = self.xp, self.in_shape, self.pad, self.k
        B, O = len(dY), self.out_shape[2]
        dY = dY.reshape(-1, O)
        dWk = xp.matmul(dY.T, self.cols, out=self.buf("dWk", (O, k * k * C)))
        grads[0][...] = dWk.reshape(O, k, k, C).transpose(0, 3, 1, 2)
        xp.sum(dY, axis=0, out=grads[1])
        if not need_dX:
            return None
        dcols = xp.matmul(dY, self.Wk, out=self.buf("dcols", self.cols.shape)).reshape(B, *self.out_shape[:2], k, k, C)
        dXp = self.buf("dXp", (B, H + 2 * p, W + 2 * p, C))
        dXp.fill(0)
        for i, j, tap in self.taps(dXp):
            tap += dcols[:, :, :, i, j]
        return dXp[:, p:p + H, p:p + W] if p else dXp
