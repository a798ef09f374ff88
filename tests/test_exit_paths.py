"""Issue 9: the collective watchdog, every exit path ending the whole job, one line per error.

The MPI cases run a couple of trials each under a real mpiexec (tests/exit_trials.py runs ten
for the figures). "Ends within N s" bounds are liveness checks with wide margins, not timings.
"""
import signal
import subprocess
import sys
import time

import pytest

from exit_trials import TRAIN, error_lines, finish, inject_trial, signal_trial, start
from helpers import LIVENESS_S, ROOT, mpi_env, mpiexec, run_cli

from ddp.config import Config
from ddp.errors import TrainingError
from ddp.train import run

TRIALS = [0, 1]        # which rank is hit alternates with the trial


# --------------------------------------------------------------------------- no MPI needed

@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_timeout_must_be_finite_and_positive(tmp_path, value):
    res = run_cli("train", "--timeout", value, "--out", str(tmp_path))
    assert res.returncode == 2
    want = ("ddp: error: --timeout must be a finite number, got" if value in ("nan", "inf")
            else f"ddp: error: timeout {float(value)} must be a number of seconds > 0")
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith(want), res.stderr


def test_simulated_watchdog_names_the_rank_that_has_not_arrived(tmp_path):
    """Rank 1 sleeps 60 s after step 3; with --timeout 1 the others give up and name it."""
    def stall(step, model, comm):
        if step == 3 and comm.rank == 1:
            time.sleep(60)
    cfg = Config(dataset="digits", hidden="16", epochs=1, simulate_ranks=3, progress=False, out=str(tmp_path),
                 timeout=1)
    t0 = time.monotonic()
    with pytest.raises(TrainingError) as e:
        run(cfg, on_step=stall)
    assert time.monotonic() - t0 < 45           # liveness: it did not wait for the sleeper
    msg = str(e.value)
    # the others wait in the 1-number allreduce that ends step 3 (stop.stop_requested)
    assert "no progress for 1 s at step 3, waiting in allreduce; ranks [1] have not arrived" in msg, msg


def test_debug_nan_is_one_line_without_warnings(tmp_path):
    res = run_cli("train", "--dataset", "diabetes", "--hidden", "32", "--lr", "1e6", "--epochs", "3",
                  "--scale", "none", "--no-progress", "--debug", "--simulate-ranks", "2", "--out", str(tmp_path))
    assert res.returncode == 1
    assert res.stderr.splitlines() == ["ddp: error: --debug: rank 0 passes NaN or Inf to allreduce"], res.stderr


def test_diverging_run_prints_no_runtime_warning(tmp_path):
    res = run_cli("train", "--dataset", "diabetes", "--hidden", "32", "--lr", "1e6", "--epochs", "3",
                  "--scale", "none", "--no-progress", "--out", str(tmp_path))
    assert res.returncode == 1
    assert res.stderr.startswith("ddp: error: gradients became NaN or Inf"), res.stderr
    assert len(res.stderr.splitlines()) == 1, res.stderr


def test_the_watchdog_tells_why_a_rank_is_missing():
    """Issue 19: the line names what each other rank does, from its answer or, without one, from its process
    (same host) or its host's network."""
    from ddp.watchdog import OPS, Watchdog, reachable
    stopped = subprocess.Popen(["sleep", "60"])
    alive = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        stopped.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        wd = Watchdog()
        wd.rank, wd.size, wd.step = 0, 9, 7
        wd.pids = [1, gone.pid, stopped.pid, alive.pid, 5, 6, 7, 8, 9]
        wd.hosts = ["a", "a", "a", "a", "a", "a", "a", "a", "no-such-host.invalid"]
        ar = OPS.index("allreduce")
        wd._peers = {4: (wd.BUSY, 7, -1, -1), 5: (wd.WAITING, 7, OPS.index("bcast"), 10),
                     6: (wd.WAITING, 6, ar, 10), 7: (wd.WAITING, 7, ar, 99),
                     8: (wd.WAITING, 7, ar, 10)}         # rank 8 waits in the same call as rank 0: not named
        text = wd.diagnosis(ar, 10)
        assert text.startswith("; ranks [1, 2, 3, 4] have not arrived (rank 1: dead (its process "), text
        assert f"rank 2: stopped (process {stopped.pid}, state T)" in text
        assert f"rank 3: stalled (process {alive.pid} is alive and does not answer)" in text
        assert "rank 4: stalled (alive, busy outside MPI at step 7)" in text
        assert "; rank 5 waits in bcast at step 7: a different collective" in text
        assert "; rank 6 waits in allreduce at step 6: a different step" in text
        assert "; rank 7 waits in allreduce of 99 elements: a different buffer size" in text
        assert "rank 8" not in text
        wd._peers = {r: (wd.WAITING, 7, ar, 10) for r in range(1, 9)}
        assert wd.diagnosis(ar, 10) == ""
    finally:
        for p in (stopped, alive):
            p.kill()
            p.wait()
    assert reachable("127.0.0.1") is True              # port 9 refused: the host answered
    assert reachable("no-such-host.invalid") is None


