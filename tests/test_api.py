"""Using a trained model: ddp.load on raw rows, `ddp evaluate`, `ddp predict`, ddp.fit, `ddp plot`.

The reference for "raw" is the dataset as scikit-learn ships it, split by ddp.data.split with the run's
seed, and never standardized by the test: the checkpoint must carry the standardization itself.
"""
import json
import os

import numpy as np
import pytest

import ddp
from ddp.data import load_dataset, split
from helpers import ROOT, run_cli

QUICK = {   # the README's quick-start commands, shortened to a few epochs
    "digits": ["--hidden", "128,64", "--lr", "0.02", "--momentum", "0.9", "--batch-size", "32", "--epochs", "8"],
    "breast_cancer": ["--hidden", "16", "--lr", "0.01", "--optimizer", "adam", "--epochs", "10"],
    "diabetes": ["--hidden", "16", "--lr", "0.01", "--momentum", "0.9", "--batch-size", "32", "--epochs", "10"],
}


def raw_test_rows(dataset, seed=0, val=0.1, test=0.2):
    ds = load_dataset(dataset)
    _, _, t = split(ds, val, test, seed=seed)
    y = t.y[:, 0] if t.task == "regression" else t.classes[t.y]       # labels as the dataset has them
    return t.X, y


@pytest.mark.parametrize("dataset", list(QUICK))
def test_the_saved_model_scores_raw_rows_as_training_did(tmp_path, dataset):
    out = tmp_path / dataset
    res = run_cli("train", "--dataset", dataset, *QUICK[dataset], "--no-progress", "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    metric = "accuracy" if dataset != "diabetes" else "r2"
    X, y = raw_test_rows(dataset)
    assert np.abs(X).max() > 5 or dataset == "diabetes"     # really raw (digits: 0..16; cancer: up to 4254)
    model = ddp.load(str(out / "checkpoint.npz"))
    score = model.score(X, y)
    assert abs(score - summary[f"test_{metric}"]) <= 1e-12, (score, summary[f"test_{metric}"])
    # the command line prints the same figure
    ev = run_cli("evaluate", "--checkpoint", str(out / "checkpoint.npz"), "--dataset", dataset, "--split", "test",
                 "--json")
    assert ev.returncode == 0, ev.stderr
    got = json.loads(ev.stdout)
    assert abs(got[metric] - summary[f"test_{metric}"]) <= 1e-12 and got["n"] == len(X)
    assert abs(got["loss"] - summary["test_loss"]) <= 1e-9 * max(1.0, abs(summary["test_loss"]))
    # ddp predict on a CSV of the raw rows gives model.predict's answers, one per row
    rows = np.column_stack([X, y])
    np.savetxt(tmp_path / "rows.csv", rows, delimiter=",", fmt="%.17g",
               header=",".join([f"f{i}" for i in range(X.shape[1])] + ["target"]), comments="")
    pr = run_cli("predict", "--checkpoint", str(out / "checkpoint.npz"), "--data-path", str(tmp_path / "rows.csv"),
                 "--out", str(tmp_path / "pred.csv"))
    assert pr.returncode == 0, pr.stderr
    lines = (tmp_path / "pred.csv").read_text().splitlines()
    assert lines[0] == "prediction" and len(lines) == len(X) + 1
    expect = model.predict(X)
    if metric == "r2":
        np.testing.assert_allclose(np.array(lines[1:], float), expect, rtol=1e-12)
        assert np.abs(expect).mean() > 20      # diabetes targets are in their own units (about 150), not z-scores
    else:
        assert lines[1:] == [str(v) for v in expect]


def test_predict_proba_and_labels_are_consistent(tmp_path):
    out = tmp_path / "bc"
    assert run_cli("train", "--dataset", "breast_cancer", "--hidden", "8", "--epochs", "3", "--loss",
                   "binary_cross_entropy", "--out", str(out)).returncode == 0
    model = ddp.load(str(out))                             # a run folder works too
    X, y = raw_test_rows("breast_cancer")
    P = model.predict_proba(X)
    assert P.shape == (len(X), 2) and np.allclose(P.sum(1), 1)
    np.testing.assert_array_equal(model.classes_[P.argmax(1)], model.predict(X))
    pr = run_cli("predict", "--checkpoint", str(out / "checkpoint.npz"), "--data-path",
                 str(_npz(tmp_path, X)), "--proba")
    assert pr.returncode == 0, pr.stderr
    table = np.loadtxt(pr.stdout.splitlines()[1:], delimiter=",")
    np.testing.assert_allclose(table, P, rtol=1e-8)


def _npz(tmp_path, X):
    np.savez(tmp_path / "x.npz", X=X)
    return tmp_path / "x.npz"


def test_bad_inputs_to_a_model(tmp_path):
    out = tmp_path / "d"
    assert run_cli("train", "--dataset", "digits", "--hidden", "8", "--epochs", "1", "--out", str(out)).returncode == 0
    model = ddp.load(str(out / "checkpoint.npz"))
    with pytest.raises(ddp.UsageError, match="64"):
        model.predict(np.zeros((2, 5)))
    with pytest.raises(ddp.UsageError, match=r"^label 11 was not among the training classes"):
        model.score(np.zeros((2, 64)), np.array([3, 11]))
    with pytest.raises(ddp.UsageError, match="its folder does not exist"):
        model.save(str(tmp_path / "no" / "m.npz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    res = run_cli("evaluate", "--checkpoint", str(out / "nope.npz"), "--dataset", "digits")
    assert res.returncode == 2 and res.stderr.startswith("ddp: error:") and "not found" in res.stderr


def test_fit_takes_hidden_as_python_values():
    """hidden=16, (16,) and "16" are the same network; a wrong type is one line naming the key."""
    X = np.random.default_rng(0).normal(size=(120, 3))
    y = (X[:, 0] > 0).astype(int)
    kw = dict(epochs=1, batch_size=30, dtype="float64", seed=0)
    ref = ddp.fit(X, y, hidden="16", **kw).mlp.params
    for hidden in (16, (16,), [16]):
        assert np.array_equal(ddp.fit(X, y, hidden=hidden, **kw).mlp.params, ref)
    with pytest.raises(ddp.UsageError, match="'epochs' must be an int"):
        ddp.fit(X, y, hidden=16, epochs="2")


def test_fit_on_wine_is_in_scikit_learns_league():
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    X, y = load_wine(return_X_y=True)
    names = np.array(["barolo", "grignolino", "barbera"])[y]          # string labels, as in a CSV
    Xtr, Xte, ytr, yte = train_test_split(X, names, test_size=0.3, random_state=0, stratify=names)
    model = ddp.fit(Xtr, ytr, hidden="32", optimizer="adam", lr=1e-3, batch_size=32, epochs=200, seed=0)
    ours = model.score(Xte, yte)
    sc = StandardScaler().fit(Xtr)
    sk = MLPClassifier(hidden_layer_sizes=(32,), learning_rate_init=1e-3, batch_size=32, max_iter=200,
                       random_state=0).fit(sc.transform(Xtr), ytr)
    theirs = sk.score(sc.transform(Xte), yte)
    print(f"wine: ddp.fit {ours:.4f}, MLPClassifier {theirs:.4f}")
    assert ours >= theirs - 0.01
    assert set(model.predict(Xte)) <= set(names)


def test_fit_with_a_validation_set_and_simulated_ranks_equals_one_process():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 5))
    y = np.where(X[:, 0] + X[:, 1] > 0, "yes", "no")
    kw = dict(hidden="8", epochs=10, lr=0.1, batch_size=30, dtype="float64", seed=1)
    one = ddp.fit(X[:240], y[:240], X[240:], y[240:], **kw)
    four = ddp.fit(X[:240], y[:240], X[240:], y[240:], simulate_ranks=4, **kw)
    np.testing.assert_allclose(four.mlp.params, one.mlp.params, rtol=0, atol=1e-12)
    assert one.score(X[240:], y[240:]) > 0.8
    with pytest.raises(ddp.UsageError, match="unknown setting"):
        ddp.fit(X, y, hiden="8")


def test_regression_fit_predicts_in_the_targets_units():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 3))
    y = 1000 + 50 * X[:, 0] - 20 * X[:, 1]
    model = ddp.fit(X, y, hidden="", lr=0.05, epochs=40, batch_size=40, seed=0)
    np.testing.assert_allclose(model.predict(X[:5]), y[:5], rtol=1e-3)
    assert model.score(X, y) > 0.999


