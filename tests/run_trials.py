"""Issue 20's trials: the launcher killed with SIGKILL, a job that hangs after its error line, two runs into one
folder, a failure's line on an oversubscribed machine, a file system aborted mid-run (ext4 on a loop device) and a
network partition between emulated hosts (network namespaces); the last two need root.

    python tests/run_trials.py --trials 10          # the figures in benchmarks/RESULTS.md (a few minutes)

tests/test_launch.py, test_run_folder.py and test_durable.py run one of each; this script runs N and prints a
line per kind: how many passed, and the seconds they took.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers import LAUNCHER, ROOT  # noqa: E402
from test_launch import _pids_running  # noqa: E402

PY = sys.executable
ENV = {**{k: v for k, v in os.environ.items() if k not in ("MPIEXEC", "OMPI_MCA_btl", "VIRTUAL_ENV")},
       "PYTHON": PY, "PATH": os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
       "PYTHONPATH": ROOT}
LONG = ["train", "--dataset", "digits", "--hidden", "16", "--epochs", "100000", "--no-progress"]


def kill_launcher(tmp):
    """SIGKILL to launch/mpirun.sh mid-run: every rank (and mpiexec) must be gone within 10 s."""
    out = os.path.join(tmp, "run")
    proc = subprocess.Popen(["bash", LAUNCHER, "-n", "2", "--", *LONG, "--quiet", "--out", out], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(os.path.join(out, "metrics.jsonl")):
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    while _pids_running(out) and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    took, left = time.monotonic() - t0, _pids_running(out)
    for pid in left:
        os.kill(pid, 9)
    return not left and took <= 10, took


def hang_after_error(tmp):
    """Ranks that hang after printing their error line (what prterun does in a partition): exit 1 within the
    launcher's 20 s grace (+ 10 s), the line shown."""
    script = os.path.join(tmp, "hang.py")
    with open(script, "w") as fh:
        fh.write("import sys, time\nfrom mpi4py import MPI\nif MPI.COMM_WORLD.Get_rank() == 0:\n"
                 "    print('ddp: error: rank 1 stalled', file=sys.stderr, flush=True)\ntime.sleep(3600)\n")
    t0 = time.monotonic()
    res = subprocess.run(["bash", LAUNCHER, "-n", "2", "--", "python", script], env=ENV, capture_output=True,
                         text=True, timeout=300)
    took = time.monotonic() - t0
    return res.returncode == 1 and "ddp: error: rank 1 stalled" in res.stderr and took <= 30, took


def two_runs(tmp):
    """Two `ddp train` into one fresh --out at once: one exits 0, the other 2 with one line, and the winner's
    metrics.jsonl is whole."""
    out = os.path.join(tmp, "run")
    cmd = [PY, "-m", "ddp", *LONG[:5], "--epochs", "10", "--no-progress", "--quiet", "--out", out]
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    res = [(p.wait(), p.stderr.read()) for p in procs]
    took = time.monotonic() - t0
    codes = sorted(c for c, _ in res)
    refused = [e.strip() for c, e in res if c == 2]
    try:
        epochs = [json.loads(line)["epoch"] for line in open(os.path.join(out, "metrics.jsonl"))]
    except (OSError, ValueError):
        epochs = []
    good = codes == [0, 2] and len(refused[0].splitlines()) == 1 and epochs == list(range(1, 11))
    return good, took


