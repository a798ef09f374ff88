"""The MLP: every parameter in one flat buffer, every gradient in another.

    model = MLP([64, 128, 10], activation="relu", loss="softmax_cross_entropy")
    loss = model.forward_backward(X, y)      # fills model.grads
    optimizer.step()                         # one vectorized update of model.params

Layer i's W, b, dW and db are views into `params` and `grads`, laid out as
layer 0 W, layer 0 b, layer 1 W, ... so communication sends the whole arena
(or a contiguous bucket of it) without packing. Backward produces the last
layer first, i.e. the END of the arena first: the data-parallel code starts
reducing the tail of the buffer while backward still works on the head.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .errors import UsageError
from .losses import get_loss
from .nn import dense_backward, dense_forward, get_activation
from .trace import NULL

INITS = ("he", "xavier")


class Layer:
    """One dense layer: views W (n_out, n_in), b (n_out,) into params and dW, db into grads."""

    def __init__(self, index, n_in, n_out, activation, params, grads, offset):
        self.index, self.n_in, self.n_out, self.activation = index, n_in, n_out, activation
        nw = n_out * n_in
        self.start, self.stop = offset, offset + nw + n_out   # this layer's span of the arena
        self.W = params[offset:offset + nw].reshape(n_out, n_in)
        self.b = params[offset + nw:self.stop]
        self.dW = grads[offset:offset + nw].reshape(n_out, n_in)
        self.db = grads[offset + nw:self.stop]
        self.forward_fn, self.backward_fn = get_activation(activation)

    def __repr__(self):
        return f"Layer({self.index}: {self.n_in} -> {self.n_out}, {self.activation})"


class MLP:
    def __init__(self, sizes, activation="relu", loss="softmax_cross_entropy", init="he",
                 seed=0, dtype="float32", device="cpu"):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise UsageError(f"layer sizes {sizes} must be at least two positive integers (inputs, outputs)")
        if init not in INITS:
            raise UsageError(f"unknown init {init!r}: expected one of {', '.join(INITS)}")
        if dtype not in ("float32", "float64"):
            raise UsageError(f"unknown dtype {dtype!r}: expected float32 or float64")
        get_activation(activation)
        self.loss_name = loss
        self.loss_fn = get_loss(loss)
        if loss == "binary_cross_entropy" and sizes[-1] != 1:
            raise UsageError(f"binary_cross_entropy needs 1 output unit, not {sizes[-1]}")
        self.sizes, self.activation, self.init, self.seed = sizes, activation, init, seed
        self.dtype = np.dtype(dtype)
        self.xp = xp = backend.get_xp(device)
        self.device = "gpu" if xp is not np else "cpu"

        n = sum(o * i + o for i, o in zip(sizes[:-1], sizes[1:]))
        self.params = xp.zeros(n, self.dtype)
        self.grads = xp.zeros(n, self.dtype)
        self.layers, offset = [], 0
        for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            act = activation if k < len(sizes) - 2 else "identity"   # the last layer outputs logits
            self.layers.append(Layer(k, n_in, n_out, act, self.params, self.grads, offset))
            offset = self.layers[-1].stop
        self.params[...] = xp.asarray(self.initial_params(), self.dtype)
        self.tracer = NULL        # trace.Tracer when the run is traced (--trace)
        self._buffers = {}        # batch size -> preallocated activations
        self._scratch = None      # second gradient arena, for accumulation

    @property
    def num_params(self) -> int:
        return int(self.params.size)

    def initial_params(self) -> np.ndarray:
        """Seeded He or Xavier initialisation, drawn in float64 on the host so
        that CPU and GPU, float32 and float64 start from the same numbers."""
        rng = np.random.default_rng(self.seed)
        out = np.zeros(self.num_params)
        for L in self.layers:
            if self.init == "he":
                w = rng.standard_normal((L.n_out, L.n_in)) * math.sqrt(2.0 / L.n_in)
            else:
                a = math.sqrt(6.0 / (L.n_in + L.n_out))
                w = rng.uniform(-a, a, (L.n_out, L.n_in))
            out[L.start:L.start + w.size] = w.ravel()
        return out

    # -- buffers -----------------------------------------------------------
    def _bufs(self, B):
        """Activation buffers for batch size B, allocated once: Z and A per layer
        and one dA per layer for backward. A training run sees at most two batch
        sizes (the full one and the last partial one), so the cache stays small."""
        bufs = self._buffers.get(B)
        if bufs is None:
            xp, dt = self.xp, self.dtype
            bufs = {
                "Z": [xp.empty((B, L.n_out), dt) for L in self.layers],
                "A": [xp.empty((B, L.n_out), dt) if L.activation != "identity" else None
                      for L in self.layers],
                "dA": [xp.empty((B, L.n_out), dt) for L in self.layers],
            }
            if len(self._buffers) >= 4:
                self._buffers.clear()
            self._buffers[B] = bufs
        return bufs

    def _check_input(self, X):
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise UsageError(f"input has shape {tuple(X.shape)}, but the model's first layer expects "
                             f"{self.sizes[0]} features per sample")
        if X.dtype != self.dtype or backend.get_array_module(X) is not self.xp:
            X = self.xp.asarray(X, self.dtype)
        return X

    # -- forward / backward -------------------------------------------------
    def _forward(self, X, bufs):
        A = X
        acts = [X]
        span = self.tracer.span
        for L, Z, Abuf in zip(self.layers, bufs["Z"], bufs["A"]):
            with span(f"forward L{L.index}", "forward"):
                dense_forward(A, L.W, L.b, out=Z)
                A = Z if Abuf is None else L.forward_fn(Z, out=Abuf)
            acts.append(A)
        return acts

    def forward(self, X):
        """Logits for X: (B, n_in) -> (B, n_out). Returns a new array."""
        X = self._check_input(X)
        return self._forward(X, self._bufs(X.shape[0]))[-1].copy()

    def forward_backward(self, X, y, denom=None, on_grad=None, accumulate=False):
        """Loss over the batch (a 0-d array on the model's device) and its gradient in `self.grads`.

        X: (B, n_in); y: (B,) labels or (B, n_out) targets.
        denom: what the loss sum is divided by (default B): the data-parallel
            code passes the global batch size.
        on_grad(i): called as soon as layer i's dW and db are final, last layer
            first, so that communication can start during backward.
        accumulate: add to the gradients already in `self.grads` instead of
            overwriting them (gradient accumulation over micro-batches).
        """
        X = self._check_input(X)
        B = X.shape[0]
        if self.loss_name == "softmax_cross_entropy" and B and isinstance(y, np.ndarray):
            # an out-of-range label would silently index another sample's logit
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.sizes[-1]:
                raise UsageError(f"label {hi if hi >= self.sizes[-1] else lo} is out of range for a model "
                                 f"with {self.sizes[-1]} classes")
        bufs = self._bufs(B)
        acts = self._forward(X, bufs)
        loss, dZ = self.loss_fn(acts[-1], y, denom, dZ=bufs["dA"][-1])
        if accumulate and self._scratch is None:
            self._scratch = self.xp.zeros_like(self.grads)
        span = self.tracer.span
        for L in reversed(self.layers):
            i = L.index
            with span(f"backward L{i}", "backward"):
                if accumulate:
                    dW = self._scratch[L.start:L.start + L.dW.size].reshape(L.dW.shape)
                    db = self._scratch[L.start + L.dW.size:L.stop]
                else:
                    dW, db = L.dW, L.db
                dX = bufs["dA"][i - 1] if i > 0 else None
                dense_backward(dZ, acts[i], L.W, dX=dX, dW=dW, db=db, need_dX=i > 0)
                if accumulate:
                    self.grads[L.start:L.stop] += self._scratch[L.start:L.stop]
                if i > 0:
                    prev = self.layers[i - 1]
                    dZ = prev.backward_fn(dX, bufs["Z"][i - 1], acts[i], out=dX)
            if on_grad is not None:
                on_grad(i)
        return loss

    def zero_grad(self):
        self.grads.fill(0)

    # -- inspection and state -------------------------------------------------
    def grad_norms(self) -> list[float]:
        """L2 norm of each layer's gradient (dW and db together)."""
        xp = self.xp
        return [math.sqrt(float(xp.vdot(self.grads[L.start:L.stop], self.grads[L.start:L.stop])))
                for L in self.layers]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies named layers.0.W, layers.0.b, ..."""
        out = {}
        for L in self.layers:
            out[f"layers.{L.index}.W"] = backend.to_numpy(L.W).copy()
            out[f"layers.{L.index}.b"] = backend.to_numpy(L.b).copy()
        return out

    def load_state_dict(self, state) -> None:
        for L in self.layers:
            for name, view in ((f"layers.{L.index}.W", L.W), (f"layers.{L.index}.b", L.b)):
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
        return (f"MLP({self.sizes}, activation={self.activation!r}, loss={self.loss_name!r}, "
                f"params={self.num_params}, dtype={self.dtype.name}, device={self.device})")