def test_plot_draws_every_run_and_the_gradient_norms(tmp_path):
    for act in ("sigmoid", "relu"):
        res = run_cli("train", "--dataset", "digits", "--hidden", "16,16,16", "--activation", act, "--epochs", "3",
                      "--grad-norms", "--out", str(tmp_path / act))
        assert res.returncode == 0, res.stderr
    from ddp.plot import make_figure
    fig = make_figure([str(tmp_path / "sigmoid"), str(tmp_path / "relu")])
    loss_ax, metric_ax, grad_ax = fig.axes[:3]
    assert sorted(line.get_label() for line in loss_ax.get_lines()) == [
        "relu train", "relu val", "sigmoid train", "sigmoid val"]
    assert sorted(line.get_label() for line in metric_ax.get_lines()) == ["relu", "sigmoid"]
    assert len(grad_ax.get_lines()) == 2 * 4 and grad_ax.get_yscale() == "log"     # 4 layers per run
    assert all(len(line.get_xdata()) == 3 for line in loss_ax.get_lines())        # one point per epoch
    res = run_cli("plot", str(tmp_path / "sigmoid"), str(tmp_path / "relu"), "--out", str(tmp_path / "c.png"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cli("plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "d.png"))
    assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr


def test_public_api_exports():
    for name in ("load", "fit", "Model", "MLP", "DataParallel", "world_comm", "SGD", "Adam", "make_optimizer",
                 "UsageError"):
        assert hasattr(ddp, name), name
    assert os.path.exists(os.path.join(ROOT, "ddp", "api.py"))
