"""`ddp ARGS...`, except that on the first launch (no DDP_RESTART) rank KILL_RANK kills itself with
SIGKILL during optimizer step KILL_STEP, as a crashed node would; relaunches train undisturbed.

    launch/mpirun.sh -n 2 --max-restarts 2 -- python tests/restart/kill_rank_once.py train ...

KILL_RANK and KILL_STEP come from the environment (default 1 and 13). When KILL_LOG names a file, that rank
appends "RESTART STEPS" to it at a normal exit: the steps it computed, which shows whether a relaunch
resumed or started over. Used by tests/test_launch.py.
"""
import atexit
import os
import signal
import sys

from ddp import cli
from ddp.parallel import DataParallel

if os.environ.get("OMPI_COMM_WORLD_RANK") == os.environ.get("KILL_RANK", "1"):
    step_fn = DataParallel.forward_backward
    calls = [0]
    restart = os.environ.get("DDP_RESTART", "")

    def forward_backward(self, *args, **kwargs):
        calls[0] += 1
        if not restart and calls[0] == int(os.environ.get("KILL_STEP", "13")):
            os.kill(os.getpid(), signal.SIGKILL)
        return step_fn(self, *args, **kwargs)

    def log():
        if os.environ.get("KILL_LOG"):
            with open(os.environ["KILL_LOG"], "a") as fh:
                fh.write(f"{restart or 0} {calls[0]}\n")

    DataParallel.forward_backward = forward_backward
    atexit.register(log)

sys.exit(cli.main(sys.argv[1:]))
