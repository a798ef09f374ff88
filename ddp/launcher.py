"""What the launcher (mpiexec, srun, launch/mpirun.sh) tells a process about the job: whether it was
launched at all, how many tasks it started, and how many of them share this node and which one this is.

    launched()                    # started by an MPI launcher: MPI_COMM_WORLD is worth initialising
    check_launcher(os.environ)    # several tasks but a world of 1: each would train alone (an error)
    local_ranks_from_env()        # this job's processes on this node (BLAS threads are shared by them)
    local_position(rank, size)    # this rank's place on its node (it picks the GPU)
"""
from __future__ import annotations

import os

from .errors import UsageError

# Set by MPI launchers in every process they start (a singleton run sets none of them).
LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK")
# Set by launchers for each process they start: how many of the job's processes run on this node.
LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def launched() -> bool:
    return any(k in os.environ for k in LAUNCH_VARS)


def local_ranks_from_env(env=None) -> int | None:
    """Processes of this job on this node, as the launcher announced them (None if it did not)."""
    env = os.environ if env is None else env
    for key in LOCAL_SIZE_VARS:
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return int(env[key])
    if "SLURM_STEP_ID" in env:   # an srun step; the batch script's own allocation variables do not count
        # "2(x3),1": 2 tasks on each of the first 3 nodes, then 1; this node is SLURM_NODEID.
        counts = []
        for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
            n, _, rep = part.partition("(x")
            if n.isdigit():
                counts += [int(n)] * (int(rep.rstrip(")")) if rep.rstrip(")").isdigit() else 1)
        node = int(env["SLURM_NODEID"]) if env.get("SLURM_NODEID", "").isdigit() else 0
        if node < len(counts) and counts[node] > 0:
            return counts[node]
    return None


LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PMI_LOCAL_RANK")


def local_position(rank: int, size: int, env=None) -> tuple[int, int]:
    """(local rank, local size) of this world rank on its node. MPI's shared-memory split is the answer,
    unless the launcher announced more ranks on this node than the split found: under srun with PMIx,
    Open MPI's split saw 1 rank per node, and every rank would then have chosen GPU 0."""
    env = os.environ if env is None else env
    announced = local_ranks_from_env(env)
    mine = next((int(env[k]) for k in LOCAL_RANK_VARS if env.get(k, "").isdigit()), None)
    if announced and announced > size and mine is not None and mine < announced:
        return mine, announced
    return rank, size


def launcher_tasks(env) -> tuple[int, str, int]:
    """(tasks the launcher started, the variable that says so, this task's index among them).

    An MPI launcher's own count comes first: Open MPI starts its daemons with srun, so its ranks see
    Slurm's step variables too. Slurm's count counts only inside an srun step (SLURM_STEP_ID is set):
    a batch script runs in an allocation of SLURM_NTASKS tasks but is one process, legitimately.
    """
    for size, rank in (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("PMI_SIZE", "PMI_RANK"),
                       ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"), ("SLURM_NTASKS", "SLURM_PROCID")):
        if size.startswith("SLURM") and "SLURM_STEP_ID" not in env:
            continue
        if env.get(size, "").isdigit():
            return int(env[size]), size, int(env[rank]) if env.get(rank, "").isdigit() else 0
    return 1, "", 0


def check_launcher(env) -> None:
    """In a world of 1, refuse to run when the launcher started several tasks: each would be a
    separate singleton training its own model into the same --out, silently."""
    n, var, index = launcher_tasks(env)
    if n > 1:
        err = UsageError(f"{var}={n} says {n} tasks were launched, but MPI sees a world of 1 "
                         f"(each task would train alone): under Slurm use 'srun --mpi=pmix' with a PMIx-enabled "
                         f"Slurm, or launch/mpirun.sh inside the allocation")
        err.quiet = index != 0        # every task sees the same problem; one line is enough
        raise err
