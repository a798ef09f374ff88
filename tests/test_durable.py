"""Issue 20: a run never loses what it reported. Writes are fsynced and atomic; a full disk ends the run with
one line naming the path and the last durable checkpoint, exit 1, and no temporary file left behind.

The disk is a small tmpfs (needs root, as CI runs; skipped otherwise), sized so that the first checkpoint
fits and a later write does not."""
import contextlib
import os
import re
import subprocess
import uuid

import pytest

from helpers import LIVENESS_S, run_cli, run_launcher
from ddp.checkpoint import load_checkpoint

TRAIN = ["train", "--dataset", "synthetic_classification", "--n-samples", "300", "--hidden", "16,8",
         "--epochs", "3", "--no-progress"]


@contextlib.contextmanager
def small_disk(tmp_path, size):
    where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def check_full_disk(res, out):
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ddp: error:"), err
    m = re.search(r"cannot write (\S+): No space left on device; the last durable checkpoint is (\S+) "
                  r"\(step (\d+)\)", err)
    assert m, err
    assert os.path.dirname(m[1]) == str(out) and m[2] == str(out / "checkpoint.npz")
    # What the line says is on disk is on disk, and nothing partial is.
    assert int(load_checkpoint(m[2])["step"]) == int(m[3])
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # Every epoch the run printed has its record in metrics.jsonl.
    printed = re.findall(r"epoch \d+/\d+, step (\d+)", res.stdout)
    assert printed
    on_disk = (out / "metrics.jsonl").read_text()
    assert all(f'"step": {s},' in on_disk for s in printed), (printed, on_disk)


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    with small_disk(tmp_path, "40k") as disk:
        res = run_cli(*TRAIN, "--out", str(disk / "a"))
        check_full_disk(res, disk / "a")


def test_full_disk_under_the_launcher_is_one_line(tmp_path):
    with small_disk(tmp_path, "40k") as disk:
        res = run_launcher("-n", "2", "--", *TRAIN, "--out", str(disk / "a"), timeout=LIVENESS_S * 3)
        check_full_disk(res, disk / "a")


def test_writes_replace_symlinks_instead_of_writing_through_them(tmp_path):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    assert run_cli(*TRAIN, "--out", str(out), "--quiet").returncode == 0
    victim.write_text("keep")
    for name in ("config.toml", "summary.json", "best.npz", "metrics.jsonl"):
        (out / name).unlink()
        (out / name).symlink_to(victim)
    res = run_cli(*TRAIN, "--resume", str(out / "checkpoint.npz"), "--epochs", "5", "--quiet")
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "keep"
    assert not [p for p in out.iterdir() if p.is_symlink() and p.name != "best.npz"]
    assert '"step": 20' in (out / "metrics.jsonl").read_text()