def test_the_watchdog_can_name_every_collective_the_communicator_waits_in():
    """A rank's answer carries its call as an index into OPS: a call missing there reaches the other ranks'
    line as 'another call' (reduce_scatter, --shard-optimizer's, was)."""
    import re

    import ddp.comm
    from ddp.watchdog import OPS
    with open(ddp.comm.__file__) as f:
        watched = set(re.findall(r'WATCHDOG\.watch\("(\w+)"', f.read()))
    assert {"allreduce", "bcast", "reduce_scatter"} <= watched, watched
    assert watched <= set(OPS), watched - set(OPS)
    # an unreachable host (False) is the partition trial's (tests/run_trials.py, test_cluster.py)


# --------------------------------------------------------------------------- the watchdog under MPI

@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["dead", "stopped", "busy", "collective", "size"])
def test_a_hangs_cause_is_named_in_one_line(kind):
    """Issue 19: each fault on rank 1 at step 3 (tests/hang_kinds.py) ends the job under the launcher with a
    line that names it, within --timeout (3 s) and a few seconds."""
    from hang_kinds import trial
    good, code, took, err = trial(kind)
    assert good, (code, err[-2000:])
    assert took < 3 + LIVENESS_S

@pytest.mark.mpi
@pytest.mark.parametrize("trial", TRIALS)
@pytest.mark.parametrize("mode", ["allreduce", "ps"])
def test_stopped_rank_ends_the_job(tmp_path, mode, trial):
    stopped = trial % 2
    rc, took, err = signal_trial(str(tmp_path), signal.SIGSTOP, rank=stopped, mode=mode, timeout=10)
    lines = error_lines(err)
    assert rc == 1 and took < 10 + LIVENESS_S, (rc, took, err[-3000:])   # --timeout 10, then the end
    assert lines and all("no progress for 10 s at step" in ln for ln in lines), err[-3000:]
    live = 1 - stopped
    assert lines == [ln for ln in lines if ln.startswith(f"ddp: error: rank {live}:")]
    assert f"; ranks [{stopped}] have not arrived (rank {stopped}: stopped (process " in lines[0], lines


# --------------------------------------------------------------------------- plain mpiexec, every exit path

@pytest.mark.mpi
@pytest.mark.parametrize("trial", TRIALS)
def test_sigint_to_one_rank_ends_the_job(tmp_path, trial):
    rc, took, err = signal_trial(str(tmp_path), signal.SIGINT, rank=1 - trial % 2)
    # ddp's lines and both ends of stderr: once, on a loaded machine, the exit was 1 with a traceback whose
    # first lines (the exception's type) fell outside the tail alone
    assert rc == 130 and took < LIVENESS_S, (rc, took, error_lines(err), err[:2500], err[-2500:])
    assert error_lines(err) == [f"ddp: error: rank {1 - trial % 2}: interrupted (SIGINT)"], err[-3000:]


@pytest.mark.mpi
@pytest.mark.parametrize("trial", TRIALS)
def test_usage_error_on_one_rank_ends_the_job(tmp_path, trial):
    rank = 1 - trial % 2
    rc, took, err = inject_trial(str(tmp_path), "usage", rank=rank)
    assert rc == 2 and took < LIVENESS_S, (rc, took, err[-3000:])
    assert error_lines(err) == [f"ddp: error: rank {rank}: injected usage error"], err[-3000:]


@pytest.mark.mpi
def test_system_exit_on_one_rank_keeps_its_code(tmp_path):
    """SIGTERM's checkpoint-and-exit is SystemExit(143) on the rank that got it: the job ends with 143."""
    rc, took, err = inject_trial(str(tmp_path), "143", rank=1)
    assert rc == 143 and took < LIVENESS_S, (rc, took, err[-3000:])


