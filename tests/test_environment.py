"""What the launcher's environment means to ddp: BLAS threads per rank (backend.limit_threads), and a
launcher that started several tasks while MPI sees a world of 1 (launcher.check_launcher)."""
import json
import os
import subprocess
import sys

import pytest

from ddp import backend
from ddp.launcher import LOCAL_SIZE_VARS, check_launcher, launcher_tasks, local_position, local_ranks_from_env
from ddp.errors import UsageError
from helpers import ROOT

CORES = len(os.sched_getaffinity(0))
THREAD_VARS = backend.THREAD_VARS
TINY = ["train", "--dataset", "digits", "--hidden", "8", "--max-steps", "1", "--batch-size", "64", "--no-progress"]


def clean_env(**extra):
    """This environment without the thread variables, the launchers' or Slurm's."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI"))
           and k not in LOCAL_SIZE_VARS}
    env.update(PYTHONPATH=ROOT, **extra)
    return env


def blas_after(code):
    """Run `code` in a fresh interpreter (thread pools are per process), then report every BLAS pool."""
    prog = ("import json\nfrom ddp import backend\nfrom threadpoolctl import threadpool_info\n"
            "before = [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']\n"
            f"note = {code}\n"
            "after = [(i['filepath'], i['num_threads']) for i in threadpool_info() if i['user_api'] == 'blas']\n"
            "print(json.dumps({'before': before, 'after': after, 'note': note}))\n")
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60, env=clean_env())
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# --------------------------------------------------------------------------- threads

@pytest.mark.parametrize("env, want", [
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, 3),
    ({"MPI_LOCALNRANKS": "5"}, 5),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}, 4),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "2"}, 2),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
    ({"SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "8"}, None),       # a batch script: one process
    ({}, None),
])
def test_local_ranks_from_the_launchers_environment(env, want):
    assert local_ranks_from_env(env) == want


def test_each_blas_gets_its_share_of_the_cores():
    got = blas_after("backend.limit_threads(4)")
    want = max(1, CORES // 4)
    # Every BLAS the process has loaded is capped: numpy's OpenBLAS, which the GEMMs and the optimizer's
    # axpy use (the training path loads no other: tests/test_startup.py).
    assert len(got["after"]) >= 1 and all(n == want for _, n in got["after"]), got
    assert got["note"] == f"openblas={want} ({CORES} core{'s' * (CORES > 1)} / 4 local ranks)"


def test_simulated_ranks_count_like_ranks():
    got = blas_after("backend.limit_threads(1, simulated=2)")
    assert all(n == max(1, CORES // 2) for _, n in got["after"]), got
    assert got["note"].endswith("/ 1 local rank x 2 simulated)")


@pytest.mark.skipif(CORES < 2, reason="with 1 core, limiting and leaving alone look the same")
@pytest.mark.parametrize("var", THREAD_VARS)
def test_a_users_thread_setting_wins(var):
    got = blas_after(f"backend.limit_threads(8, env={{{var!r}: '3'}})")
    assert max(got["before"]) > 1 and all(n == max(got["before"]) for _, n in got["after"]), got
    assert got["note"].endswith(f"(set by {var}=3)")


def test_the_start_line_and_ddp_info_show_the_threads(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ddp", *TINY, "--simulate-ranks", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=clean_env())
    assert res.returncode == 0, res.stderr
    want = max(1, CORES // 2)
    assert f"BLAS threads openblas={want} ({CORES} core" in res.stdout and "x 2 simulated)" in res.stdout
    info = subprocess.run([sys.executable, "-m", "ddp", "info"], capture_output=True, text=True, timeout=60,
                          env=clean_env(OPENBLAS_NUM_THREADS="1"))
    assert "ddp train uses openblas=1 (set by OPENBLAS_NUM_THREADS=1) per rank" in info.stdout, info.stdout


@pytest.mark.mpi
def test_ranks_under_mpirun_share_the_cores(tmp_path):
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")):
        pytest.skip("no mpiexec in this venv")
    res = subprocess.run(["bash", os.path.join(ROOT, "launch", "mpirun.sh"), "-n", "2", "--", *TINY,
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env=clean_env(PYTHON=sys.executable))
    assert res.returncode == 0, res.stderr
    assert "rank 0 of 2" in res.stdout and " / 2 local ranks)" in res.stdout, res.stdout


# --------------------------------------------------------------------------- launcher mismatch

@pytest.mark.parametrize("env, tasks", [
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, 2),
    ({"PMI_SIZE": "4", "PMI_RANK": "0"}, 4),                                  # srun --mpi=pmi2, MPICH's hydra
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, 2),
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "3", "SLURM_PROCID": "0"}, 3),
])
def test_several_tasks_in_a_world_of_one_is_an_error(env, tasks):
    assert launcher_tasks(env)[0] == tasks
    with pytest.raises(UsageError, match=f"{tasks} tasks were launched.*srun --mpi=pmix.*launch/mpirun.sh"):
        check_launcher(env)


@pytest.mark.parametrize("env", [
    {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0"},          # a batch script: legitimate
    {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"},  # srun -n 1
    # mpiexec -n 1 in an allocation: Open MPI started its daemons with srun
    {"OMPI_COMM_WORLD_SIZE": "1", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "2"},
    {},
])
def test_one_task_is_fine(env):
    check_launcher(env)


def test_only_the_first_task_prints(tmp_path):
    step = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}
    for procid, lines in (("0", 1), ("1", 0)):
        out = tmp_path / procid
        res = subprocess.run([sys.executable, "-m", "ddp", *TINY, "--out", str(out)], capture_output=True,
                             text=True, timeout=60, env=clean_env(**step, SLURM_PROCID=procid))
        assert res.returncode == 2 and res.stdout == ""
        assert res.stderr.count("\n") == lines, res.stderr
        assert not lines or res.stderr.startswith("ddp: error: SLURM_STEP_NUM_TASKS=2 says 2 tasks were launched")
        assert not (out / "checkpoint.npz").exists()
    batch = {k: v for k, v in step.items() if not k.startswith("SLURM_STEP")}
    res = subprocess.run([sys.executable, "-m", "ddp", *TINY, "--out", str(tmp_path / "batch")], capture_output=True,
                         text=True, timeout=60, env=clean_env(**batch, SLURM_PROCID="0"))
    assert res.returncode == 0 and (tmp_path / "batch" / "checkpoint.npz").exists(), res.stderr


@pytest.mark.parametrize("split, env, want", [
    ((0, 1), {"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0", "SLURM_LOCALID": "3"},
     (3, 4)),                                                    # srun + PMIx: the split saw 1 per node
    ((1, 2), {"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (1, 2)),   # they agree
    ((2, 4), {}, (2, 4)),                                        # no launcher variables: MPI's answer
    ((0, 1), {"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}, (0, 1)),  # no rank
])
def test_the_local_rank_that_picks_the_gpu(split, env, want):
    """Each rank takes GPU local_rank % gpus: it must be this rank's position on its node."""
    assert local_position(*split, env=env) == want
