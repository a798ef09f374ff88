"""tests/mpi runs under mpiexec (tests/test_mpi.py launches it at -n 1, 2 and 4).

Launched by plain pytest, these files are skipped: they would only run at size 1.
Every assert here is collective (see helpers.all_ranks), so a failure on one rank
fails the test on all ranks instead of leaving the others waiting.
"""
import os
import sys

import pytest

from ddp.launcher import launched

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))   # for tests/helpers.py

LAUNCHED = launched()


def pytest_collection_modifyitems(config, items):
    if not LAUNCHED:
        skip = pytest.mark.skip(reason="MPI test: run by tests/test_mpi.py under mpiexec")
        for item in items:
            if "/mpi/" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def comm():
    from ddp.comm import MPIComm
    return MPIComm()


@pytest.fixture(scope="session")
def shared_tmp(comm, tmp_path_factory):
    """A directory every rank sees (rank 0 makes it; one machine, one filesystem)."""
    path = str(tmp_path_factory.mktemp("mpi")) if comm.rank == 0 else None
    return comm.bcast_obj(path)
