"""Use a trained model, or train one on arrays you already hold, as with scikit-learn.

    import ddp
    model = ddp.load("runs/digits/checkpoint.npz")
    model.predict(X_raw)            # labels as they appeared in the training data
    model.predict_proba(X_raw)      # (n, n_classes), classification
    model.score(X_raw, y)           # accuracy, or R² for regression

    model = ddp.fit(X, y, hidden="64", epochs=30, lr=0.05, momentum=0.9)    # any setting of `ddp train`

Inputs are RAW rows: the checkpoint carries the training set's standardization and applies it, and
regression predictions come back in the target's own units. Under mpiexec (or launch/mpirun.sh running your
script), `ddp.fit` trains data-parallel on every rank and returns the same model on each.
"""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np

from .backend import limit_threads, to_numpy
from .checkpoint import CHECKPOINT, load_checkpoint, model_arrays, model_meta, read_checkpoint, write_npz
from .comm import SerialComm, world_comm
from .config import FIELDS, Config, coerce
from .data import Dataset, from_arrays, from_parts, split
from .errors import UsageError
from .guard import one_job
from .model import MLP, Network
from .preprocess import Preprocess
from .run import resolve_config


class Model:
    """A trained network with the preprocessing it was trained with. `config` is the run's configuration;
    `summary`, after ddp.fit, the run's summary (steps, world size, validation and test metrics).
    It pickles (and deep-copies) as the bytes of its checkpoint."""

    def __init__(self, mlp: Network, prep: Preprocess, config: dict, summary: dict | None = None, meta=None):
        self.mlp, self.prep, self.config, self.summary = mlp, prep, config, summary
        self.meta = meta or model_meta(mlp, prep, None)

    def save(self, path: str) -> None:
        """Write the model as a checkpoint that ddp.load, `ddp predict` and `ddp export` read."""
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"cannot write {path}: its folder does not exist")
        write_npz(path, self._arrays())

    def _arrays(self) -> dict:
        counters = {"step": (self.summary or {}).get("steps", 0), "epoch": 0, "batch_in_epoch": 0}
        return {**self.mlp.state_dict(), **model_arrays(self.config, self.meta, self.prep),
                **{k: np.array(v, np.int64) for k, v in counters.items()}}

    def to_onnx(self, path: str | None = None):
        """The model, its preprocessing and (classification) its softmax as one ONNX graph on raw rows."""
        from .export import to_onnx
        return to_onnx(self, path)

    def __reduce__(self):
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())
        return _from_bytes, (buf.getvalue(), self.summary)

    @property
    def task(self) -> str:
        return self.prep.task

    @property
    def classes_(self) -> np.ndarray | None:
        return self.prep.classes

    def decision_function(self, X) -> np.ndarray:
        """The model's outputs (logits, or standardized targets) for raw rows X: (n, n_features)."""
        Z = to_numpy(self.mlp.forward(self.prep.inputs(X))).astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(Z).all(axis=1))
        if bad.size:                   # finite inputs, but beyond what the model's float type can carry
            raise UsageError(f"row {bad[0]} of the inputs overflows the model's {self.mlp.dtype} arithmetic "
                             f"({bad.size} rows): its values are far outside the training data's range")
        return Z

    def predict(self, X) -> np.ndarray:
        """Labels (classification) or targets in their own units (regression), one per row of X."""
        return self.prep.decode(self.decision_function(X))

    def predict_proba(self, X) -> np.ndarray:
        """(n, n_classes) class probabilities, columns in the order of `classes_`."""
        if self.task != "classification":
            raise UsageError("predict_proba needs a classification model; this one is regression")
        Z = self.decision_function(X)
        if Z.shape[1] == 1:                        # binary cross-entropy: one logit for class 1
            p = 0.5 * (1 + np.tanh(0.5 * Z[:, 0]))
            return np.stack([1 - p, p], axis=1)
        E = np.exp(Z - Z.max(axis=1, keepdims=True))
        return E / E.sum(axis=1, keepdims=True)

    def evaluate(self, X, y) -> dict:
        """{'loss', 'accuracy' or 'r2', 'n'} on raw rows, computed as training computes them."""
        from .evaluate import evaluate
        Xs = self.prep.inputs(X)
        ys = self.prep.encode(y)
        if len(ys) != len(Xs):
            raise UsageError(f"X has {len(Xs)} rows but y has {len(ys)}")
        ds = Dataset(Xs, ys, self.task, None if self.prep.classes is None else len(self.prep.classes), "eval")
        return {**evaluate(self.mlp, ds, SerialComm()), "n": len(ds)}

    def score(self, X, y) -> float:
        """Accuracy (classification) or R² averaged over outputs (regression), as scikit-learn's score."""
        return self.evaluate(X, y)["accuracy" if self.task == "classification" else "r2"]

    def __repr__(self):
        return f"ddp.Model({self.mlp!r}, task={self.task!r})"


def load(path: str, device: str = "cpu") -> Model:
    """The model in a checkpoint (checkpoint.npz or best.npz, or a run folder holding checkpoint.npz)."""
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    return _from_checkpoint(load_checkpoint(path), path, device)


