"""Gradient checking: analytic gradients against central differences, in float64.

    ddp gradcheck --sizes 5,8,3 --activation tanh --loss softmax_cross_entropy --batch 4

For each layer it reports ‖analytic − numeric‖ / (‖analytic‖ + ‖numeric‖), the
usual scale-free relative error: float64 with eps = 1e-6 gives about 1e-9 for
correct code, and anything above 1e-7 means a wrong backward pass.
"""
from __future__ import annotations

import numpy as np

from .model import Network


def random_problem(model: Network, batch: int, seed: int = 0):
    """Inputs and targets of the right kind for the model's loss."""
    rng = np.random.default_rng(seed + 1)
    X = rng.standard_normal((batch, model.n_in))
    n_out = model.n_out
    if model.loss_name == "softmax_cross_entropy":
        y = rng.integers(0, n_out, batch)
    elif model.loss_name == "binary_cross_entropy":
        y = rng.integers(0, 2, batch).astype(np.float64)
    else:
        y = rng.standard_normal((batch, n_out))
    return X, y


def numeric_grads(model: Network, X, y, eps: float = 1e-6) -> np.ndarray:
    """Central differences (L(p + eps) - L(p - eps)) / 2 eps for every parameter.
    (A loop over parameters, not samples: it is the reference, not the product. step=0 keeps
    dropout's mask fixed.)"""
    p = model.params
    num = np.zeros(p.size)
    for i in range(p.size):
        old = float(p[i])
        p[i] = old + eps
        plus = model.forward_backward(X, y, step=0)
        p[i] = old - eps
        minus = model.forward_backward(X, y, step=0)
        p[i] = old
        num[i] = (plus - minus) / (2 * eps)
    return num


def gradcheck(model: Network, X, y, eps: float = 1e-6) -> list[float]:
    """Relative error of each layer's analytic gradient (dW and db together)."""
    if model.dtype != np.float64:
        raise ValueError("gradcheck needs a float64 model: float32 rounding swamps central differences")
    num = numeric_grads(model, X, y, eps)
    model.forward_backward(X, y, step=0)
    ana = np.asarray(model.grads, np.float64)
    errs = []
    for L in model.layers:
        a, n = ana[L.start:L.stop], num[L.start:L.stop]
        denom = np.linalg.norm(a) + np.linalg.norm(n)
        errs.append(float(np.linalg.norm(a - n) / denom) if denom > 0 else 0.0)
    return errs
