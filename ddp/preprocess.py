"""Preprocessing: what turns raw rows into the model's inputs, and its outputs back into labels or units.
setup.load_data fits it on the training set; checkpoints carry it (arrays data.*), so ddp.load's Model
applies it to raw rows: prep.inputs(X_raw), prep.decode(Z)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import Standardizer
from .errors import UsageError


@dataclass
class Preprocess:
    """What turns raw rows into the model's inputs, and its outputs back into labels or units.

    x: the training set's per-feature mean and std (identity with --scale none; uint8 data: mean 0, std 255).
    y: the same for regression targets (training runs on standardized targets).
    classes: the label each output index stands for, as it appeared in the data (numbers or strings).
    """
    task: str
    x: Standardizer
    y: Standardizer | None = None
    classes: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return int(self.x.mean.shape[0])

    def inputs(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.dtype.kind not in "biuf":
            raise UsageError(f"inputs must be a 2-D numeric array, got shape {X.shape} of {X.dtype}")
        if X.shape[1] != self.n_features:
            raise UsageError(f"inputs have {X.shape[1]} features, the model was trained on {self.n_features}")
        X = X.astype(np.float64)
        if not np.isfinite(X).all():
            raise UsageError(f"inputs contain NaN or Inf ({np.count_nonzero(~np.isfinite(X))} values)")
        return self.x.transform(X)

    def encode(self, y) -> np.ndarray:
        """Raw labels -> class indices (classification), or targets -> standardized (n, k) (regression)."""
        y = np.asarray(y)
        if self.task == "regression":
            y = y.astype(np.float64).reshape(len(y), -1)
            return self.y.transform(y) if self.y is not None else y
        y = y.reshape(-1)
        if y.dtype.kind == "f" and self.classes.dtype.kind in "iu" and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        if y.dtype.kind in "US" and self.classes.dtype.kind not in "US":
            raise UsageError(f"labels are strings, but the model's classes are {self.classes.tolist()[:10]}")
        idx = np.minimum(np.searchsorted(self.classes, y), len(self.classes) - 1)
        unknown = self.classes[idx] != y
        if unknown.any():
            raise UsageError(f"label {y[unknown][0].item()!r} was not among the training classes "
                             f"{self.classes.tolist()[:10]}")
        return idx.astype(np.int64)

    def decode(self, Z) -> np.ndarray:
        """Model outputs (n, k) -> labels (classification) or targets in their own units (regression)."""
        if self.task == "regression":
            out = self.y.inverse(Z) if self.y is not None else Z
            return out[:, 0] if out.shape[1] == 1 else out
        idx = (Z[:, 0] > 0).astype(np.int64) if Z.shape[1] == 1 else Z.argmax(axis=1)
        return self.classes[idx]

    def arrays(self) -> dict:
        out = {"data.x_mean": self.x.mean, "data.x_std": self.x.std}
        if self.y is not None:
            out.update({"data.y_mean": self.y.mean, "data.y_std": self.y.std})
        if self.classes is not None:
            out["data.classes"] = self.classes
        return out

    @classmethod
    def from_arrays(cls, ckpt: dict, task: str, path: str) -> "Preprocess":
        for key in ("data.x_mean", "data.x_std"):
            if key not in ckpt:
                raise UsageError(f"checkpoint {path} has no {key!r}: it was written before ddp saved its "
                                 "preprocessing (format 1); retrain to use it on raw data")
        y = Standardizer.from_stats(ckpt["data.y_mean"], ckpt["data.y_std"]) if "data.y_mean" in ckpt else None
        if task == "classification" and "data.classes" not in ckpt:
            raise UsageError(f"checkpoint {path} has no class labels (data.classes)")
        return cls(task, Standardizer.from_stats(ckpt["data.x_mean"], ckpt["data.x_std"]), y, ckpt.get("data.classes"))
