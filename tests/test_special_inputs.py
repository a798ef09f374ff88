"""Issue 20: inputs that used to hang or trace back end with one line, exit 2, in one process and under the
launcher: a FIFO or a device given as a file, deeply nested TOML, abbreviated flags, a DDP_CUDA_AWARE that is
neither 0 nor 1; and a closed pipe ends `ddp predict` quietly with exit 0, as Unix tools do."""
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import LIVENESS_S, ROOT, run_cli, run_launcher

TRAIN = ["train", "--dataset", "synthetic_classification", "--n-samples", "300", "--hidden", "8",
         "--epochs", "2", "--no-progress", "--quiet"]


def one_line(res, *words, code=2):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("flag", ["--config", "--resume"])
def test_a_fifo_is_refused_not_opened(fifo, flag):
    one_line(run_cli(*TRAIN, flag, fifo, timeout=LIVENESS_S), "not a regular file")


def test_a_fifo_or_device_as_the_model_is_refused(fifo):
    for path in (fifo, "/dev/zero"):
        one_line(run_cli("predict", "--checkpoint", path, "--data-path", path, timeout=LIVENESS_S),
                 "not a regular file")


@pytest.mark.parametrize("dataset", ["csv", "npz"])
def test_a_fifo_as_the_data_is_named_as_such(fifo, dataset):
    one_line(run_cli("train", "--dataset", dataset, "--data-path", fifo, timeout=LIVENESS_S),
             "data file", "not a regular file")


def test_a_fifo_under_the_launcher_is_one_line(fifo):
    res = run_launcher("-n", "2", "--", *TRAIN, "--config", fifo, timeout=LIVENESS_S * 3)
    one_line(res, "not a regular file")


def test_deeply_nested_toml_is_one_line(tmp_path):
    cfg = tmp_path / "deep.toml"
    cfg.write_text("epochs = " + "[" * 20000 + "]" * 20000 + "\n")
    one_line(run_cli(*TRAIN, "--config", str(cfg)), "nested too deeply")


def test_abbreviated_flags_are_refused():
    one_line(run_cli(*TRAIN, "--epoch", "3"), "--epoch")


@pytest.mark.parametrize("value", ["off", "False", "garbage", ""])
def test_cuda_aware_accepts_only_0_or_1(monkeypatch, value):
    from ddp.comm import cuda_aware_mpi
    from ddp.errors import UsageError
    monkeypatch.setenv("DDP_CUDA_AWARE", value)
    with pytest.raises(UsageError, match="DDP_CUDA_AWARE must be 0 or 1"):
        cuda_aware_mpi()
    for ok, expected in (("0", False), ("1", True)):
        monkeypatch.setenv("DDP_CUDA_AWARE", ok)
        assert cuda_aware_mpi() is expected


def test_a_closed_pipe_ends_predict_quietly(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*TRAIN, "--out", str(out)).returncode == 0
    rows = tmp_path / "rows.csv"
    rows.write_text(("0.5," * 19 + "0.5\n") * 50000)
    cmd = (f"set -o pipefail; {sys.executable} -m ddp predict --checkpoint {out / 'checkpoint.npz'} "
           f"--data-path {rows} | head -n 1")
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=LIVENESS_S * 2, cwd=ROOT)
    assert res.returncode == 0 and res.stdout == "prediction\n" and res.stderr == "", (res.returncode, res.stderr)


def test_a_model_that_learned_nothing_is_not_healthy(tmp_path):
    """Adam at lr 1 ends near chance on digits: a warning line and "healthy": false; a normal run is healthy.
    The baseline is the majority class of the validation split, computed here independently."""
    import json
    import numpy as np
    from ddp.config import Config
    from ddp.setup import build
    for lr, optimizer, healthy in (("1", "adam", False), ("0.05", "sgd", True)):
        out = tmp_path / optimizer
        res = run_cli("train", "--dataset", "digits", "--epochs", "2", "--optimizer", optimizer, "--lr", lr,
                      "--no-progress", "--out", str(out))
        assert res.returncode == 0, res.stderr
        summary = json.loads((out / "summary.json").read_text())
        val = build(Config(dataset="digits").validate()).val
        beats = bool(summary["val_accuracy"] > np.bincount(val.y).max() / len(val.y))
        assert summary["healthy"] is healthy is beats, summary
        assert ("ddp: warning: the final validation metric is no better" in res.stdout) is not healthy


