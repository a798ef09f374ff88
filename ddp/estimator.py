"""scikit-learn estimators: ddp in a Pipeline, GridSearchCV or cross_val_score.

    from sklearn.model_selection import GridSearchCV
    search = GridSearchCV(ddp.MLPClassifier(epochs=30), {"lr": [0.01, 0.1], "hidden": ["32", "64,32"]}).fit(X, y)

Every setting of `ddp train` that is not about the data source is a constructor parameter (the TOML key
names; the signature is generated from config.Config, so the two cannot drift apart). `fit` calls ddp.fit:
under MPI, call it on every rank with the same arrays and the ranks train one model together.
"""
from __future__ import annotations

import inspect
import warnings

from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .api import fit
from .config import FIELDS

# Settings that name the data (fit takes arrays) or belong to a command-line run.
NOT_PARAMS = {"dataset", "data_path", "task", "n_samples", "n_features", "n_classes", "resume"}
# As scikit-learn's MLPs: its defaults (one hidden layer of 100, Adam at 1e-3, batches of 200, 200 epochs),
# float64, nothing held out, nothing printed.
DEFAULTS = {"hidden": "100", "optimizer": "adam", "lr": 1e-3, "batch_size": 200, "epochs": 200, "dtype": "float64",
            "val_fraction": 0.0, "test_fraction": 0.0, "progress": False, "quiet": True}
PARAMS = {name: DEFAULTS.get(name, f.default) for name, f in FIELDS.items() if name not in NOT_PARAMS}


def _init(self, **params):
    for name, default in PARAMS.items():
        setattr(self, name, params.get(name, default))


_init.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in PARAMS.items()])


class _Estimator(BaseEstimator):
    __init__ = _init
    _task = ""

    def fit(self, X, y):
        """Train on X: (n, n_features) and y; returns self. Fitted: model_ (a ddp.Model), n_features_in_,
        loss_curve_ (train loss per epoch), validation_scores_ (accuracy or R² per epoch; None without
        validation), n_iter_ (epochs run), and a classifier's classes_."""
        regression = self._task == "regression"
        X, y = validate_data(self, X, y, multi_output=regression, y_numeric=regression)
        if not regression:
            check_classification_targets(y)
        params = self.get_params()
        n = len(X) - round(self.val_fraction * len(X)) - round(self.test_fraction * len(X))   # as data.split
        if params["batch_size"] > n > 0:         # as scikit-learn's MLPs: clipped (a warning if it was asked for)
            if self.batch_size != PARAMS["batch_size"]:
                warnings.warn(f"batch_size {self.batch_size} is larger than the {n} training samples; clipped")
            params["batch_size"] = n
        self.model_ = fit(X, y, verbose=not self.quiet, task=self._task, **params)
        if not regression:
            self.classes_ = self.model_.classes_
        history = self.model_.summary.get("history", [])
        key = "val_r2" if regression else "val_accuracy"
        self.loss_curve_ = [r["train_loss"] for r in history]
        self.validation_scores_ = [r[key] for r in history] if history and key in history[0] else None
        self.n_iter_ = self.model_.summary["epochs"]
        return self

    def predict(self, X):
        check_is_fitted(self)
        return self.model_.predict(validate_data(self, X, reset=False))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = self._task == "regression"
        return tags


class MLPClassifier(ClassifierMixin, _Estimator):
    """ddp's MLP as a scikit-learn classifier: labels may be numbers or strings."""
    _task = "classification"

    def predict_proba(self, X):
        check_is_fitted(self)
        return self.model_.predict_proba(validate_data(self, X, reset=False))


class MLPRegressor(RegressorMixin, _Estimator):
    """ddp's MLP as a scikit-learn regressor: y (n,) or (n, k), predictions in the target's units."""
    _task = "regression"
