"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# "The job ends within N s": a liveness bound, not a timing. Generous, so that a loaded 2-core machine does not
# fail it by chance; far below the collective watchdog's 300 s default and the tests' own timeouts.
LIVENESS_S = 60


def mpi_env(**extra):
    """Environment for mpiexec here: Open MPI as root, oversubscribed on 2 cores (see ENVIRONMENT.md)."""
    env = dict(os.environ)
    env.update({
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl": "^ofi", "OMPI_MCA_mpi_yield_when_idle": "1",
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    })
    env.update(extra)
    return env


def mpiexec():
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return exe if os.path.exists(exe) else "mpiexec"


def run_mpi(n, args, timeout=300, **env):
    """Run `python ARGS` on n ranks; returns the CompletedProcess (never hangs past timeout)."""
    cmd = [mpiexec(), "-n", str(n), sys.executable, *args]
    return subprocess.run(cmd, env=mpi_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_cli(*args, timeout=120, cwd=None):
    """`python -m ddp ARGS` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "ddp", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def rel_diff(a, b) -> float:
    """Largest difference relative to the reference's scale: max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def all_ranks(comm, ok, msg=""):
    """Collective assert: every rank learns every rank's verdict, and all fail together."""
    verdicts = comm.allgather_obj((bool(ok), msg))
    bad = [(r, m) for r, (v, m) in enumerate(verdicts) if not v]
    assert not bad, f"failed on rank(s): {bad}"


LAUNCHER = os.path.join(ROOT, "launch", "mpirun.sh")


def run_launcher(*args, timeout=180, cwd=None, **env):
    """launch/mpirun.sh ARGS with this python and its venv's mpiexec, none of the caller's MPI settings."""
    venv_bin = os.path.dirname(sys.executable)
    base = {k: v for k, v in os.environ.items()
            if k not in ("DDP_IFACE", "MPIEXEC", "OMPI_MCA_btl", "VIRTUAL_ENV") and not k.startswith("SLURM_")}
    base.update(PYTHON=sys.executable, PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    base.update(env)
    return subprocess.run(["bash", LAUNCHER, *args], capture_output=True, text=True, timeout=timeout, env=base,
                          cwd=cwd or ROOT)
