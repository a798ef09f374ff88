"""The run's lifecycle from the command line: resume from the checkpoint alone, run folders that never lose
work, config.toml, --checkpoint-every, best.npz, metrics without duplicate epochs, what a person sees."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, run_cli

SMALL = ["--dataset", "synthetic_classification", "--n-samples", "300", "--hidden", "16,8", "--batch-size", "32",
         "--epochs", "4", "--lr", "0.05", "--momentum", "0.9", "--schedule", "cosine", "--dtype", "float64",
         "--seed", "3", "--no-progress", "--quiet"]


def arrays(path):
    """A checkpoint's numeric arrays: weights, optimizer state, position (config and meta set aside)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k not in ("config", "meta")}


def assert_same_arrays(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def ok(res):
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def one_line_error(res, *words):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ddp: error:"), err
    for w in words:
        assert w in err, (w, err)


# --------------------------------------------------------------------------- resume from the checkpoint alone

@pytest.mark.parametrize("opt", [["--optimizer", "sgd"], ["--optimizer", "adam", "--momentum", "0"]],
                         ids=["sgd-momentum", "adam"])
def test_resume_with_no_other_flag_is_bitwise_the_uninterrupted_run(tmp_path, opt):
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run_cli("train", *SMALL, *opt, "--out", str(a)))
    ok(run_cli("train", *SMALL, *opt, "--max-steps", "13", "--out", str(b)))      # stops inside epoch 2
    assert int(np.load(b / "checkpoint.npz")["step"]) == 13
    res = ok(run_cli("train", "--resume", str(b / "checkpoint.npz")))             # nothing else
    assert_same_arrays(arrays(a / "checkpoint.npz"), arrays(b / "checkpoint.npz"))
    # the resumed run kept the saved configuration: optimizer, schedule, seed, data
    cfg = json.loads((b / "summary.json").read_text())["config"]
    assert cfg["optimizer"] == opt[1] and cfg["schedule"] == "cosine" and cfg["seed"] == 3
    assert f"run folder {b}" in res.stdout
    # one record per epoch, no duplicate: the partial record of epoch 2 was replaced when it ended
    epochs = [json.loads(x)["epoch"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


@pytest.mark.parametrize("flag, value", [("--seed", "4"), ("--hidden", "16"), ("--optimizer", "adam"),
                                         ("--lr", "0.1"), ("--dataset", "digits"), ("--dtype", "float32"),
                                         ("--n-samples", "301"), ("--consistency", "async"),
                                         ("--staleness", "2")])
def test_resume_refuses_a_setting_that_changes_the_computation(tmp_path, flag, value):
    out = tmp_path / "r"
    ok(run_cli("train", *SMALL, "--max-steps", "5", "--out", str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = run_cli("train", "--resume", str(out / "checkpoint.npz"), flag, value)
    one_line_error(res, flag, "differs")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_allows_run_settings_and_an_equal_value(tmp_path):
    out = tmp_path / "r"
    ok(run_cli("train", *SMALL, "--max-steps", "5", "--out", str(out)))
    ok(run_cli("train", "--resume", str(out / "checkpoint.npz"), "--epochs", "5", "--seed", "3", "--lr", "0.05",
               "--checkpoint-every", "7", "--quiet", "--no-progress"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 5 and summary["config"]["epochs"] == 5


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path):
    out = tmp_path / "f"
    ok(run_cli("train", *SMALL, "--out", str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = ok(run_cli("train", "--resume", str(out / "checkpoint.npz")))
    assert "already finished" in res.stdout and "--epochs" in res.stdout
    assert "ddp: epoch" not in res.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_record_written_after_the_checkpoint_is_not_duplicated(tmp_path):
    """A crash between writing an epoch's record and saving its checkpoint: the resumed run drops the record
    the checkpoint does not cover, then writes it again."""
    out = tmp_path / "c"
    ok(run_cli("train", *SMALL, "--epochs", "2", "--out", str(out)))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    ghost = dict(json.loads(lines[-1]), epoch=3, step=40)        # as if epoch 3 was recorded, then a crash
    (out / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(ghost), '{"epoch": 4, "st']) + "\n")
    ok(run_cli("train", "--resume", str(out / "checkpoint.npz"), "--epochs", "4"))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    assert [r["step"] for r in recs] == [7, 14, 21, 28]              # 210 training rows, batch 32


# --------------------------------------------------------------------------- run folders

def test_a_new_run_never_replaces_an_existing_one(tmp_path):
    out = tmp_path / "run"
    ok(run_cli("train", *SMALL, "--out", str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(run_cli("train", *SMALL, "--out", str(out)), "already holds a run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    ok(run_cli("train", *SMALL, "--epochs", "1", "--overwrite", "--out", str(out)))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_without_out_each_run_gets_its_own_folder(tmp_path):
    for _ in range(2):
        ok(run_cli("train", "--dataset", "synthetic_regression", "--n-samples", "100", "--epochs", "1",
                   "--hidden", "4", "--batch-size", "16", cwd=str(tmp_path)))
    assert sorted(os.listdir(tmp_path / "runs")) == ["synthetic_regression", "synthetic_regression-2"]


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("precious")
    one_line_error(run_cli("train", *SMALL, "--out", str(tmp_path / "f")), "is a file")
    assert (tmp_path / "f").read_text() == "precious"


def test_config_toml_reproduces_the_run_and_summary_holds_it(tmp_path):
    a = tmp_path / "a"
    ok(run_cli("train", *SMALL, "--epochs", "2", "--out", str(a)))
    ok(run_cli("train", "--config", str(a / "config.toml"), "--out", str(tmp_path / "b")))
    assert_same_arrays(arrays(a / "checkpoint.npz"), arrays(tmp_path / "b" / "checkpoint.npz"))
    summary = json.loads((a / "summary.json").read_text())
    assert summary["config"]["hidden"] == "16,8" and summary["config"]["seed"] == 3


def test_checkpoint_every_saves_inside_the_epoch(tmp_path):
    """A run that dies at step 12 (7 steps per epoch) keeps the --checkpoint-every 5 save of step 10;
    without it, the last checkpoint would be the epoch end at step 7."""
    from ddp.config import Config
    from ddp.train import run

    def die(step, model, comm):
        if step == 12:
            raise RuntimeError("killed")
    base = dict(dataset="synthetic_classification", n_samples=300, hidden="8", batch_size=32, epochs=4,
                progress=False, quiet=True)
    for every, expect in ((5, (10, 1, 3)), (0, (7, 1, 0))):
        out = tmp_path / f"every{every}"
        with pytest.raises(RuntimeError, match="killed"):
            run(Config(out=str(out), checkpoint_every=every, **base), on_step=die)
        ck = np.load(out / "checkpoint.npz")
        assert (int(ck["step"]), int(ck["epoch"]), int(ck["batch_in_epoch"])) == expect


def test_best_checkpoint(tmp_path):
    # best.npz is the checkpoint of the epoch with the best validation accuracy
    g = tmp_path / "g"
    ok(run_cli("train", *SMALL, "--epochs", "8", "--lr", "0.3", "--out", str(g)))
    recs = [json.loads(x) for x in (g / "metrics.jsonl").read_text().splitlines()]
    best = max(recs, key=lambda r: (r["val_accuracy"], -r["step"]))
    assert int(np.load(g / "best.npz")["step"]) == best["step"]
    assert json.loads((g / "summary.json").read_text())["best"]["step"] == best["step"]


def test_checkpoint_every_resumes_bitwise(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run_cli("train", *SMALL, "--out", str(a)))
    ok(run_cli("train", *SMALL, "--checkpoint-every", "5", "--max-steps", "22", "--out", str(b)))
    ok(run_cli("train", "--resume", str(b / "checkpoint.npz")))
    assert_same_arrays(arrays(a / "checkpoint.npz"), arrays(b / "checkpoint.npz"))


# --------------------------------------------------------------------------- what a person sees

def test_output_to_a_file_has_one_line_per_epoch_and_no_carriage_return(tmp_path):
    log = tmp_path / "log"
    with open(log, "wb") as fh:
        res = subprocess.run([sys.executable, "-m", "ddp", "train", "--dataset", "digits", "--hidden", "16",
                              "--epochs", "3", "--out", str(tmp_path / "o")], stdout=fh, stderr=subprocess.STDOUT,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert res.returncode == 0
    text = log.read_bytes()
    assert b"\r" not in text
    epoch_lines = [x for x in text.decode().splitlines() if x.startswith("ddp: epoch")]
    assert len(epoch_lines) == 3
    assert all("train loss" in x and "val accuracy" in x and "samples/s" in x for x in epoch_lines)
    quiet = run_cli("train", "--dataset", "digits", "--hidden", "16", "--epochs", "3", "--quiet",
                    "--out", str(tmp_path / "q"))
    assert "ddp: epoch" not in quiet.stdout and "ddp: done" in quiet.stdout


def test_help_lists_the_choices_of_every_name_option():
    from ddp.config import FIELDS
    text = " ".join(run_cli("train", "--help").stdout.split())
    for name, f in FIELDS.items():
        for choice in f.metadata["choices"] or ():
            assert choice in text, (name, choice)
    assert "digits, breast_cancer, diabetes" in text
    g = " ".join(run_cli("gradcheck", "--help").stdout.split())
    assert "leaky_relu" in g and "binary_cross_entropy" in g


# --------------------------------------------------------------------------- data files

def test_data_path_format_is_inferred_and_string_labels_work(tmp_path):
    """An iris-like CSV with a header and string labels, given only by --data-path."""
    rng = np.random.default_rng(0)
    names = np.array(["setosa", "versicolor", "virginica"])
    y = rng.integers(0, 3, 240)
    X = rng.standard_normal((240, 4)) + 2.5 * y[:, None]
    rows = ["sepal_length,sepal_width,petal_length,petal_width,species"]
    rows += [",".join(f"{v:.6f}" for v in x) + f",{names[c]}" for x, c in zip(X, y)]
    (tmp_path / "iris.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "o"
    res = ok(run_cli("train", "--data-path", str(tmp_path / "iris.csv"), "--hidden", "8", "--epochs", "20",
                     "--batch-size", "16", "--lr", "0.05", "--out", str(out)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["dataset"] == "csv" and summary["test_accuracy"] > 0.9, res.stdout
    (tmp_path / "new.csv").write_text("\n".join(rows[:1] + rows[1:11]) + "\n")
    pred = ok(run_cli("predict", "--checkpoint", str(out / "checkpoint.npz"), "--data-path",
                      str(tmp_path / "new.csv"))).stdout.split()
    assert pred[0] == "prediction" and set(pred[1:]) <= set(names) and len(pred) == 11
    assert np.mean(np.array(pred[1:]) == names[y[:10]]) >= 0.9


def test_data_path_with_a_builtin_dataset_is_an_error(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.zeros((10, 3)), y=np.arange(10) % 2)
    one_line_error(run_cli("train", "--dataset", "digits", "--data-path", str(tmp_path / "d.npz"),
                           "--out", str(tmp_path / "o")), "--data-path", "built in")
    one_line_error(run_cli("train", "--data-path", str(tmp_path / "d.txt"), "--out", str(tmp_path / "o")),
                   "cannot tell the format")


def test_resume_refuses_data_that_changed_on_disk(tmp_path):
    """Same flags, but the file behind --data-path was rewritten: the checkpoint's data fingerprint differs."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((120, 4)), rng.integers(0, 2, 120)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    out = tmp_path / "o"
    ok(run_cli("train", "--data-path", str(tmp_path / "d.npz"), "--hidden", "4", "--batch-size", "16",
               "--max-steps", "3", "--quiet", "--out", str(out)))
    np.savez(tmp_path / "d.npz", X=X + 1, y=y)
    before = (out / "checkpoint.npz").read_bytes()
    one_line_error(run_cli("train", "--resume", str(out / "checkpoint.npz")), "training data differs")
    assert (out / "checkpoint.npz").read_bytes() == before
