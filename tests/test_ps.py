"""Parameter-server mode without a launcher: the shard and schedule arithmetic, the usage errors,
and the launchers of tests/mpi/test_ps.py (at 2, 3 and 4 ranks) and of the failure tests."""
import json
import time

import numpy as np
import pytest
from helpers import LIVENESS_S, run_cli, run_mpi

from ddp.comm import Communicator, SerialComm
from ddp.config import Config
from ddp.data import epoch_batches, shard
from ddp.errors import UsageError
from ddp.ps import check_ps, shard_bounds, train_ps
from ddp.setup import checkpoint_points
from ddp.train import run


# ---------------------------------------------------------------- arithmetic

@pytest.mark.parametrize("n, parts", [(10, 1), (10, 3), (387, 2), (7, 7), (1000003, 4)])
def test_shard_bounds_are_contiguous_balanced_and_cut_like_data_shard(n, parts):
    bounds = shard_bounds(n, parts)
    sizes = [b - a for a, b in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == n and sum(sizes) == n
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(parts - 1))
    assert max(sizes) - min(sizes) <= 1
    idx = np.arange(n)
    assert all(np.array_equal(idx[a:b], shard(idx, s, parts)) for s, (a, b) in enumerate(bounds))


def allreduce_points(cfg, n_train, batch, step, epoch, nb0):
    """Where train_allreduce's loop records and checkpoints, by running it with the batches built."""
    points = {}
    while epoch < cfg.epochs and not (cfg.max_steps and step >= cfg.max_steps):
        batches = epoch_batches(n_train, batch, seed=0, epoch=epoch, drop_last=cfg.drop_last)
        nb = nb0
        nb0 = 0
        while nb < len(batches) and not (cfg.max_steps and step >= cfg.max_steps):
            nb, step = nb + 1, step + 1
        finished = nb >= len(batches)
        if finished:
            epoch, nb = epoch + 1, 0
        points[step] = (epoch, nb)
        if not finished:
            break
    return points, step


@pytest.mark.parametrize("max_steps, drop_last, start", [(0, False, (0, 0, 0)), (50, False, (0, 0, 0)),
                                                          (16, False, (0, 0, 0)), (50, True, (20, 2, 4)),
                                                          (0, False, (13, 1, 5)), (30, False, (30, 3, 6))])
def test_checkpoint_points_follow_the_allreduce_loop(max_steps, drop_last, start):
    cfg = Config(epochs=7, max_steps=max_steps, drop_last=drop_last)
    n_train, batch = 240, 35                   # 6 full batches and one of 30
    spe = n_train // batch if drop_last else -(-n_train // batch)
    assert checkpoint_points(cfg, spe, *start) == allreduce_points(cfg, n_train, batch, *start)


# ---------------------------------------------------------------- usage errors

class FakeWorld(Communicator):
    """Only a size: check_ps must reject bad settings before any message is sent."""
    name = "mpi"

    def __init__(self, size):
        self.size, self.comm = size, object()


@pytest.mark.parametrize("size, kw, message", [
    (1, {}, "ps mode needs at least 2 ranks: 1 server(s) and at least one worker; launch with mpiexec -n 2 or "
            "more (or --simulate-ranks 2)"),
    (3, dict(servers=3), "--servers 3 leaves no worker among 3 ranks"),
    (3, dict(servers=5), "--servers 5 leaves no worker among 3 ranks"),
    (4, dict(servers=0), "servers 0 must be >= 1"),           # Config.validate, before check_ps
    (4, dict(staleness=-1), "staleness -1 must be >= 0"),
])
def test_check_ps_names_the_problem(size, kw, message):
    with pytest.raises(UsageError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_ps(Config(mode="ps", **kw).validate(), FakeWorld(size) if size > 1 else SerialComm())


@pytest.mark.parametrize("kw, message", [(dict(servers=0), "servers 0 must be >= 1"),
                                         (dict(staleness=-1), "staleness -1 must be >= 0")])
def test_train_ps_validates_its_config_before_check_ps(kw, message):
    """train_ps called directly with a Config never validated: check_ps trusts these ranges (0 servers would
    pass it and start a job with no server)."""
    with pytest.raises(UsageError, match="^" + message):
        train_ps(Config(mode="ps", **kw), FakeWorld(4))


def test_train_ps_in_one_process_says_how_to_launch():
    with pytest.raises(UsageError, match="mpiexec -n 3"):
        train_ps(Config(mode="ps", servers=2), SerialComm())
    with pytest.raises(UsageError, match="--servers 3 leaves no worker among 3 ranks"):
        run(Config(mode="ps", servers=3, simulate_ranks=3))


@pytest.mark.parametrize("args, message", [
    ([], "ps mode needs at least 2 ranks"),
    (["--simulate-ranks", "2", "--servers", "2"], "--servers 2 leaves no worker among 2 ranks"),
    (["--servers", "0"], "servers 0 must be >= 1"),
    (["--consistency", "ssp", "--staleness", "-1"], "staleness -1 must be >= 0"),
])
def test_cli_usage_errors_are_one_line(tmp_path, args, message):
    res = run_cli("train", "--mode", "ps", "--dataset", "synthetic_classification", "--n-samples", "100",
                  "--out", str(tmp_path), "--no-progress", *args)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("ddp: error:") and res.stderr.count("\n") == 1 and message in res.stderr


# ---------------------------------------------------------------- simulated ranks

SIM = dict(dataset="synthetic_classification", n_samples=300, hidden="16", batch_size=32, lr=0.1, momentum=0.9,
           dtype="float64", progress=False, quiet=True, val_fraction=0.1, test_fraction=0.1, max_steps=30, epochs=10)


@pytest.mark.parametrize("servers, workers, consistency", [(1, 1, "sync"), (1, 2, "sync"), (2, 2, "sync"),
                                                           (1, 3, "ssp")])
def test_simulated_ranks_run_ps_mode_as_one_process_trains(tmp_path, servers, workers, consistency):
    """ps mode over simulated ranks (the communicator's messages, no MPI): sync, and ssp with staleness 0,
    leave every worker with one process's weights and write one process's checkpoint."""
    from helpers import rel_diff

    from ddp.backend import to_numpy
    from ddp.checkpoint import load_checkpoint
    last = {}

    def on_step(step, model, comm):
        last[comm.rank] = to_numpy(model.params).copy()
    run(Config(out=str(tmp_path / "ref"), **SIM), on_step=on_step)
    ref = last.pop(0)
    summary = run(Config(out=str(tmp_path / "ps"), mode="ps", servers=servers, consistency=consistency,
                         staleness=0, simulate_ranks=servers + workers, **SIM), on_step=on_step)
    assert summary["mode"] == "ps" and summary["steps"] == 30 and summary["max_staleness"] == 0
    assert sorted(last) == list(range(workers))         # the workers' communicator numbers them from 0
    assert max(rel_diff(p, ref) for p in last.values()) <= 1e-12
    a = load_checkpoint(str(tmp_path / "ps" / "checkpoint.npz"))
    b = load_checkpoint(str(tmp_path / "ref" / "checkpoint.npz"))
    floats = [k for k, v in b.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    assert set(a) == set(b) and len(floats) > 4 and max(rel_diff(a[k], b[k]) for k in floats) <= 1e-12


@pytest.mark.parametrize("consistency, staleness", [("async", 0), ("ssp", 2)])
def test_simulated_async_and_ssp_ps_learn_digits(tmp_path, consistency, staleness):
    summary = run(Config(dataset="digits", hidden="64", lr=0.05, momentum=0.5, batch_size=32, epochs=12,
                         progress=False, quiet=True, out=str(tmp_path), mode="ps", consistency=consistency,
                         staleness=staleness, simulate_ranks=3))
    assert summary["workers"] == 2 and summary["test_accuracy"] >= 0.95
    assert consistency == "async" or summary["max_staleness"] <= staleness


# ---------------------------------------------------------------- under mpiexec

@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3, 4])
def test_ps_mpi_suite(n):
    """tests/mpi/test_ps.py: S = 1 and 2 servers with 1, 2 and 3 workers among these sizes."""
    # the gpu-marked half runs once, at 3 ranks, in test_ps_mpi_suite_on_the_device
    res = run_mpi(n, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--color=no", "-W", "ignore::RuntimeWarning",
                      "-m", "not gpu", "tests/mpi/test_ps.py"], timeout=240)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "passed" in res.stdout and "failed" not in res.stdout