def _from_bytes(data: bytes, summary=None) -> Model:
    return _from_checkpoint(read_checkpoint(io.BytesIO(data), "(pickled model)"), "(pickled model)", "cpu", summary)


def _from_checkpoint(ckpt: dict, path: str, device: str, summary=None) -> Model:
    if (meta := ckpt.get("meta")) is None:
        raise UsageError(f"checkpoint {path} has no 'meta': it was written before ddp saved what it needs to "
                         "use the model (format 1); retrain to use it")
    try:
        kw = dict(loss=meta["loss"], init=meta.get("init", "he"), dtype=meta["dtype"], device=device)
        mlp = (Network(meta["arch"], meta["input_shape"], **kw) if meta.get("activation") is None
               else MLP(meta["sizes"], activation=meta["activation"], **kw))
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"checkpoint {path}: bad 'meta' ({type(e).__name__}: {e})") from None
    mlp.load_state_dict(ckpt)
    return Model(mlp, Preprocess.from_arrays(ckpt, meta.get("task", "classification"), path), ckpt.get("config", {}),
                 summary, meta)


def fit(X, y, X_val=None, y_val=None, *, comm=None, verbose=False, **settings) -> Model:
    """Train on arrays in memory with the settings of `ddp train` (keyword arguments named like the TOML
    keys: hidden="64,32", epochs=20, lr=0.05, optimizer="adam", simulate_ranks=4, mode="ps", ...).

    X: (n, d) numbers, y: (n,) labels (numbers or strings) or (n,) / (n, k) targets. X_val, y_val: an
    optional validation set. Nothing is held out otherwise (val_fraction and test_fraction default to 0
    here), and nothing is written unless out="FOLDER" is given; verbose=True prints ddp's start, epoch and
    final lines (silent by default, as scikit-learn is). Under MPI, call it on every rank with the
    same arrays: each rank trains on its shard of every batch, and every rank returns the same model.
    """
    if unknown := sorted(set(settings) - set(FIELDS)):
        raise UsageError(f"unknown setting(s) {', '.join(unknown)}; see `ddp train --help` for the names")
    for name in ("dataset", "data_path"):
        if name in settings:
            raise UsageError(f"ddp.fit trains on the arrays it is given; {name!r} does not apply")
    # Checked as TOML values are (NumPy scalars, as a grid search may pass, are taken as Python's).
    settings = {k: coerce(k, v.item() if isinstance(v, np.generic) else v) for k, v in settings.items()}
    if (X_val is None) != (y_val is None):
        raise UsageError("give both X_val and y_val, or neither")
    settings = {"val_fraction": 0.0, "test_fraction": 0.0, "progress": False, "quiet": not verbose, **settings}
    if X_val is not None and settings["val_fraction"]:
        raise UsageError("give X_val/y_val or val_fraction, not both")
    cfg = resolve_config({"dataset": "npz", "out": "", **settings})
    raw = _raw_splits(cfg, X, y, X_val, y_val)
    from .train import run_with_setup
    if comm is None and not cfg.simulate_ranks:
        comm = world_comm()
    # Ranks sharing a node share its cores, as under the CLI.
    limit_threads(getattr(comm, "local_size", None), cfg.simulate_ranks)
    # one_job: an error every rank raises (bad settings) propagates on every rank; one that only some ranks
    # raise ends the whole job instead of leaving the others in a collective.
    with one_job(), (contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())):
        summary, setup = run_with_setup(cfg, comm, raw=raw)
    return Model(setup.model, setup.prep, cfg.to_dict(), summary,
                 model_meta(setup.model, setup.prep, setup.fingerprint))


def _raw_splits(cfg: Config, X, y, X_val, y_val):
    """(train, val, test) before scaling. A validation set given apart is encoded with the training labels'
    classes: both go through one Dataset, so a label's index is the same in each."""
    if X_val is None:
        return split(from_arrays(X, y, cfg.task, "arrays"), cfg.val_fraction, cfg.test_fraction, seed=cfg.seed)
    train, val = from_parts([(X, y), (X_val, y_val)], cfg.task, "arrays")
    if cfg.test_fraction:
        train, _, test = split(train, 0.0, cfg.test_fraction, seed=cfg.seed)
    else:
        test = train.subset(slice(0, 0))
    return train, val, test


def read_rows(path: str, n_features: int):
    """(X, y or None) from a file of raw rows: .npz (X, and y if present), CSV (n_features columns, or one
    more holding the target; header detected), or idx. For `ddp predict` and `ddp evaluate`."""
    from .data import infer_format
    from .formats import read_csv, read_idx_pair, read_npz_arrays
    fmt = infer_format(path)
    if fmt == "npz":
        arrays = read_npz_arrays(path, required=("X",))
        return arrays["X"], arrays.get("y")
    if fmt == "idx":
        return read_idx_pair(path, labels_required=False)[:2]
    X, last = read_csv(path)
    if X.shape[1] == n_features:
        return X, last
    if X.shape[1] + 1 == n_features and last.dtype.kind == "f":
        return np.column_stack([X, last]), None
    raise UsageError(f"{path} has {X.shape[1] + 1} columns; the model takes {n_features} features "
                     f"(give {n_features} columns, or {n_features + 1} with the target last)")