def test_a_non_finite_final_metric_is_a_failure():
    """A blow-up at the last step: the final metrics are NaN, which ends the run with exit 1, not 'done'."""
    from ddp.comm import SerialComm
    from ddp.config import Config
    from ddp.errors import TrainingError
    from ddp.evaluate import final_metrics
    from ddp.setup import build
    s = build(Config(dataset="digits", hidden="8").validate())
    s.model.params[...] = np.nan
    with pytest.raises(TrainingError, match="not finite"):
        final_metrics(s, SerialComm(), step=1, epoch=1, world_size=1, t0=0.0)


def test_non_finite_preprocessing_in_a_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*TRAIN, "--out", str(out)).returncode == 0
    with np.load(out / "checkpoint.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["data.x_std"] = arrays["data.x_std"].copy()
    arrays["data.x_std"][3] = np.nan
    np.savez(tmp_path / "bad.npz", **arrays)
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(["0.5"] * 20) + "\n")
    one_line(run_cli("predict", "--checkpoint", str(tmp_path / "bad.npz"), "--data-path", str(rows)),
             "data.x_std holds NaN or Inf")


@pytest.mark.parametrize("lines", [
    ['{"epoch": 1, "train_loss": "high"}'],
    ['[1, 2, 3]'],
    ['{"train_loss": 0.5}'],
    ['{"epoch": 1, "train_loss": 0.5, "grad_norms": [1.0, 2.0]}', '{"epoch": 2, "train_loss": 0.4, "grad_norms": [1.0]}'],
    ['{"epoch": 1, "grad_norms": ["a"]}'],
    ['{"epoch": ' + "[" * 100000 + "]" * 100000 + '}'],
])
def test_plot_refuses_odd_metrics_in_one_line(tmp_path, lines):
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    from ddp.errors import UsageError
    from ddp.plot import read_metrics
    with pytest.raises(UsageError, match="metrics.jsonl"):
        read_metrics(str(tmp_path))
    res = run_cli("plot", str(tmp_path), "--out", str(tmp_path / "c.png"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_plot_reads_a_real_run(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*TRAIN, "--grad-norms", "--out", str(out)).returncode == 0
    from ddp.plot import read_metrics
    assert [r["epoch"] for r in read_metrics(str(out))] == [1, 2]


def test_sizes_beyond_memory_are_one_line_before_allocation():
    one_line(run_cli("train", "--dataset", "digits", "--hidden", "300000,300000", "--epochs", "1", "--no-progress"),
             "parameters: more than this machine's memory holds")


def test_the_python_api_raises_usage_errors(tmp_path):
    import ddp
    out = tmp_path / "run"
    assert run_cli(*TRAIN, "--out", str(out)).returncode == 0
    model = ddp.load(str(out / "checkpoint.npz"))
    with pytest.raises(ddp.UsageError, match="row 1 of the inputs overflows"):
        model.predict_proba(np.vstack([np.zeros(20), np.full(20, 1e300)]))     # finite, but no float32 holds it
    assert np.isfinite(model.predict_proba(np.zeros((2, 20)))).all()
    with pytest.raises(ddp.UsageError, match="a checkpoint is a path"):
        ddp.load(None)


def test_a_synthetic_dataset_beyond_memory_is_one_line():
    one_line(run_cli("train", "--dataset", "synthetic_classification", "--n-samples", "100000000",
                     "--n-features", "1048576", "--no-progress"), "needs more than this machine's memory")
