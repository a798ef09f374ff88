"""Layers as pure forward/backward pairs, vectorized over the batch.

Shape conventions (as in the seeds): X (B, n_in), W (n_out, n_in), b (n_out,),
Z = X @ W.T + b. Every function takes an optional `out=` so the model can run
a whole training step without allocating: that is where the last 20% of step
time goes otherwise.
"""
from __future__ import annotations

from .backend import get_array_module
from .errors import UsageError


def dense_forward(X, W, b, out=None):
    """Z = X @ W.T + b.   X: (B, n_in), W: (n_out, n_in), b: (n_out,) -> Z: (B, n_out)."""
    xp = get_array_module(X)
    Z = xp.matmul(X, W.T, out=out)
    Z += b
    return Z


def dense_backward(dZ, X, W, dX=None, dW=None, db=None, need_dX=True):
    """Gradients of Z = X @ W.T + b.

    dZ: (B, n_out), X: (B, n_in), W: (n_out, n_in)
    -> dX: (B, n_in) (None if not need_dX), dW: (n_out, n_in), db: (n_out,)
    dW = dZ.T @ X, db = dZ.sum(0), dX = dZ @ W.
    """
    xp = get_array_module(dZ)
    dW = xp.matmul(dZ.T, X, out=dW)
    db = xp.sum(dZ, axis=0, out=db)
    dX = xp.matmul(dZ, W, out=dX) if need_dX else None
    return dX, dW, db


# Activations. forward(Z, out) -> A; backward(dA, Z, A, out) -> dZ.
# backward may write in place into dA (out=dA): the model does exactly that.

def relu_forward(Z, out=None):
    return get_array_module(Z).maximum(Z, 0, out=out)


def relu_backward(dA, Z, A, out=None):
    return get_array_module(dA).multiply(dA, A > 0, out=out)


LEAKY_SLOPE = 0.01


def leaky_relu_forward(Z, out=None):
    xp = get_array_module(Z)
    # max(z, 0.01 z) is leaky ReLU for a slope below 1, without a branch.
    return xp.maximum(Z, LEAKY_SLOPE * Z, out=out)


def leaky_relu_backward(dA, Z, A, out=None):
    xp = get_array_module(dA)
    return xp.multiply(dA, xp.where(Z > 0, 1.0, LEAKY_SLOPE).astype(dA.dtype, copy=False), out=out)


def sigmoid(Z, out=None):
    """1 / (1 + exp(-Z)), written through tanh so that it never overflows."""
    xp = get_array_module(Z)
    out = xp.multiply(Z, 0.5, out=out)
    xp.tanh(out, out=out)
    out += 1
    out *= 0.5
    return out


def sigmoid_backward(dA, Z, A, out=None):
    xp = get_array_module(dA)
    s = A * (1 - A)
    return xp.multiply(dA, s, out=out)


def tanh_forward(Z, out=None):
    return get_array_module(Z).tanh(Z, out=out)


def tanh_backward(dA, Z, A, out=None):
    xp = get_array_module(dA)
    return xp.multiply(dA, 1 - A * A, out=out)


def identity_forward(Z, out=None):
    if out is None or out is Z:
        return Z
    out[...] = Z
    return out


def identity_backward(dA, Z, A, out=None):
    return identity_forward(dA, out)


ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "leaky_relu": (leaky_relu_forward, leaky_relu_backward),
    "sigmoid": (sigmoid, sigmoid_backward),
    "tanh": (tanh_forward, tanh_backward),
    "identity": (identity_forward, identity_backward),
}


def get_activation(name: str):
    """(forward, backward) for an activation name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UsageError(f"unknown activation {name!r}: expected one of {', '.join(ACTIVATIONS)}") from None
