"""launch/slurm.sbatch on a real one-node Slurm cluster (munged, slurmctld, slurmd started by hand).

tests/slurm/run_slurm_e2e.sh does the work: `sbatch` through DDP_LAUNCHER=srun and =mpirun must give the
weights of a one-process run (float64, 1e-12), `srun -n 2` without PMIx must exit 2 with one line, and a
job submitted with --requeue that gets SIGTERM mid-run must checkpoint, requeue itself and resume to the same
weights.
It needs root and Debian's Slurm (slurmd slurmctld slurm-client munge libpmix-dev); without them the test
is skipped with the reason. CI installs them first (.ci/run runs the script with --install).
"""
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.mpi
def test_sbatch_through_srun_and_mpirun_trains_what_one_process_trains(tmp_path):
    script = os.path.join(ROOT, "tests", "slurm", "run_slurm_e2e.sh")
    env = {**os.environ, "PYTHON": sys.executable, "DDP_SLURM_TIMEOUT": "300"}
    res = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True, timeout=400, env=env)
    if res.returncode == 77:
        pytest.skip(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "PASS" in res.stdout
