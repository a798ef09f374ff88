"""The layer protocol, and the kinds that are neither convolutions (conv.py) nor normalizations (norm.py).

A network (model.Network) is a sequence of layers. Each kind declares
- `shapes`: its parameters' names and shapes, in arena order. The network binds them as views into its ONE
  parameter arena and ONE gradient arena (`bind`), so the optimizer and the allreduce see one buffer;
- `out_shape`: one output sample's shape, worked out from the input sample's shape in __init__, which
  raises a UsageError naming the arch item when the spec cannot fit;
- `forward(X, ctx) -> Y` and `backward(dY, grads, need_dX) -> dX`, a pair. backward writes its parameters'
  gradients into `grads` (views of the gradient arena, or of the accumulation scratch) and returns dX.
Batches are (B, n) for flat samples and (B, H, W, C), channels last, for images: the im2col GEMM then writes
its output in place, without a transpose. What a user sees is PyTorch's: input shapes C,H,W, conv weights
(out, in, kh, kw), flatten in (C, H, W) order, so a state dict maps to torch.nn one to one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backend import get_array_module
from .errors import UsageError
from .nn import ACTIVATIONS, dense_backward, dense_forward, get_activation


@dataclass
class Pass:
    """What one forward pass needs besides its input: train (dropout on, batch statistics) or evaluate,
    the global row indices and step that key dropout's masks, the seed, and the communicator that
    synchronized batch norm sums over (None: one process)."""
    train: bool
    rows: np.ndarray | None = None
    step: int = 0
    seed: int = 0
    comm: object = None


def fmt(shape) -> str:
    """A sample shape as the user writes it: n, or C,H,W (internal images are H, W, C)."""
    return str(shape[0]) if len(shape) == 1 else f"{shape[2]},{shape[0]},{shape[1]}"


class Layer:
    shapes: dict = {}         # parameter name -> shape, in arena order
    buffers: tuple = ()       # checkpointed state that is not trained (batch norm's running statistics)

    def __init__(self, shape, item: str):
        self.in_shape = self.out_shape = tuple(shape)
        self.item, self.kind = item, item.split(":")[0]
        self._cache = {}

    def error(self, msg: str) -> UsageError:
        return UsageError(f"arch item {self.item!r}: {msg}")

    def image(self):
        if len(self.in_shape) != 3:
            raise self.error(f"needs an image input (C,H,W), got {fmt(self.in_shape)} features: give --input-shape "
                             "C,H,W, and put conv and pooling layers before flatten")
        return self.in_shape

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def views(self, arena) -> list:
        out, o = [], self.start
        for s in self.shapes.values():
            out.append(arena[o:o + math.prod(s)].reshape(s))
            o += math.prod(s)
        return out

    def bind(self, params, grads, offset: int) -> int:
        """Point this layer's parameters and gradients into the arenas from `offset`; returns the next offset."""
        self.start, self.stop = offset, offset + self.size
        self.xp, self.dtype = get_array_module(params), params.dtype
        self.g = self.views(grads)
        for name, v, g in zip(self.shapes, self.views(params), self.g):
            setattr(self, name, v)
            setattr(self, "d" + name, g)           # W and dW, b and db, ...
        return self.stop

    def init(self, rng, how: str) -> list:
        """Initial values (float64, host) for each parameter, drawn from rng in arena order."""
        return [np.zeros(s) for s in self.shapes.values()]

    def buf(self, name: str, shape) -> object:
        """A scratch array kept between steps: a step allocates nothing (a run sees few batch sizes)."""
        key = (name, tuple(shape))
        b = self._cache.get(key)
        if b is None:
            if len(self._cache) > 24:
                self._cache.clear()
            b = self._cache[key] = self.xp.empty(key[1], self.dtype)
        return b


def _he_or_xavier(rng, how, shape, fan_in, fan_out):
    if how == "he":
        return rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, shape)


