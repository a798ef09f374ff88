"""Losses from logits, each a forward/backward pair in one call.

Every loss returns (loss, dZ) where loss = sum over samples / denom and dZ is
the gradient of that loss. The loss is a 0-d array on the device of Z (0.0 for
an empty batch): a Python float would make the host wait for the GPU, so the
trainer fetches it once per step, with the finiteness check. `denom` defaults
to the batch size, giving the batch mean. In data-parallel training each rank
passes the GLOBAL batch size as denom, so the allreduce-sum of the ranks'
losses and gradients is exactly the global batch mean, whatever the shard
sizes: no mean of means.
"""
from __future__ import annotations

from .backend import get_array_module
from .errors import UsageError
from .nn import sigmoid


def mse(Z, Y, denom=None, dZ=None):
    """Mean squared error over all elements.  Z, Y: (B, n_out) -> loss, dZ: (B, n_out)."""
    xp = get_array_module(Z)
    B, n_out = Z.shape
    denom = (B if denom is None else denom) * n_out
    dZ = xp.subtract(Z, Y, out=dZ)
    loss = xp.vdot(dZ, dZ) / denom if B else 0.0
    dZ *= 2.0 / denom
    return loss, dZ


def binary_cross_entropy(Z, y, denom=None, dZ=None):
    """Binary cross-entropy from logits.  Z: (B, 1), y: (B,) or (B, 1) of 0/1 -> loss, dZ: (B, 1).

    max(z, 0) - z*y + log(1 + exp(-|z|)) is the loss written so that exp never
    sees a large positive argument; the gradient is sigmoid(z) - y.
    """
    xp = get_array_module(Z)
    B = Z.shape[0]
    denom = B if denom is None else denom
    y = y.reshape(B, 1).astype(Z.dtype, copy=False)
    per = xp.maximum(Z, 0) - Z * y + xp.log1p(xp.exp(-xp.abs(Z)))
    loss = per.sum() / denom if B else 0.0
    dZ = sigmoid(Z, out=dZ)                # through tanh: stable for any z
    dZ -= y
    dZ *= 1.0 / denom
    return loss, dZ


def softmax_cross_entropy(Z, y, denom=None, dZ=None):
    """Softmax cross-entropy from logits.  Z: (B, C), y: (B,) int in [0, C) -> loss, dZ: (B, C).

    Subtracting each row's max before exp keeps exp <= 1 (no overflow), and the
    log-sum-exp form of the loss never takes log(0).
    """
    xp = get_array_module(Z)
    B = Z.shape[0]
    denom = B if denom is None else denom
    if B == 0:
        dZ = xp.zeros_like(Z) if dZ is None else dZ
        return 0.0, dZ
    rows = xp.arange(B)
    shifted = Z - Z.max(axis=1, keepdims=True)
    dZ = xp.exp(shifted, out=dZ)
    sumexp = dZ.sum(axis=1, keepdims=True)
    loss = (xp.log(sumexp[:, 0]) - shifted[rows, y]).sum() / denom
    dZ /= sumexp
    dZ[rows, y] -= 1
    dZ *= 1.0 / denom
    return loss, dZ


LOSSES = {
    "mse": mse,
    "binary_cross_entropy": binary_cross_entropy,
    "softmax_cross_entropy": softmax_cross_entropy,
}


def get_loss(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise UsageError(f"unknown loss {name!r}: expected one of {', '.join(LOSSES)}") from None