@pytest.mark.mpi
def test_console_script_under_plain_mpiexec(tmp_path):
    """`mpiexec -n 2 ddp train` (no -m mpi4py): SIGINT to one rank, and a usage error all ranks agree on."""
    rc, took, err = signal_trial(str(tmp_path / "a"), signal.SIGINT, rank=1, launcher="console")
    assert rc == 130 and took < LIVENESS_S, (rc, took, err[-3000:])
    proc = start(str(tmp_path / "b"), ["train", "--resume", str(tmp_path / "none.npz"), "--out", str(tmp_path)],
                 launcher="console")
    rc, _, err = finish(proc)
    assert rc == 2
    assert error_lines(err) == [f"ddp: error: checkpoint {tmp_path / 'none.npz'} not found"], err


API = """
import sys
from mpi4py import MPI
from ddp.errors import UsageError
from ddp.guard import one_job
rank = MPI.COMM_WORLD.Get_rank()
try:
    with one_job():
        if rank in {BAD}:
            raise UsageError("bad input on rank %d" % rank)
        MPI.COMM_WORLD.Barrier()
except UsageError as e:
    print("caught on rank", rank, flush=True)
    sys.exit(0)
"""


@pytest.mark.mpi
@pytest.mark.parametrize("bad, code", [("(0, 1)", 0), ("(1,)", 2)])
def test_python_api_guard(tmp_path, bad, code):
    """A user's script: an error on every rank propagates on every rank (and can be caught);
    an error on one rank ends the job with its code instead of leaving the other in Barrier."""
    script = tmp_path / "user.py"
    script.write_text(API.replace("{BAD}", bad))
    t0 = time.monotonic()
    res = subprocess.run([mpiexec(), "-n", "2", sys.executable, str(script)], env=mpi_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == code and time.monotonic() - t0 < LIVENESS_S, res.stderr[-3000:]
    if code == 0:
        assert sorted(res.stdout.splitlines()) == ["caught on rank 0", "caught on rank 1"]
    else:
        assert error_lines(res.stderr) == ["ddp: error: rank 1: bad input on rank 1"], res.stderr


# --------------------------------------------------------------------------- launch/mpirun.sh: codes and lines

def _mpirun_sh(tmp, args, inject=None):
    return finish(start(tmp, args, launcher="mpirun.sh", inject=inject))


@pytest.mark.mpi
def test_mpirun_sh_usage_error_on_all_ranks_is_one_line(tmp_path):
    rc, _, err = _mpirun_sh(str(tmp_path / "a"), ["train", "--bogus"])
    assert rc == 2 and err.splitlines() == ["ddp: error: unrecognized arguments: --bogus (see 'ddp --help')"], err
    rc, _, err = _mpirun_sh(str(tmp_path / "b"), ["train", "--resume", str(tmp_path / "no.npz"), "--out",
                                                  str(tmp_path)])
    assert rc == 2 and err.splitlines() == [f"ddp: error: checkpoint {tmp_path / 'no.npz'} not found"]


@pytest.mark.mpi
@pytest.mark.parametrize("kind, code, line", [("usage", 2, "ddp: error: rank 1: injected usage error"),
                                              ("failure", 1, "ddp: error: rank 1: injected failure"),
                                              ("143", 143, None)])
def test_mpirun_sh_error_on_one_rank(tmp_path, kind, code, line):
    rc, _, err = _mpirun_sh(str(tmp_path), [*TRAIN, "--out", str(tmp_path / "o")],
                            inject=f"1:5:{kind}")
    assert rc == code, err
    assert len(err.splitlines()) <= 3 and "MPI_ABORT" not in err, err
    if line:
        assert err.splitlines() == [line], err


@pytest.mark.mpi
def test_mpirun_sh_debug_nan_is_one_line(tmp_path):
    rc, _, err = _mpirun_sh(str(tmp_path), ["train", "--dataset", "diabetes", "--hidden", "32", "--lr", "1e6",
                                            "--epochs", "3", "--scale", "none", "--no-progress", "--debug",
                                            "--out", str(tmp_path / "o")])
    assert rc == 1
    assert err.splitlines() == ["ddp: error: --debug: rank 0 passes NaN or Inf to allreduce"], err


@pytest.mark.mpi
def test_mpirun_sh_sigint_to_one_rank_exits_130(tmp_path):
    rc, took, err = signal_trial(str(tmp_path), signal.SIGINT, rank=1, launcher="mpirun.sh")
    assert rc == 130 and took < LIVENESS_S, (rc, took, err)
    assert err.splitlines() == ["ddp: error: rank 1: interrupted (SIGINT)"], err