@pytest.mark.mpi
@pytest.mark.gpu
def test_ps_mpi_suite_on_the_device(request):
    """tests/mpi/test_ps.py's gpu tests at 3 ranks: workers on the device, staged through pinned memory."""
    from test_mpi import device_suite
    device_suite(request, 3, "tests/mpi/test_ps.py")


@pytest.mark.mpi
def test_cli_end_to_end_and_too_many_servers(tmp_path):
    common = ["-m", "ddp", "train", "--mode", "ps", "--dataset", "synthetic_classification", "--n-samples", "300",
              "--hidden", "16", "--epochs", "2", "--no-progress", "--out", str(tmp_path)]
    res = run_mpi(3, common + ["--servers", "2", "--consistency", "ssp", "--staleness", "1"], timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("in ps mode: 2 server(s)") == 1 and res.stdout.count("ddp: done") == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "ps" and summary["workers"] == 1 and summary["max_staleness"] <= 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "checkpoint.npz").exists()
    res = run_mpi(2, common + ["--servers", "2"], timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("ddp: error:") == 1 and "--servers 2 leaves no worker among 2 ranks" in res.stderr


FAIL = """
import sys
import ddp.cli, ddp.model, ddp.ps
from mpi4py import MPI
RANK, WHERE = MPI.COMM_WORLD.Get_rank(), sys.argv[1]
calls = [0]
def failing(orig, rank):
    def f(*a, **k):
        calls[0] += 1
        if RANK == rank and calls[0] == 5:
            raise ValueError(f"injected failure on rank {RANK}")
        return orig(*a, **k)
    return f
if WHERE == "worker":       # the last rank is a worker: fail in its 5th backward
    ddp.model.MLP.forward_backward = failing(ddp.model.MLP.forward_backward, MPI.COMM_WORLD.Get_size() - 1)
else:                       # rank 0 is a server: fail in its 5th update
    ddp.ps.Server.apply = failing(ddp.ps.Server.apply, 0)
raise SystemExit(ddp.cli.main(["train", "--mode", "ps", "--servers", sys.argv[2], "--consistency", sys.argv[3],
                               "--dataset", "synthetic_classification", "--n-samples", "2000", "--hidden", "32",
                               "--epochs", "100", "--no-progress", "--out", OUT]))
"""


@pytest.mark.mpi
@pytest.mark.parametrize("n, servers, consistency, where", [(3, 1, "sync", "worker"), (4, 2, "ssp", "worker"),
                                                            (4, 2, "async", "server")])
def test_a_failing_rank_ends_the_job_promptly(tmp_path, n, servers, consistency, where):
    script = tmp_path / "fail.py"
    script.write_text(f"OUT = {str(tmp_path / 'out')!r}\n" + FAIL)
    t0 = time.monotonic()
    res = run_mpi(n, [str(script), where, str(servers), consistency], timeout=2 * LIVENESS_S)
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "injected failure on rank" in out and "Traceback" in out
    assert elapsed < LIVENESS_S, f"the job took {elapsed:.1f} s to die"
