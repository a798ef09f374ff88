"""Normalization layers (see layers.py for the protocol).

batchnorm is SYNCHRONIZED: its batch statistics are those of the GLOBAL batch. Each rank sums x and x^2 over
its rows, one allreduce adds the ranks' sums (with the row count), and backward allreduces the two matching
sums (of dY and of dY * xhat), so N ranks compute what one rank computes, as torch's SyncBatchNorm does. The
running mean and (unbiased) variance, for evaluation, are updated with momentum 0.1 and checkpointed.
layernorm normalizes each sample over all its features; it needs no communication.
"""
from __future__ import annotations

import numpy as np

from .layers import Layer

EPS, MOMENTUM = 1e-5, 0.1


class BatchNorm(Layer):
    buffers = ("running_mean", "running_var")

    def __init__(self, shape, item):
        super().__init__(shape, item)
        self.shapes = {"W": (shape[-1],), "b": (shape[-1],)}     # per feature, or per channel of an image

    def init(self, rng, how):
        C = self.shapes["W"][0]
        return [np.ones(C), np.zeros(C)]

    def bind(self, params, grads, offset):
        stop = super().bind(params, grads, offset)
        C = self.shapes["W"][0]
        self.running_mean, self.running_var = self.xp.zeros(C, self.dtype), self.xp.ones(C, self.dtype)
        return stop

    def allreduce(self, ctx, buf):
        if ctx.comm is not None and ctx.comm.size > 1:
            ctx.comm.allreduce_sum(buf)
        return buf

    def forward(self, X, ctx):
        """X: (B, n) or (B, H, W, C) -> Y, the same shape: W * (X - mean) / sqrt(var + eps) + b, with the
        global batch's mean and biased variance per feature (channel) in training, running ones otherwise."""
        xp, C = self.xp, self.shapes["W"][0]
        Xf = X.reshape(-1, C)
        self.ctx = ctx
        if ctx.train:
            s = xp.empty(2 * C + 1, np.float64)                    # float64: E[x^2] - E[x]^2 cancels
            xp.sum(Xf, axis=0, dtype=np.float64, out=s[:C])
            xp.sum(Xf * Xf, axis=0, dtype=np.float64, out=s[C:2 * C])
            s[2 * C] = len(Xf)
            self.allreduce(ctx, s)
            n = s[2 * C:]                                          # (1,): stays on the device
            mean = s[:C] / n
            var = xp.maximum(s[C:2 * C] / n - mean * mean, 0)
            self.n = n.astype(X.dtype)
            m = MOMENTUM
            self.running_mean[...] = (1 - m) * self.running_mean + m * mean
            self.running_var[...] = (1 - m) * self.running_var + m * var * (n / xp.maximum(n - 1, 1))
            mean, var = mean.astype(X.dtype), var.astype(X.dtype)
        else:
            mean, var = self.running_mean, self.running_var
        self.invstd = 1 / xp.sqrt(var + EPS)
        self.xhat = xp.multiply(xp.subtract(Xf, mean, out=self.buf("xhat", Xf.shape)), self.invstd, out=self.buf("xhat", Xf.shape))
        Y = xp.multiply(self.xhat, self.W, out=self.buf("Y", Xf.shape))
        Y += self.b
        return Y.reshape(X.shape)

    def backward(self, dY, grads, need_dX):
        """dY -> dX = W * invstd / n * (n dY - sum(dY) - xhat * sum(dY * xhat)), sums over the GLOBAL batch;
        db = sum(dY), dW = sum(dY * xhat) over this rank's rows (the gradient allreduce adds the ranks')."""
        xp, C = self.xp, self.shapes["W"][0]
        dYf = dY.reshape(-1, C)
        t = xp.empty(2 * C, self.dtype)
        xp.sum(dYf, axis=0, out=t[:C])
        xp.sum(dYf * self.xhat, axis=0, out=t[C:])
        grads[1][...], grads[0][...] = t[:C], t[C:]
        if not need_dX:
            return None
        self.allreduce(self.ctx, t)
        dX = xp.multiply(dYf, self.n, out=self.buf("dX", dYf.shape))
        dX -= t[:C]
        dX -= self.xhat * t[C:]
        dX *= self.W * self.invstd * (1 / self.n)
        return dX.reshape(dY.shape)


class LayerNorm(Layer):
    def __init__(self, shape, item):
        super().__init__(shape, item)
        torch_shape = (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape
        self.shapes = {"W": torch_shape, "b": torch_shape}

    def init(self, rng, how):
        return [np.ones(self.shapes["W"]), np.zeros(self.shapes["W"])]

    def hwc(self, a):
        """A (C, H, W) parameter seen as (H, W, C), the layout of the samples (a view)."""
        return a.transpose(1, 2, 0) if a.ndim == 3 else a

    def forward(self, X, ctx):
        """X: (B, ...) -> Y = W * (X - mean) / sqrt(var + eps) + b, mean and variance over each sample."""
        xp, B = self.xp, len(X)
        xc = X.reshape(B, -1) - X.reshape(B, -1).mean(axis=1, keepdims=True)
        self.invstd = 1 / xp.sqrt((xc * xc).mean(axis=1, keepdims=True) + EPS)
        self.xhat = (xc * self.invstd).reshape(X.shape)
        return self.xhat * self.hwc(self.W) + self.hwc(self.b)

    def backward(self, dY, grads, need_dX):
        """dY -> dX = invstd * (g - mean(g) - xhat * mean(g * xhat)) per sample, g = dY * W;
        dW = sum(dY * xhat), db = sum(dY) over the rows."""
        B = len(dY)
        self.hwc(grads[0])[...] = (dY * self.xhat).sum(axis=0)
        self.hwc(grads[1])[...] = dY.sum(axis=0)
        if not need_dX:
            return None
        g = (dY * self.hwc(self.W)).reshape(B, -1)
        xh = self.xhat.reshape(B, -1)
        dX = self.invstd * (g - g.mean(axis=1, keepdims=True) - xh * (g * xh).mean(axis=1, keepdims=True))
        return dX.reshape(dY.shape)
