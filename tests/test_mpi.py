"""Launches tests/mpi under a real mpiexec at 1, 2 and 4 ranks (oversubscribed on 2 cores),
plus the failure test: one rank raising must end the whole job promptly."""
import re
import time

import pytest

from conftest import emulated_device, need_gpu
from helpers import LIVENESS_S, run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [1, 2, 4])
def test_mpi_suite(n):
    # the gpu-marked half runs once, on 2 ranks, in test_mpi_suite_on_the_device
    res = run_mpi(n, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--color=no", "-m", "not gpu",
                      "tests/mpi/test_allreduce.py"], timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "passed" in res.stdout


def device_suite(request, n, path, cuda_aware="0", min_passed=1):
    """Run the gpu-marked tests of tests/mpi/PATH on n ranks, on the device this session uses."""
    need_gpu()
    emulated = emulated_device(request.config)
    if cuda_aware == "1" and not emulated:
        from ddp.comm import cuda_aware_mpi
        if not cuda_aware_mpi():
            pytest.skip("this MPI library is not CUDA-aware (MPIX_Query_cuda_support says no)")
    # --timeout: a rank whose peer failed a test would otherwise wait in MPI until the job's own timeout
    res = run_mpi(n, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--color=no", "-W", "ignore::RuntimeWarning",
                      "--timeout", "60", "--timeout-method", "thread", "-m", "gpu",
                      *(["--emulated-gpu"] if emulated else []), path], timeout=300, DDP_CUDA_AWARE=cuda_aware)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= min_passed and "skipped" not in res.stdout, res.stdout[-3000:]


@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.parametrize("cuda_aware", ["0", "1"], ids=["staged", "cuda-aware"])
def test_mpi_suite_on_the_device(request, cuda_aware):
    """2 real ranks on the device: GPU buffers staged through pinned host memory, or handed to MPI."""
    device_suite(request, 2, "tests/mpi/test_allreduce.py", cuda_aware, min_passed=5)


FAIL_AT_5 = """
import time
import ddp.cli, ddp.model
orig = ddp.model.MLP.forward_backward
calls = [0]
def boom(self, *a, **k):
    calls[0] += 1
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank() == 1 and calls[0] == 5:
        open(OUT + ".t", "w").write(repr(time.time()))
        raise ValueError("injected failure on rank 1 at step 5")
    return orig(self, *a, **k)
ddp.model.MLP.forward_backward = boom
raise SystemExit(ddp.cli.main(["train", "--dataset", "digits", "--hidden", "32", "--epochs", "50",
                               "--no-progress", "--out", OUT]))
"""


@pytest.mark.parametrize("n", [2, 4])
def test_one_failing_rank_ends_the_job_promptly(tmp_path, n):
    script = tmp_path / "fail.py"
    script.write_text(f"OUT = {str(tmp_path / 'out')!r}\n" + FAIL_AT_5)
    res = run_mpi(n, [str(script)], timeout=2 * LIVENESS_S)
    elapsed = time.time() - float((tmp_path / "out.t").read_text())   # from the failure, not the launch
    out = res.stdout + res.stderr
    assert res.returncode == 1
    assert "ddp: error: rank 1: unexpected ValueError: injected failure on rank 1 at step 5" in out
    assert "Traceback" in out
    assert elapsed < LIVENESS_S, f"the job took {elapsed:.1f} s to die"


def test_cli_under_mpiexec(tmp_path):
    """The CLI itself under 2 ranks, and a usage error on all ranks gives exit code 2 and one message."""
    res = run_mpi(2, ["-m", "ddp", "train", "--dataset", "digits", "--hidden", "16", "--epochs", "1",
                      "--no-progress", "--out", str(tmp_path / "o")], timeout=120)
    assert res.returncode == 0, res.stderr
    assert "mpi (rank 0 of 2)" in res.stdout
    assert (tmp_path / "o" / "checkpoint.npz").exists()
    res = run_mpi(2, ["-m", "ddp", "train", "--resume", str(tmp_path / "nope.npz"), "--no-progress",
                      "--out", str(tmp_path / "o")], timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("ddp: error:") == 1 and "not found" in res.stderr
