"""Issue 20: run folders are locked and safe. One run at a time holds a folder (ddp.lock: PID and host); a folder
holding any run file is a run; output paths come only from the command line, never from a checkpoint, and never
replace a model or a run's file."""
import json
import socket
import subprocess
import sys

import numpy as np

from helpers import run_cli

TRAIN = ["train", "--dataset", "synthetic_classification", "--n-samples", "300", "--hidden", "16,8",
         "--epochs", "3", "--no-progress", "--quiet"]


def one_line(res, code, *words):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ddp: error:"), err
    for w in words:
        assert w in err, (w, err)


def test_a_locked_folder_is_refused_with_or_without_overwrite(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*TRAIN, "--out", str(out)).returncode == 0
    assert not (out / "ddp.lock").exists()                 # released when the run ends
    before = (out / "checkpoint.npz").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (out / "ddp.lock").write_text(f"{holder.pid} {socket.gethostname()}")
        for extra in ([], ["--overwrite"]):
            one_line(run_cli(*TRAIN, "--out", str(out), *extra), 2, "in use by another run", f"pid {holder.pid}")
        one_line(run_cli(*TRAIN, "--resume", str(out / "checkpoint.npz"), "--epochs", "5"), 2, "in use")
        assert (out / "checkpoint.npz").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    # The holder has ended: its lock is stale, and the next run takes it over with a note.
    res = run_cli(*TRAIN, "--resume", str(out / "checkpoint.npz"), "--epochs", "5")
    assert res.returncode == 0, res.stderr
    assert f"taking over {out / 'ddp.lock'} from pid {holder.pid}" in res.stderr
    with np.load(out / "checkpoint.npz", allow_pickle=False) as f:
        assert int(f["step"]) == 20


def test_two_runs_into_one_fresh_folder_one_is_refused(tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "ddp", *TRAIN, "--epochs", "20", "--out", out]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert refused.strip().startswith("ddp: error:") and len(refused.strip().splitlines()) == 1, refused
    assert "in use by another run" in refused or "already holds a run" in refused, refused
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 21))


def test_any_run_file_makes_a_folder_a_run(tmp_path):
    for name in ("config.toml", "metrics.jsonl", "summary.json"):
        out = tmp_path / name.replace(".", "-")
        out.mkdir()
        (out / name).write_text("mine")
        one_line(run_cli(*TRAIN, "--out", str(out)), 2, "already holds a run", name)
        assert (out / name).read_text() == "mine"


def test_a_checkpoint_cannot_choose_where_a_resumed_run_writes(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere" / "trace.json"
    assert run_cli(*TRAIN, "--out", str(out), "--trace", str(elsewhere)).returncode == 0
    assert elsewhere.exists()
    elsewhere.unlink()
    elsewhere.parent.rmdir()
    res = run_cli(*TRAIN, "--resume", str(out / "checkpoint.npz"), "--epochs", "5")
    assert res.returncode == 0, res.stderr
    assert not elsewhere.parent.exists()


def test_outputs_never_replace_a_model_or_a_run_file(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*TRAIN, "--out", str(out)).returncode == 0
    rows = tmp_path / "rows.csv"
    rows.write_text("\n".join(",".join(["0.5"] * 20) for _ in range(3)) + "\n")
    model = (out / "checkpoint.npz").read_bytes()
    for name in ("checkpoint.npz", "best.npz", "summary.json"):
        one_line(run_cli("predict", "--checkpoint", str(out / "checkpoint.npz"), "--data-path", str(rows),
                         "--out", str(out / name)), 2, "would overwrite")
    one_line(run_cli(*TRAIN, "--resume", str(out / "checkpoint.npz"), "--epochs", "5",
                     "--trace", str(out / "checkpoint.npz")), 2, "would overwrite")
    assert (out / "checkpoint.npz").read_bytes() == model
