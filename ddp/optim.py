"""Optimizers that update a whole flat parameter arena in one vectorized pass.

An optimizer owns (params, grads) 1-D arrays: the model's whole arena in
allreduce mode, or one server's shard of it in parameter-server mode. There is
no per-layer loop. Scratch buffers are allocated once so a step allocates
nothing. State (momentum, Adam moments, step count) lives in `state_dict()`
as plain arrays, so checkpoints need no pickle.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import all_finite, axpy, get_array_module, to_numpy
from .errors import UsageError


def clip_grad_norm(grads, norm: float, max_norm: float) -> bool:
    """Scale grads in place by max_norm / (norm + 1e-6) when that is < 1, as torch.nn.utils.clip_grad_norm_;
    `norm` is the L2 norm of the whole AVERAGED gradient (the same on every rank). Returns whether it clipped."""
    scale = max_norm / (norm + 1e-6)
    if not max_norm or scale >= 1:
        return False
    grads *= scale
    return True


def parts_sqnorm(comm, part, sqnorm: float) -> tuple[float, bool]:
    """A gradient cut into parts over the ranks of `comm` (--shard-optimizer's ranks, ps mode's servers): from this
    rank's `part` and its squared norm, the whole gradient's squared norm and whether every part is finite, in one
    small allreduce, so every rank reaches the same verdict."""
    both = np.array([sqnorm, 0.0 if all_finite(part, sqnorm) else 1.0])
    comm.allreduce_sum(both)
    return float(both[0]), not both[1]


class Optimizer:
    state_names: tuple[str, ...] = ()

    def __init__(self, params, grads, lr, weight_decay=0.0, schedule=None):
        # BLAS axpy (one pass) rounds an element by where it falls in the vector: fused multiply-adds in the
        # SIMD body, not in the tail. --deterministic (make_optimizer's exact) takes NumPy's two passes instead, the
        # same rounding for every element, so a shard of the arena (--shard-optimizer) updates bit for bit alike.
        self.axpy = axpy
        if not lr > 0:
            raise UsageError(f"learning rate must be positive, got {lr}")
        if weight_decay < 0:
            raise UsageError(f"weight decay must be >= 0, got {weight_decay}")
        self.params, self.grads = params, grads
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.schedule = schedule or Schedule("constant")
        self.t = 0                                    # optimizer steps taken
        self.xp = get_array_module(params)
        self._tmp = self.xp.empty_like(params)
        self._decayed = self.xp.empty_like(params) if weight_decay else None
        for name in self.state_names:
            setattr(self, name, self.xp.zeros_like(params))

    def current_lr(self) -> float:
        return self.lr * self.schedule(self.t)

    def step(self):
        self.t += 1
        self._update(self.lr * self.schedule(self.t - 1))

    def _l2(self, g):
        """g + wd * p, kept apart from the gradient buffer, which holds what was communicated."""
        self._decayed[...] = g
        self.axpy(self.weight_decay, self.params, self._decayed)
        return self._decayed

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {name: to_numpy(getattr(self, name)).copy() for name in self.state_names}
        out["t"] = np.array(self.t, np.int64)
        return out

    def load_state_dict(self, state) -> None:
        for name in self.state_names:
            if name not in state:
                raise UsageError(f"checkpoint has no optimizer state {name!r}: it was written by another optimizer")
            arr = state[name]
            if arr.shape != self.params.shape:
                raise UsageError(f"optimizer state {name} has shape {arr.shape}, expected {self.params.shape}")
            getattr(self, name)[...] = self.xp.asarray(arr, self.params.dtype)
        self.t = int(state["t"])


class SGD(Optimizer):
    """SGD with optional momentum, Nesterov momentum and L2 weight decay (PyTorch's formulation)."""

    state_names = ("momentum_buffer",)

    def __init__(self, params, grads, lr, momentum=0.0, nesterov=False, weight_decay=0.0, schedule=None):
        if not 0 <= momentum < 1:
            raise UsageError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise UsageError("nesterov needs a momentum > 0")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        if momentum == 0:
            self.state_names = ()
        super().__init__(params, grads, lr, weight_decay, schedule)

    def _update(self, lr):
        p, g = self.params, self.grads
        if self.weight_decay:
            g = self._l2(g)
        if self.momentum:
            v = self.momentum_buffer
            v *= self.momentum
            self.axpy(1.0, g, v)
            if self.nesterov:                  # p -= lr * (g + momentum * v)
                self.axpy(-lr, g, p)
                self.axpy(-lr * self.momentum, v, p)
            else:
                self.axpy(-lr, v, p)
        else:
            self.axpy(-lr, g, p)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; weight decay as L2 added to the gradient."""

    state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, schedule=None):
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise UsageError(f"Adam betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise UsageError(f"Adam eps must be positive, got {eps}")
        self.beta1, self.beta2, self.eps = float(b1), float(b2), float(eps)
        super().__init__(params, grads, lr, weight_decay, schedule)

    def _update(self, lr):
        xp, p, g, tmp = self.xp, self.params, self.grads, self._tmp
        m, v, b1, b2 = self.exp_avg, self.exp_avg_sq, self.beta1, self.beta2
        if self.weight_decay and self.decoupled:
            p *= 1 - lr * self.weight_decay      # AdamW: decay the weights, not the gradient
        elif self.weight_decay:
            g = self._l2(g)
        m *= b1
        self.axpy(1 - b1, g, m)
        v *= b2
        xp.multiply(g, g, out=tmp)
        self.axpy(1 - b2, tmp, v)
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        # p -= lr * (m / bc1) / (sqrt(v / bc2) + eps), with the scalars folded
        xp.sqrt(v, out=tmp)
        tmp *= 1 / math.sqrt(bc2)
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        self.axpy(-lr / bc1, tmp, p)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter)."""

    decoupled = True

    def __init__(self, params, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, schedule=None):
        super().__init__(params, grads, lr, betas, eps, weight_decay, schedule)


class Schedule:
    """Learning-rate multiplier as a function of the step: constant, step, cosine,
    each with an optional linear warmup over the first `warmup` steps."""

    KINDS = ("constant", "step", "cosine")

    def __init__(self, kind="constant", total_steps=0, warmup=0, step_size=1000, gamma=0.1, min_factor=0.0):
        if kind not in self.KINDS:
            raise UsageError(f"unknown schedule {kind!r}: expected one of {', '.join(self.KINDS)}")
        if warmup < 0 or step_size < 1 or gamma <= 0:
            raise UsageError(f"bad schedule settings: warmup={warmup} (>= 0), step_size={step_size} (>= 1), "
                             f"gamma={gamma} (> 0)")
        self.kind, self.total, self.warmup = kind, int(total_steps), int(warmup)
        self.step_size, self.gamma, self.min_factor = int(step_size), float(gamma), float(min_factor)

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        t -= self.warmup
        if self.kind == "step":
            return self.gamma ** (t // self.step_size)
        if self.kind == "cosine":
            frac = min(t / max(self.total - self.warmup, 1), 1.0)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0


OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(name, params, grads, *, lr, momentum=0.0, nesterov=False, weight_decay=0.0,
                   betas=(0.9, 0.999), eps=1e-8, schedule=None, exact=False):
    if name == "sgd":
        opt = SGD(params, grads, lr, momentum, nesterov, weight_decay, schedule)
    elif name in ("adam", "adamw"):
        opt = (Adam if name == "adam" else AdamW)(params, grads, lr, betas, eps, weight_decay, schedule)
    else:
        raise UsageError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if exact:
        opt.axpy = exact_axpy
    return opt


def exact_axpy(a: float, x, y) -> None:
    """y += a * x as two roundings, the same for every element wherever it sits (see Optimizer.__init__)."""
    y += a * x

