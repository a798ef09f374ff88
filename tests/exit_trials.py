"""Exit-path trials under a real mpiexec: a stalled rank (SIGSTOP), SIGINT to one rank, an error on one rank.

    python tests/exit_trials.py --trials 10          # the figures for issue 9 (a few minutes)

tests/test_exit_paths.py runs two trials of each; this script runs N and prints a table. Every trial
launches `mpiexec -n 2 python tests/exit_trials.py --rank ARGS`: the rank wrapper records its pid (so
the trial can signal one rank) and can inject an error on one rank at a given step, then runs the
CLI exactly as `python -m ddp ARGS` would.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers import ROOT, mpi_env, mpiexec  # noqa: E402

TRAIN = ["train", "--dataset", "digits", "--hidden", "16", "--epochs", "1000", "--no-progress"]


# --------------------------------------------------------------------------- the rank side

def rank_main(argv):
    """Runs on every rank: write pid.R, arm EXIT_TRIAL_INJECT='rank:call:kind' (kind: usage, failure,
    sigterm, or an exit code), run the CLI."""
    if argv[:2] == ["-m", "ddp"]:          # called as PYTHON by launch/mpirun.sh
        argv = argv[2:]
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    where = os.environ.get("EXIT_TRIAL_DIR")
    if where:
        with open(os.path.join(where, f"pid.{rank}"), "w") as fh:
            fh.write(str(os.getpid()))
    inject = os.environ.get("EXIT_TRIAL_INJECT")
    if inject:
        r, call, kind = inject.split(":")
        if int(r) == rank:
            _arm(int(call), kind, where)
    import ddp.cli
    sys.exit(ddp.cli.main(argv))


def _arm(call, kind, where):
    import ddp.model
    from ddp.errors import TrainingError, UsageError
    orig, calls = ddp.model.MLP.forward_backward, [0]

    def forward_backward(self, *a, **k):
        calls[0] += 1
        if calls[0] == call:
            if where:
                with open(os.path.join(where, "injected"), "w") as fh:
                    fh.write(repr(time.time()))
            if kind == "usage":
                raise UsageError("injected usage error")
            if kind == "failure":
                raise TrainingError("injected failure")
            if kind == "sigterm":           # as from Slurm or docker stop: training goes on to the step's end
                os.kill(os.getpid(), signal.SIGTERM)
                return orig(self, *a, **k)
            raise SystemExit(int(kind))
        return orig(self, *a, **k)
    ddp.model.MLP.forward_backward = forward_backward


# --------------------------------------------------------------------------- the trial side

def wrapper(tmp) -> str:
    """An executable that launch/mpirun.sh can take as PYTHON."""
    path = os.path.join(tmp, "python-wrapper")
    with open(path, "w") as fh:
        fh.write(f"#!/bin/sh\nexec {sys.executable} {os.path.abspath(__file__)} --rank \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def start(tmp, args, n=2, launcher="mpiexec", inject=None, **env):
    """Start a 2-rank job; returns the Popen. launcher: mpiexec (python wrapper), console (the `ddp`
    script's interpreter path as installed) or mpirun.sh."""
    os.makedirs(tmp, exist_ok=True)
    e = mpi_env(EXIT_TRIAL_DIR=str(tmp), **env)
    if inject:
        e["EXIT_TRIAL_INJECT"] = inject
    if launcher == "console":       # the installed `ddp` script: no wrapper, so no pid files or injection
        cmd = [mpiexec(), "-n", str(n), os.path.join(os.path.dirname(sys.executable), "ddp"), *args]
    elif launcher == "mpirun.sh":
        e.update(PYTHON=wrapper(tmp))
        e.pop("OMPI_MCA_btl", None)
        cmd = ["bash", os.path.join(ROOT, "launch", "mpirun.sh"), "--mpiexec", mpiexec(), "-n", str(n), "--",
               *args]
    else:
        cmd = [mpiexec(), "-n", str(n), sys.executable, os.path.abspath(__file__), "--rank", *args]
    return subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(path, proc, limit=120.0):
    t = time.monotonic() + limit
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > t:
            raise RuntimeError(f"{path} never appeared; job rc {proc.poll()}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)


def rank_pid(proc, rank) -> int:
    """The pid of `rank` among mpiexec's children, from /proc (for ranks that write no pid file)."""
    for _ in range(600):
        for d in os.listdir("/proc"):
            try:
                if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == proc.pid:
                    env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
                    if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
                        return int(d)
            except (OSError, IndexError, ValueError):
                pass
        time.sleep(0.1)
    raise RuntimeError(f"no rank {rank} under mpiexec pid {proc.pid}")


def finish(proc, limit=120.0):
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def _cleanup(tmp, n=2):
    for r in range(n):               # a stopped rank that the job left behind must not stay
        try:
            pid = int(open(os.path.join(tmp, f"pid.{r}")).read())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


def signal_trial(tmp, sig, rank=1, mode="allreduce", timeout=10, launcher="mpiexec"):
    """Signal one rank once training runs; returns (rc, seconds from the signal to the job's end, stderr)."""
    out = os.path.join(tmp, "out")
    proc = start(tmp, [*TRAIN, "--mode", mode, "--timeout", str(timeout), "--out", out], launcher=launcher)
    try:
        wait_for(os.path.join(out, "metrics.jsonl"), proc)
        if launcher == "console":
            pid = rank_pid(proc, rank)
        else:
            wait_for(os.path.join(tmp, f"pid.{rank}"), proc)
            pid = int(open(os.path.join(tmp, f"pid.{rank}")).read())
        os.kill(pid, sig)
        t0 = time.monotonic()
        rc, _, err = finish(proc)
        return rc, time.monotonic() - t0, err
    finally:
        _cleanup(tmp)


def inject_trial(tmp, kind, rank=1, call=5, launcher="mpiexec", args=None):
    """An error on one rank at its call-th forward_backward; returns (rc, seconds from it to the end, stderr)."""
    proc = start(tmp, args or [*TRAIN, "--out", os.path.join(tmp, "out")], launcher=launcher,
                 inject=f"{rank}:{call}:{kind}")
    rc, _, err = finish(proc)
    _cleanup(tmp)
    mark = os.path.join(tmp, "injected")
    took = time.time() - float(open(mark).read()) if os.path.exists(mark) else float("nan")
    return rc, took, err


def error_lines(err: str) -> list[str]:
    """ddp's error lines; plain mpiexec may put a NUL from its own abort banner before one."""
    return [ln.strip("\0 ") for ln in err.splitlines() if ln.strip("\0 ").startswith("ddp: error:")]


# --------------------------------------------------------------------------- the report

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--tmp", default="/tmp/ddp-exit-trials")
    a = p.parse_args()
    cases = [
        ("SIGSTOP, allreduce, --timeout 10", 20, 1,
         lambda t, i: signal_trial(t, signal.SIGSTOP, rank=i % 2, mode="allreduce")),
        ("SIGSTOP, ps, --timeout 10", 20, 1,
         lambda t, i: signal_trial(t, signal.SIGSTOP, rank=i % 2, mode="ps")),
        ("SIGINT to one rank", 10, 130, lambda t, i: signal_trial(t, signal.SIGINT, rank=i % 2)),
        ("UsageError on one rank", 10, 2, lambda t, i: inject_trial(t, "usage", rank=i % 2)),
    ]
    for name, limit, want, fn in cases:
        ok, times = 0, []
        for i in range(a.trials):
            tmp = os.path.join(a.tmp, f"{name.split(',')[0].split()[0]}-{i}")
            subprocess.run(["rm", "-rf", tmp])
            rc, took, err = fn(tmp, i)
            lines = error_lines(err)
            good = rc == want and took <= limit and len(lines) >= 1
            ok += good
            times.append(took)
            if not good:
                print(f"  trial {i}: rc {rc}, {took:.1f} s, stderr: {err[-800:]!r}", flush=True)
        times.sort()
        print(f"{name}: {ok}/{a.trials} ended with exit code {want} within {limit} s; "
              f"seconds min {times[0]:.1f}, median {times[len(times) // 2]:.1f}, max {times[-1]:.1f}; "
              f"e.g. {lines[0] if lines else '(no line)'}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        rank_main(sys.argv[2:])
    else:
        main()
