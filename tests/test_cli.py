"""The command line: help, gradcheck, TOML + flags, and bad input -> one line, exit code 2."""
import json

import numpy as np
import pytest

from helpers import run_cli

TINY = ["--hidden", "8", "--epochs", "1", "--no-progress"]


def one_line_error(res, *words):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("ddp: error:"), err
    for w in words:
        assert w in err, (w, err)


def test_help_lists_every_flag_with_help_text():
    res = run_cli("train", "--help")
    assert res.returncode == 0
    for flag in ["--dataset", "--hidden", "--batch-size", "--simulate-ranks", "--bucket-mb", "--accumulate",
                 "--compress", "--mode", "--servers", "--consistency", "--staleness", "--resume", "--max-steps",
                 "--grad-norms", "--config"]:
        assert flag in res.stdout


def test_gradcheck_command():
    res = run_cli("gradcheck", "--sizes", "4,6,3", "--activation", "sigmoid", "--batch", "1")
    assert res.returncode == 0, res.stderr
    errs = [float(line.rsplit(" ", 1)[1]) for line in res.stdout.splitlines() if line.startswith("layer")]
    assert len(errs) == 2 and max(errs) <= 1e-7
    assert "PASS" in res.stdout


def test_info_command():
    res = run_cli("info")
    assert res.returncode == 0 and "NumPy" in res.stdout and "MPI" in res.stdout


def test_toml_config_and_flag_override(tmp_path):
    (tmp_path / "run.toml").write_text('dataset = "breast_cancer"\nhidden = [8, 4]\nepochs = 3\nlr = 0.05\n'
                                       'progress = false\n')
    out = tmp_path / "out"
    res = run_cli("train", "--config", str(tmp_path / "run.toml"), "--epochs", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    cfg = json.loads(str(np.load(out / "checkpoint.npz", allow_pickle=False)["config"]))
    assert (cfg["dataset"], cfg["hidden"], cfg["epochs"], cfg["lr"]) == ("breast_cancer", "8,4", 2, 0.05)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "done" in res.stdout.splitlines()[-1]


BAD = [
    (["--activation", "swish"], ["swish"]),
    (["--loss", "hinge"], ["hinge"]),
    (["--optimizer", "rmsprop"], ["rmsprop"]),
    (["--dataset", "mnist"], ["mnist"]),
    (["--batch-size", "0"], ["batch size 0"]),
    (["--batch-size", "-3"], ["batch size -3"]),
    (["--batch-size", "100000"], ["100000", "larger than the training set"]),
    (["--lr", "-0.1"], ["learning rate", "-0.1"]),
    (["--hidden", "8,x"], ["hidden"]),
    (["--dataset", "diabetes", "--loss", "softmax_cross_entropy"], ["regression"]),
    (["--dataset", "digits", "--loss", "binary_cross_entropy"], ["2 classes"]),
    (["--resume", "does/not/exist.npz"], ["not found"]),
    (["--config", "missing.toml"], ["missing.toml"]),
    (["--simulate-ranks", "-1"], ["simulate"]),
    (["--epochs", "zero"], ["--epochs"]),
    (["--frobnicate"], ["frobnicate"]),
]


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags(tmp_path, args, words):
    one_line_error(run_cli("train", *TINY, "--out", str(tmp_path / "o"), *args), *words)


def test_bad_toml(tmp_path):
    (tmp_path / "a.toml").write_text("dataset = digits\n")            # unquoted string
    one_line_error(run_cli("train", "--config", str(tmp_path / "a.toml")), "not valid TOML")
    (tmp_path / "b.toml").write_text('datset = "digits"\n')
    one_line_error(run_cli("train", "--config", str(tmp_path / "b.toml")), "unknown key", "datset")
    (tmp_path / "c.toml").write_text('epochs = "ten"\n')
    one_line_error(run_cli("train", "--config", str(tmp_path / "c.toml")), "epochs", "int")


def test_data_problems(tmp_path):
    X = np.random.default_rng(0).standard_normal((40, 5))
    np.savez(tmp_path / "nan.npz", X=np.where(np.arange(5) == 2, np.nan, X), y=np.arange(40) % 2)
    one_line_error(run_cli("train", *TINY, "--dataset", "npz", "--data-path", str(tmp_path / "nan.npz")), "NaN")
    np.savez(tmp_path / "half.npz", X=X, y=np.arange(40) % 3 - 0.5)
    one_line_error(run_cli("train", *TINY, "--dataset", "npz", "--data-path", str(tmp_path / "half.npz"),
                           "--task", "classification", "--batch-size", "8"), "labels must be whole numbers")


def test_a_checkpoint_cannot_be_resumed_on_another_dataset(tmp_path):
    """A digits checkpoint resumed on breast_cancer is refused by name, before anything is written."""
    out = tmp_path / "o"
    assert run_cli("train", *TINY, "--dataset", "digits", "--out", str(out)).returncode == 0
    one_line_error(run_cli("train", *TINY, "--dataset", "breast_cancer", "--resume", str(out / "checkpoint.npz"),
                           "--out", str(tmp_path / "p")), "--dataset 'breast_cancer' differs")
    assert not (tmp_path / "p").exists()


def test_checkpoint_problems(tmp_path):
    out = tmp_path / "o"
    assert run_cli("train", *TINY, "--dataset", "digits", "--out", str(out)).returncode == 0
    ck = out / "checkpoint.npz"
    before = ck.read_bytes()
    # another architecture: the saved run must survive the failed attempt
    one_line_error(run_cli("train", *TINY, "--hidden", "9", "--resume", str(ck), "--out", str(out)),
                   "--hidden '9' differs")
    assert ck.read_bytes() == before
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(before[: len(before) // 2])
    one_line_error(run_cli("train", *TINY, "--resume", str(bad), "--out", str(out)), "corrupt")
    junk = tmp_path / "junk.npz"
    np.savez(junk, a=np.zeros(3))
    one_line_error(run_cli("train", *TINY, "--resume", str(junk), "--out", str(out)), "not a ddp checkpoint")
    # another optimizer's state
    one_line_error(run_cli("train", *TINY, "--optimizer", "adam", "--resume", str(ck), "--out", str(out)),
                   "optimizer")