def failure_line(tmp):
    """A bad flag on 4 ranks oversubscribing 2 cores: exit 2, with an error line every time."""
    t0 = time.monotonic()
    res = subprocess.run(["bash", LAUNCHER, "-n", "4", "--", "train", "--dataset", "no-such-data"], env=ENV,
                         capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    return res.returncode == 2 and len(lines) == 1, time.monotonic() - t0


def aborted_disk(tmp):
    """ext4 on a loop device, aborted (mount -o remount,abort) while a run writes a checkpoint every 5 steps: the
    run ends with one line, exit 1; after remounting, metrics.jsonl holds every epoch the run printed and the
    checkpoint is the one the line names."""
    img, mnt = os.path.join(tmp, "disk.img"), os.path.join(tmp, "mnt")
    os.makedirs(mnt)
    subprocess.run(["truncate", "-s", "32M", img], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", img, mnt], check=True)
    try:
        out = os.path.join(mnt, "run")
        t0 = time.monotonic()
        proc = subprocess.Popen([PY, "-m", "ddp", *LONG, "--checkpoint-every", "5", "--out", out], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        printed = []
        while len(printed) < 3:
            line = proc.stdout.readline()
            printed += re.findall(r"epoch \d+/\d+, step (\d+)", line)
        subprocess.run(["mount", "-o", "remount,abort", mnt], check=True)
        rest, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
        printed += re.findall(r"epoch \d+/\d+, step (\d+)", rest)
    finally:
        subprocess.run(["umount", mnt])
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
    try:
        m = re.search(r"last durable checkpoint is (\S+) \(step (\d+)\)", err)
        import numpy as np
        with np.load(os.path.join(out, "checkpoint.npz"), allow_pickle=False) as f:
            step = int(f["step"])
        on_disk = open(os.path.join(out, "metrics.jsonl")).read()
        good = (proc.returncode == 1 and len(err.strip().splitlines()) == 1 and m is not None
                and int(m[2]) == step and all(f'"step": {s},' in on_disk for s in printed))
        if not good:
            print(f"    rc {proc.returncode}, stderr {err[-300:]!r}, disk step {step}, printed {printed}")
        return good, took
    finally:
        subprocess.run(["umount", mnt])


def partition(tmp, hosts_env=None):
    """Two emulated hosts (network namespaces, tests/cluster/netns.sh), one rank each; the link of h1 is cut
    mid-run. The watchdog (--timeout 5) names rank 1 in one line and the launcher exits 1 within --timeout + 20 s
    of the cut. Then the link comes back, and within 30 s nothing of the job runs on either host (the daemon on the
    cut host cannot hear the job end until it can reach its launcher again)."""
    env = hosts_env or _netns_hosts(tmp)
    prefix, out, timeout = env["DDP_NETNS_PREFIX"], os.path.join(tmp, "run"), 5
    try:
        proc = subprocess.Popen([os.path.join(HERE, "cluster", "ns_exec.sh"), "h0", LAUNCHER, "--host",
                                 "h0:1,h1:1", "--iface", "eth0", "--", *LONG, "--quiet", "--timeout",
                                 str(timeout), "--out", out], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        while not os.path.exists(os.path.join(out, "metrics.jsonl")) and proc.poll() is None:
            time.sleep(0.1)
        subprocess.run(["ip", "-n", f"{prefix}-br", "link", "set", "h1", "down"], check=True)
        t0 = time.monotonic()
        try:
            err = proc.communicate(timeout=timeout + 40)[1]
        except subprocess.TimeoutExpired:           # the launcher, or its stderr, outlived the bound: a hang
            proc.kill()
            err = "(the launcher or its stderr still open after the bound)"
        took = time.monotonic() - t0
        subprocess.run(["ip", "-n", f"{prefix}-br", "link", "set", "h1", "up"], check=True)
        left = _netns_pids(prefix, 30)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        good = (proc.returncode == 1 and len(lines) == 1 and "ranks [1] have not arrived (rank 1: host h1 unreachable)" in lines[0]
                and took <= timeout + 20 and not left)
        if not good:
            print(f"    rc {proc.returncode}, {took:.1f} s, left {left}, stderr {err[-400:]!r}")
        return good, took
    finally:
        if hosts_env is None:
            subprocess.run([os.path.join(HERE, "cluster", "netns.sh"), "down", prefix], capture_output=True)


def _netns_hosts(tmp):
    """Set up two emulated hosts for one trial; returns the environment ns_exec.sh and ns_agent.sh need."""
    prefix, hosts = f"ddpr{os.getpid() % 10000}{int(time.time()) % 1000}", os.path.join(tmp, "hosts")
    subprocess.run([os.path.join(HERE, "cluster", "netns.sh"), "up", prefix, "2", hosts], check=True)
    return {**ENV, "DDP_NETNS_PREFIX": prefix, "DDP_NETNS_HOSTS": hosts,
            "PRTE_MCA_plm_ssh_agent": os.path.join(HERE, "cluster", "ns_agent.sh"), "OMPI_MCA_btl": "tcp,self",
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def _netns_pids(prefix, wait_s):
    """The processes still in the hosts' namespaces after up to wait_s seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [p for h in ("h0", "h1") for p in subprocess.run(
            ["ip", "netns", "pids", f"{prefix}-{h}"], capture_output=True, text=True).stdout.split()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--tmp", default="/tmp/ddp-run-trials")
    p.add_argument("--only", help="run one kind: kill, hang, lock, line, disk, partition")
    a = p.parse_args()
    cases = [("kill", "SIGKILL of launch/mpirun.sh: every rank gone within 10 s", kill_launcher),
             ("hang", "ranks hang after their error line: launcher exit 1 within 30 s", hang_after_error),
             ("lock", "two runs into one fresh --out: one exit 0, one refused (exit 2)", two_runs),
             ("line", "a bad flag on 4 ranks, 2 cores: exit 2 with one error line", failure_line),
             ("disk", "ext4 aborted mid-run: exit 1, one line, disk holds what was reported", aborted_disk),
             ("partition", "a host cut off mid-run (2 emulated hosts, --timeout 5): exit 1 with one line "
              "within 25 s, nothing left on either host", partition)]
    for key, name, fn in cases:
        if a.only and key != a.only:
            continue
        ok, times = 0, []
        for i in range(a.trials):
            tmp = os.path.join(a.tmp, f"{key}-{i}")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            good, took = fn(tmp)
            ok += good
            times.append(took)
        times.sort()
        print(f"{name}: {ok}/{a.trials}; seconds min {times[0]:.1f}, median {times[len(times) // 2]:.1f}, "
              f"max {times[-1]:.1f}", flush=True)


if __name__ == "__main__":
    main()
