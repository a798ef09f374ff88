"""The command line: help, gradcheck, TOML + flags, and bad input -> one line, exit code 2."""
import json

import numpy as np

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


# The bad-input set (flags, TOML, data files, checkpoints, run folders) is tests/test_bad_input.py.


def test_a_checkpoint_cannot_be_resumed_on_another_dataset(tmp_path):
    """A digits checkpoint resumed on breast_cancer is refused by name, before anything is written."""
    out = tmp_path / "o"
    assert run_cli("train", *TINY, "--dataset", "digits", "--out", str(out)).returncode == 0
    one_line_error(run_cli("train", *TINY, "--dataset", "breast_cancer", "--resume", str(out / "checkpoint.npz"),
                           "--out", str(tmp_path / "p")), "--dataset 'breast_cancer' differs")
    assert not (tmp_path / "p").exists()
