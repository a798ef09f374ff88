"""ONNX export: onnxruntime, given RAW rows, computes what Model.predict_proba / predict compute (1e-5, float32),
for MLPs (every activation, binary and multi-class, string labels, regression in the targets' units) and a CNN
with every layer kind; `ddp export` writes the same graph."""
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits

import ddp
from helpers import ROOT

ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnx and onnxruntime: pip install -e '.[onnx]'")
pytest.importorskip("onnx", reason="ONNX export tests need onnx: pip install -e '.[onnx]'")


def serve(path_or_model, X):
    """What a user serving the model runs: onnxruntime on raw float32 rows."""
    src = path_or_model if isinstance(path_or_model, str) else path_or_model.to_onnx().SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"X": X.astype(np.float32)})))


def assert_serves_as_ddp(model, X):
    out = serve(model, X)
    np.testing.assert_allclose(out["probabilities"], model.predict_proba(X), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out["label"], model.predict(X))


DIGITS = load_digits(return_X_y=True)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid", "tanh", "identity"])
def test_an_mlp_exports_with_its_preprocessing_and_softmax(activation):
    X, y = DIGITS
    model = ddp.fit(X, np.array(list("abcdefghij"))[y], hidden="32,16", activation=activation, epochs=3, seed=1)
    assert_serves_as_ddp(model, X)


def test_binary_cross_entropy_exports_both_columns():
    X, y = load_breast_cancer(return_X_y=True)
    model = ddp.fit(X, y + 3, hidden="8", loss="binary_cross_entropy", epochs=3)
    assert_serves_as_ddp(model, X)
    assert set(serve(model, X)["label"]) <= {3, 4}


def test_regression_comes_back_in_the_targets_units():
    X, y = load_diabetes(return_X_y=True)
    Y = np.column_stack([y, -2 * y + 7])
    model = ddp.fit(X, Y, hidden="8", epochs=3)
    np.testing.assert_allclose(serve(model, X)["prediction"], model.predict(X), rtol=1e-5, atol=1e-5)


def test_a_cnn_with_every_layer_kind_exports():
    X, y = DIGITS
    model = ddp.fit(X, y, arch="conv:4:3:1:1,relu,batchnorm,maxpool:2,conv:4:2:1,layernorm,avgpool:1,flatten,"
                    "dropout:0.1,dense:16,sigmoid,dense:10", input_shape="1,8,8", epochs=2, batch_size=128)
    assert_serves_as_ddp(model, X)


def test_ddp_export_writes_the_checkpoints_graph(tmp_path):
    X, y = DIGITS
    est = ddp.MLPClassifier(hidden="16", epochs=5).fit(X, y)
    est.model_.save(str(tmp_path / "m.npz"))
    r = subprocess.run([sys.executable, "-m", "ddp", "export", "--checkpoint", str(tmp_path / "m.npz"), "--format",
                        "onnx", "--out", str(tmp_path / "model.onnx")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 0, r.stderr
    out = serve(str(tmp_path / "model.onnx"), X)
    np.testing.assert_allclose(out["probabilities"], est.predict_proba(X), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out["label"], est.predict(X))