class Dense(Layer):
    def __init__(self, shape, item, n: int):
        super().__init__(shape, item)
        if len(shape) != 1:
            raise self.error(f"needs a flat input, got an image {fmt(shape)}: put flatten before it")
        self.shapes = {"W": (n, shape[0]), "b": (n,)}
        self.n_in, self.n_out, self.out_shape = shape[0], n, (n,)

    def init(self, rng, how):
        n_out, n_in = self.shapes["W"]
        return [_he_or_xavier(rng, how, (n_out, n_in), n_in, n_out), np.zeros(n_out)]

    def forward(self, X, ctx):
        """X: (B, n_in) -> Y = X @ W.T + b: (B, n_out)."""
        self.X = X
        return dense_forward(X, self.W, self.b, out=self.buf("Y", (len(X), self.out_shape[0])))

    def backward(self, dY, grads, need_dX):
        """dY: (B, n_out) -> dX: (B, n_in); dW = dY.T @ X into grads[0], db = dY.sum(0) into grads[1]."""
        dX = self.buf("dX", self.X.shape) if need_dX else None
        return dense_backward(dY, self.X, self.W, dX=dX, dW=grads[0], db=grads[1], need_dX=need_dX)[0]


class Activation(Layer):
    def __init__(self, shape, item):
        super().__init__(shape, item)
        self.fwd, self.bwd = get_activation(item)

    def forward(self, X, ctx):
        """X: any shape -> A = f(X), the same shape."""
        self.Z = X
        self.A = self.fwd(X, out=self.buf("A", X.shape))
        return self.A

    def backward(self, dY, grads, need_dX):
        """dY -> dX = dY * f'(Z), written over dY (nothing else reads it)."""
        return self.bwd(dY, self.Z, self.A, out=dY)


class Flatten(Layer):
    def __init__(self, shape, item):
        super().__init__(shape, item)
        self.out_shape = (math.prod(shape),)

    def forward(self, X, ctx):
        """X: (B, H, W, C) -> (B, C*H*W) in PyTorch's (C, H, W) order; a flat X passes through."""
        return X if X.ndim == 2 else X.transpose(0, 3, 1, 2).reshape(len(X), -1)

    def backward(self, dY, grads, need_dX):
        """dY: (B, C*H*W) -> dX: (B, H, W, C) (a view)."""
        if len(self.in_shape) == 1:
            return dY
        H, W, C = self.in_shape
        return dY.reshape(len(dY), C, H, W).transpose(0, 2, 3, 1)


