"""The network: a sequence of layers (layers.py), every parameter in one flat buffer, every gradient in another.

    model = Network("conv:32:3,relu,maxpool:2,flatten,dense:10", (1, 28, 28), loss="softmax_cross_entropy")
    model = MLP([64, 128, 10], activation="relu")   # the same as Network("dense:128,relu,dense:10", 64)
    loss = model.forward_backward(X, y)             # fills model.grads
    optimizer.step()                                # one vectorized update of model.params

`layers` are the layers that hold parameters, numbered k = 0, 1, ... (their arrays are named layers.{k}.W and
layers.{k}.b); `seq` is every layer in order. Layer k's parameters are views into `params` and `grads`, laid
out layer 0 W, layer 0 b, layer 1 W, ... so communication sends the whole arena (or a contiguous bucket of it)
without packing. Backward produces the last layer first, i.e. the END of the arena first: the data-parallel
code starts reducing the tail of the buffer while backward still works on the head.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .config import memory_bytes
from .errors import UsageError
from .layers import Pass, fmt, make_layer, parse_arch
from .losses import get_loss
from .trace import NULL

INITS = ("he", "xavier")
CHUNK_ELEMENTS = 1 << 22           # forward() evaluates in chunks whose largest array stays under this (16 MB of float32: RSS per rank)


def parse_shape(shape) -> tuple:
    """An input sample's shape, n or C,H,W (a string, an int or a sequence) -> the layers' (n,) or (H, W, C)."""
    try:
        dims = tuple(int(d) for d in (shape.split(",") if isinstance(shape, str) else np.atleast_1d(shape)))
    except (ValueError, TypeError):
        dims = ()
    if len(dims) not in (1, 3) or min(dims) < 1:
        raise UsageError(f"input shape {shape!r} must be N (features) or C,H,W (channels, height, width)")
    return dims if len(dims) == 1 else (dims[1], dims[2], dims[0])


class Network:
    def __init__(self, arch, input_shape, loss="softmax_cross_entropy", init="he", seed=0, dtype="float32",
                 device="cpu"):
        if init not in INITS:
            raise UsageError(f"unknown init {init!r}: expected one of {', '.join(INITS)}")
        if dtype not in ("float32", "float64"):
            raise UsageError(f"unknown dtype {dtype!r}: expected float32 or float64")
        self.loss_name, self.loss_fn = loss, get_loss(loss)
        self.init, self.seed, self.dtype = init, seed, np.dtype(dtype)
        self.xp = xp = backend.get_xp(device)
        self.device = "gpu" if xp is not np else "cpu"
        self.shape = shape = parse_shape(input_shape)
        self.input_shape = tuple(int(d) for d in fmt(shape).split(","))
        self.seq = []
        for pos, item in enumerate(parse_arch(arch)):
            L = make_layer(item, shape)
            L.pos, shape = pos, L.out_shape
            self.seq.append(L)
        self.arch = ",".join(L.item for L in self.seq)
        if len(shape) != 1:
            raise UsageError(f"arch {self.arch!r} outputs images ({fmt(shape)}): end it with flatten and dense:N")
        self.n_in, self.n_out = math.prod(self.input_shape), shape[0]
        if loss == "binary_cross_entropy" and self.n_out != 1:
            raise UsageError(f"binary_cross_entropy needs 1 output unit, not {self.n_out}")
        self.layers = [L for L in self.seq if L.shapes]
        n = sum(L.size for L in self.layers)
        # Sizes from flags or a checkpoint's architecture are checked as a product, before any allocation.
        if 2 * n * self.dtype.itemsize > memory_bytes():
            raise UsageError(f"arch {self.arch!r} has {n:,} parameters: more than this machine's memory holds")
        self.params, self.grads = xp.zeros(n, self.dtype), xp.zeros(n, self.dtype)
        offset = 0
        for k, L in enumerate(self.layers):
            L.index = k
            offset = L.bind(self.params, self.grads, offset)
        for L in self.seq:
            L.xp, L.dtype = xp, self.dtype
        self.params[...] = xp.asarray(self.initial_params(), self.dtype)
        self.sizes, self.activation = [self.n_in, self.n_out], None       # an MLP's, for its shorthand
        self.widest = max(max(math.prod(L.out_shape), getattr(L, "k", 1) ** 2 * L.in_shape[-1] * math.prod(
            L.out_shape[:-1])) for L in self.seq)
        self.comm = None          # the Communicator batch norm sums over (set by the training loop)
        self.tracer = NULL        # trace.Tracer when the run is traced (--trace)
        self._scratch = None      # second gradient arena, for accumulation
        self._dz = None           # the loss gradient's buffer, kept between steps
        self._step = 0

    @property
    def num_params(self) -> int:
        return int(self.params.size)

    def initial_params(self) -> np.ndarray:
        """Seeded He or Xavier initialisation, drawn in float64 on the host so
        that CPU and GPU, float32 and float64 start from the same numbers."""
        rng = np.random.default_rng(self.seed)
        return np.concatenate([np.ravel(a) for L in self.layers for a in L.init(rng, self.init)] or [np.zeros(0)])

    def _check_input(self, X):
        if X.shape[1:] not in ((self.n_in,), self.input_shape):
            raise UsageError(f"input has shape {tuple(X.shape)}, but the model's first layer expects "
                             f"{self.n_in} features per sample" + (f" (or samples of shape {self.input_shape})"
                                                                   if len(self.input_shape) > 1 else ""))
        if X.dtype != self.dtype or backend.get_array_module(X) is not self.xp:
            X = self.xp.asarray(X, self.dtype)
        if len(self.shape) == 3:        # PyTorch's (C, H, W) samples -> the layers' (H, W, C)
            C, H, W = self.input_shape
            X = self.xp.ascontiguousarray(X.reshape(len(X), C, H, W).transpose(0, 2, 3, 1))
        return X

    # -- forward / backward -------------------------------------------------
    def _forward(self, X, ctx):
        span = self.tracer.span
        for L in self.seq:
            with span(f"forward L{L.pos}", "forward", kind=L.kind):
                X = L.forward(X, ctx)
        return X

    def targets(self, y):
        """Labels y (n,) on the model's device: class indices as they are; regression targets (mse) in the
        model's dtype."""
        return self.xp.asarray(y) if self.loss_name != "mse" else self.xp.asarray(y, self.dtype)

    def forward(self, X):
        """Logits for X: (B, n_in) or (B, *input_shape) -> (B, n_out), in evaluation mode (no dropout, batch
        norm's running statistics). Returns a new array."""
        X = self._check_input(X)
        rows = max(1, CHUNK_ELEMENTS // self.widest)
        if len(X) <= rows:
            return self._forward(X, Pass(False)).copy()
        return self.xp.concatenate([self._forward(X[i:i + rows], Pass(False)).copy() for i in range(0, len(X), rows)])

    def forward_backward(self, X, y, denom=None, on_grad=None, accumulate=False, rows=None, step=None):
        """Loss over the batch (a 0-d array on the model's device) and its gradient in `self.grads`.

        X: (B, n_in) or (B, *input_shape); y: (B,) labels or (B, n_out) targets.
        denom: what the loss sum is divided by (default B): the data-parallel
            code passes the global batch size.
        on_grad(k): called as soon as layer k's gradients are final, last layer
            first, so that communication can start during backward.
        accumulate: add to the gradients already in `self.grads` instead of
            overwriting them (gradient accumulation over micro-batches).
        rows: the global indices of X's rows, step: the global step; they key dropout's masks (default
            0..B-1, and a count of this model's calls).
        """
        X = self._check_input(X)
        B = X.shape[0]
        if self.loss_name == "softmax_cross_entropy" and B and isinstance(y, np.ndarray):
            # an out-of-range label would silently index another sample's logit
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.n_out:
                raise UsageError(f"label {hi if hi >= self.n_out else lo} is out of range for a model "
                                 f"with {self.n_out} classes")
        if step is None:
            step, self._step = self._step, self._step + 1
        ctx = Pass(True, np.arange(B) if rows is None else rows, step, self.seed, self.comm)
        Z = self._forward(X, ctx)
        dZ = self._dz if self._dz is not None and self._dz.shape == Z.shape else self.xp.empty_like(Z)
        loss, dY = self.loss_fn(Z, y, denom, dZ=dZ)
        self._dz = dY
        if accumulate and self._scratch is None:
            self._scratch = self.xp.zeros_like(self.grads)
        span = self.tracer.span
        first = self.layers[0].pos if self.layers else len(self.seq)
        for L in reversed(self.seq[first:]):
            with span(f"backward L{L.pos}", "backward", kind=L.kind):
                dY = L.backward(dY, L.views(self._scratch) if accumulate and L.shapes else getattr(L, "g", None),
                                need_dX=L.pos > first)
                if accumulate and L.shapes:
                    self.grads[L.start:L.stop] += self._scratch[L.start:L.stop]
            if on_grad is not None and L.shapes:
                on_grad(L.index)
        return loss

    def zero_grad(self):
        self.grads.fill(0)

    # -- inspection and state -------------------------------------------------
    def grad_norms(self) -> list[float]:
        """L2 norm of each layer's gradient (all its parameters together)."""
        xp = self.xp
        return [math.sqrt(float(xp.vdot(self.grads[L.start:L.stop], self.grads[L.start:L.stop])))
                for L in self.layers]

    def _named(self):
        for L in self.layers:
            for name in (*L.shapes, *L.buffers):
                yield f"layers.{L.index}.{name}", getattr(L, name)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies named layers.0.W, layers.0.b, ... (and batch norm's layers.k.running_mean/_var)."""
        return {name: backend.to_numpy(view).copy() for name, view in self._named()}

    def load_state_dict(self, state) -> None:
        for name, view in self._named():
            if name not in state:
                raise UsageError(f"checkpoint has no array {name!r}: it is for another architecture")
            arr = state[name]
            if tuple(arr.shape) != tuple(view.shape):
                raise UsageError(f"checkpoint array {name} has shape {tuple(arr.shape)}, but this model's "
                                 f"is {tuple(view.shape)}: it is for another architecture")
            view[...] = self.xp.asarray(arr, self.dtype)
        extra = sorted(k for k in state if k.startswith("layers.") and k.rsplit(".", 1)[0] not in
                       {f"layers.{L.index}" for L in self.layers})
        if extra:
            raise UsageError(f"checkpoint has arrays {extra[:3]} that this model lacks: "
                             "it is for another architecture")

    def __repr__(self):
        return (f"Network({self.arch!r}, input {','.join(map(str, self.input_shape))}, loss={self.loss_name!r}, "
                f"params={self.num_params}, dtype={self.dtype.name}, device={self.device})")


def mlp_arch(widths, activation="relu") -> str:
    """The arch of an MLP: dense layers of `widths` with `activation` between them (none after the last)."""
    return f",{activation},".join(f"dense:{w}" for w in widths)


class MLP(Network):
    """The MLP shorthand: MLP([n_in, h1, ..., n_out], activation) is Network(mlp_arch([h1, ..., n_out]), n_in)."""

    def __init__(self, sizes, activation="relu", loss="softmax_cross_entropy", init="he", seed=0,
                 dtype="float32", device="cpu"):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise UsageError(f"layer sizes {sizes} must be at least two positive integers (inputs, outputs)")
        from .nn import get_activation
        get_activation(activation)
        super().__init__(mlp_arch(sizes[1:], activation), sizes[0], loss=loss, init=init, seed=seed, dtype=dtype,
                         device=device)
        self.sizes, self.activation = sizes, activation

    def __repr__(self):
        return (f"MLP({self.sizes}, activation={self.activation!r}, loss={self.loss_name!r}, "
                f"params={self.num_params}, dtype={self.dtype.name}, device={self.device})")


def network_for(cfg, ds, loss: str, n_out: int) -> Network:
    """The network a run's settings describe for dataset ds and n_out outputs: --arch, else --hidden's MLP."""
    kw = dict(loss=loss, init=cfg.init, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
    n = ds.n_features
    if not cfg.arch:
        return MLP([n, *cfg.hidden_sizes(), n_out], activation=cfg.activation, **kw)
    shape = cfg.input_shape or ds.shape or n
    if math.prod(parse_shape(shape)) != n:
        raise UsageError(f"input shape {shape!r} has {math.prod(parse_shape(shape))} values per sample, but the "
                         f"data has {n} features")
    net = Network(cfg.arch, shape, **kw)
    if net.n_out != n_out:
        raise UsageError(f"arch {cfg.arch!r} ends with {net.n_out} outputs, but the data needs {n_out}: end it "
                         f"with dense:{n_out}")
    return net