class Pool(Layer):
    """maxpool:K and avgpool:K: K x K windows with stride K; rows and columns that do not fill a window
    are dropped, as in PyTorch."""

    def __init__(self, shape, item, k: int):
        super().__init__(shape, item)
        H, W, C = self.image()
        if k > min(H, W):
            raise self.error(f"kernel {k} is larger than its input {H}x{W}")
        self.k, self.out_shape = k, (H // k, W // k, C)

    def window(self, X, t):
        """Element t (row-major in the window) of every window: (B, Ho, Wo, C), a view of X."""
        k, (Ho, Wo, _) = self.k, self.out_shape
        return X[:, t // k:Ho * k:k, t % k:Wo * k:k]

    def forward(self, X, ctx):
        """X: (B, H, W, C) -> Y: (B, H//K, W//K, C), each window's max or mean."""
        xp, self.X = self.xp, X
        Y = self.buf("Y", (len(X), *self.out_shape))
        Y[...] = self.window(X, 0)
        for t in range(1, self.k * self.k):
            (xp.maximum if self.kind == "maxpool" else xp.add)(Y, self.window(X, t), out=Y)
        if self.kind == "avgpool":
            Y *= 1.0 / (self.k * self.k)
        return Y

    def backward(self, dY, grads, need_dX):
        """dY: (B, Ho, Wo, C) -> dX: (B, H, W, C). maxpool routes each window's gradient to its first
        maximum, as PyTorch does; avgpool spreads it evenly."""
        xp, X, Y, K = self.xp, self.X, self.buf("Y", dY.shape), self.k * self.k
        dX = self.buf("dX", X.shape)
        if X.shape[1] % self.k or X.shape[2] % self.k:
            dX.fill(0)                                   # the dropped margins get no gradient
        if self.kind == "avgpool":
            for t in range(K):
                xp.multiply(dY, 1.0 / K, out=self.window(dX, t))
            return dX
        taken = xp.zeros(Y.shape, bool)
        for t in range(K):
            hit = xp.greater(xp.equal(self.window(X, t), Y), taken)   # a max no earlier element has taken
            taken |= hit
            xp.multiply(dY, hit, out=self.window(dX, t))
        return dX


_GOLD, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(z, c=int):
    """splitmix64's finalizer, on a Python int (c=int) or a uint64 array (c=np.uint64), modulo 2**64."""
    m = c((1 << 64) - 1)
    z &= m
    z = ((z ^ (z >> c(30))) * c(_M1)) & m
    z = ((z ^ (z >> c(27))) * c(_M2)) & m
    return z ^ (z >> c(31))


class Dropout(Layer):
    def __init__(self, shape, item, p: float):
        super().__init__(shape, item)
        if not 0 <= p < 1:
            raise self.error(f"probability {p} must be in [0, 1)")
        self.p, self.mask = p, None

    def uniforms(self, xp, seed, step, rows):
        """U[0, 1) for each element of each row, a pure function of (seed, step, layer position, global row
        index, element): N ranks holding a batch's rows draw exactly what one rank draws."""
        n = math.prod(self.in_shape)
        key = _mix((_mix((_mix(seed + _GOLD) ^ step) + _GOLD) ^ self.pos) + _GOLD)
        z = xp.asarray(np.asarray(rows, np.uint64))[:, None] * np.uint64(n) + xp.arange(n, dtype=np.uint64)
        z = _mix(z * np.uint64(_GOLD) + np.uint64(key), np.uint64)
        return (z >> np.uint64(11)) * (1.0 / (1 << 53))

    def forward(self, X, ctx):
        """X -> X * mask / (1 - p), mask from uniforms(); in evaluation (or p = 0), X itself."""
        if not ctx.train or self.p == 0:
            self.mask = None
            return X
        u = self.uniforms(self.xp, ctx.seed, ctx.step, ctx.rows).reshape(X.shape)
        self.mask = self.xp.where(u >= self.p, 1.0 / (1.0 - self.p), 0.0).astype(X.dtype)
        return self.xp.multiply(X, self.mask, out=self.buf("Y", X.shape))

    def backward(self, dY, grads, need_dX):
        """dX = dY * mask / (1 - p), over dY."""
        return dY if self.mask is None else self.xp.multiply(dY, self.mask, out=dY)


def _conv(shape, item, out, k, stride=1, pad=0):
    from .conv import Conv
    return Conv(shape, item, out, k, stride, pad)


def _norm(kind):
    def make(shape, item):
        from . import norm
        return (norm.BatchNorm if kind == "batchnorm" else norm.LayerNorm)(shape, item)
    return make


# kind -> (constructor, argument types, how the arguments are written)
KINDS = {"dense": (Dense, (int,), "dense:N"), "conv": (_conv, (int, int, int, int), "conv:OUT:K[:STRIDE[:PAD]]"),
         "maxpool": (Pool, (int,), "maxpool:K"), "avgpool": (Pool, (int,), "avgpool:K"),
         "flatten": (Flatten, (), "flatten"), "dropout": (Dropout, (float,), "dropout:P"),
         "batchnorm": (_norm("batchnorm"), (), "batchnorm"), "layernorm": (_norm("layernorm"), (), "layernorm"),
         **{a: (Activation, (), a) for a in ACTIVATIONS}}
REQUIRED = {"conv": 2}           # arguments a kind needs at least (others: exactly as many as it takes)


def parse_arch(arch) -> list[str]:
    """The items of an arch: a comma-separated string or a list of strings, normalized."""
    items = arch.split(",") if isinstance(arch, str) else list(arch)
    if not all(isinstance(i, str) for i in items):
        raise UsageError(f"arch must be a string or a list of strings, got {arch!r}")
    items = [i.strip().lower().replace(" ", "") for i in items]
    if not any(items):
        raise UsageError("arch is empty: give layers such as 'dense:64,relu,dense:10'")
    return items


def make_layer(item: str, shape) -> Layer:
    """The layer an arch item such as 'conv:32:3' describes, for input samples of `shape`."""
    kind, *args = item.split(":")
    if kind not in KINDS:
        raise UsageError(f"arch item {item!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    make, types, usage = KINDS[kind]
    if not REQUIRED.get(kind, len(types)) <= len(args) <= len(types):
        raise UsageError(f"arch item {item!r}: expected {usage}")
    try:
        vals = [t(a) for t, a in zip(types, args)]
    except ValueError:
        raise UsageError(f"arch item {item!r}: expected {usage} with numbers") from None
    if any(v < (0 if kind == "conv" and i == 3 else 1) for i, (v, t) in enumerate(zip(vals, types)) if t is int):
        raise UsageError(f"arch item {item!r}: sizes must be positive integers (a conv's padding may be 0)")
    return make(shape, item, *vals)
