"""Parameter-server mode under real MPI, at any world size (tests/test_ps.py runs it at -n 2, 3 and 4;
tests/test_mpi.py's sizes work too).

Each test runs the splits into servers and workers that fit the world it was launched with, and
skips with a reason where none does. The reference is single-process training, computed on every
rank: allreduce mode equals it to 1e-12, so sync ps mode must too. Asserts are collective.
"""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import all_ranks, rel_diff

import ddp.backend
import ddp.comm
from ddp.comm import SerialComm
from ddp.config import Config
from ddp.errors import UsageError
from ddp.errors import TrainingError
from ddp.checkpoint import load_checkpoint
from ddp.train import run

# 240 training rows in batches of 32: 8 steps per epoch, the last one uneven across 3 workers,
# and 50 steps end inside epoch 7.
BASE = dict(dataset="synthetic_classification", n_samples=300, hidden="16", batch_size=32, lr=0.1,
            momentum=0.9, dtype="float64", progress=False, val_fraction=0.1, test_fraction=0.1,
            max_steps=50, epochs=10, check_every=10)


def splits(comm, wanted=(1, 2)):
    """The server counts from `wanted` that leave at least one worker at this world size."""
    fit = [S for S in wanted if S < comm.size]
    if not fit:
        pytest.skip(f"ps mode needs more than {min(wanted)} rank(s); this world has {comm.size}")
    return fit


def train(cfg, comm):
    """Run; returns (summary, this rank's parameters after the last step, or None on a server)."""
    last = {}

    def on_step(step, model, c):
        last["p"] = ddp.backend.to_numpy(model.params).copy()     # np.array() would fail on a GPU array
    return run(cfg, comm, on_step=on_step), last.get("p")


def compare_checkpoints(path, ref_path):
    """Largest relative difference over every array of two checkpoints, and the keys that differ."""
    a, b = load_checkpoint(path), load_checkpoint(ref_path)
    keys = set(a) ^ set(b)
    worst = max(rel_diff(a[k], b[k]) if a[k].dtype.kind == "f" else float(not np.array_equal(a[k], b[k]))
                for k in set(a) & set(b) if k not in ("config", "meta"))
    return worst, sorted(keys)


VARIANTS = {
    "sgd-momentum": {},
    "adam-cosine-decay": dict(optimizer="adam", momentum=0.0, lr=0.01, weight_decay=1e-3, schedule="cosine",
                              warmup_steps=5),
    "accumulate-2": dict(accumulate=2),
    "ssp-staleness-0": dict(consistency="ssp", staleness=0),
    # the servers clip by the global norm: their parts' squared norms summed over the servers (issue 16)
    "adam-clip": dict(optimizer="adam", momentum=0.0, lr=0.01, clip_grad_norm=0.3),
    # exact float64 pushes added by the servers: bitwise, float32 (issue 16)
    "deterministic-float32": dict(optimizer="adam", momentum=0.0, lr=0.01, deterministic=True, dtype="float32"),
    "cnn-dropout-layernorm": dict(n_features=36, input_shape="1,6,6",
                                  arch="conv:3:3:1:1,relu,maxpool:2,flatten,layernorm,dense:8,dropout:0.3,dense:3"),
}


def metrics(path):
    import json
    return [(r["grad_norm"], r["clipped_steps"]) for r in map(json.loads, open(path))]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sync_equals_allreduce(comm, shared_tmp, variant):
    kw = {**BASE, **VARIANTS[variant]}
    ps_kw = {k: kw.pop(k) for k in ("consistency", "staleness") if k in kw}
    ref_out = os.path.join(shared_tmp, f"{variant}-ref-{comm.rank}")
    _, ref = train(Config(out=ref_out, **kw), SerialComm())
    for S in splits(comm):
        out = os.path.join(shared_tmp, f"{variant}-ps{S}")
        summary, mine = train(Config(out=out, mode="ps", servers=S, **ps_kw, **kw), comm)
        is_worker = comm.rank >= S
        d = rel_diff(mine, ref) if is_worker else 0.0
        tol = 0.0 if kw.get("deterministic") else 1e-12
        all_ranks(comm, d <= tol, f"S={S}: parameters differ from one process by {d:.3e}")
        all_ranks(comm, summary["steps"] == 50 and summary["max_staleness"] == 0, summary)
        # ONE checkpoint, in allreduce mode's format, holding the servers' shards and optimizer state
        verdict = (True, "")
        if comm.rank == 0:
            worst, odd = compare_checkpoints(os.path.join(out, "checkpoint.npz"),
                                             os.path.join(ref_out, "checkpoint.npz"))
            verdict = (worst <= tol and not odd, f"S={S}: checkpoint differs by {worst:.3e}, keys {odd}")
            if kw.get("clip_grad_norm"):           # the norm before clipping, and the steps clipped, per epoch
                got, want = (metrics(os.path.join(o, "metrics.jsonl")) for o in (out, ref_out))
                verdict = (verdict[0] and len(got) == len(want) > 0 and all(
                    g[1] == w[1] and abs(g[0] - w[0]) <= 1e-12 * w[0] for g, w in zip(got, want)), (got, want))
        all_ranks(comm, *verdict)
        # Traffic: each worker step pushes one model's worth of gradients and pulls one of parameters.
        M, W = summary["model_bytes"], comm.size - S
        G = M * 8 // np.dtype(kw["dtype"]).itemsize if kw.get("deterministic") else M     # pushed: float64
        sent, recv = summary["step_bytes_sent"], summary["step_bytes_received"]
        all_ranks(comm, all(sent[r] == 50 * G and recv[r] == 50 * (M + 32 * S) for r in range(S, comm.size))
                  and sum(recv[:S]) == W * 50 * G and sum(sent[:S]) == W * 50 * (M + 32 * S), (sent, recv))


def test_staged_buffers_as_on_a_gpu(comm, shared_tmp, monkeypatch, device):
    """The workers' GPU path: every message goes through a pinned host copy. On CuPy for real; on
    NumPy with the backend's copies done by NumPy, so CI without a GPU tests the bookkeeping too."""
    if device == "cpu":       # the MPI communicator stages every array as if it lived on a GPU
        class Staged(SimpleNamespace):
            def __getattr__(self, name):
                return getattr(ddp.backend, name)
        monkeypatch.setattr(ddp.comm, "backend", Staged(
            is_gpu_array=lambda x: True, synchronize=lambda x=None: None, pointer=lambda x: x.ctypes.data,
            pinned_empty=lambda shape, dtype: np.full(shape, np.nan, dtype),
            copy_to_host=lambda src, dst: np.copyto(dst, src), copy_to_device=lambda src, dst: np.copyto(dst, src)))
    kw = {**BASE, "device": device, "max_steps": 20}
    _, ref = train(Config(out=os.path.join(shared_tmp, f"staged-{device}-ref-{comm.rank}"), **kw), SerialComm())
    S = splits(comm)[-1]
    _, mine = train(Config(out=os.path.join(shared_tmp, f"staged-{device}"), mode="ps", servers=S, **kw), comm)
    d = rel_diff(mine, ref) if comm.rank >= S else 0.0
    # a GPU may fuse multiply-adds that the servers' NumPy does not: allow a few more roundings there
    all_ranks(comm, d <= (1e-12 if device == "cpu" else 1e-10), f"staged ({device}) differs by {d:.3e}")


@pytest.mark.parametrize("consistency, staleness", [("async", 0), ("ssp", 2)])
def test_async_and_ssp_learn_digits(comm, shared_tmp, consistency, staleness):
    S = splits(comm, (2,) if comm.size >= 4 else (1,))[0]
    out = os.path.join(shared_tmp, f"digits-{consistency}")
    cfg = Config(dataset="digits", hidden="64", lr=0.05, momentum=0.5, batch_size=32, epochs=12, progress=False,
                 out=out, mode="ps", servers=S, consistency=consistency, staleness=staleness)
    summary, _ = train(cfg, comm)
    all_ranks(comm, summary["test_accuracy"] >= 0.95, f"{consistency}: test accuracy {summary['test_accuracy']}")
    verdict = (True, "")
    if comm.rank == 0:                      # rank 0 wrote the metrics and the summary
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            records = [json.loads(line) for line in fh]
        with open(os.path.join(out, "summary.json")) as fh:
            written = json.load(fh)
        peaks = [r["max_staleness"] for r in records]
        ok = len(records) == 12 and written["max_staleness"] == max(peaks) == summary["max_staleness"]
        ok = ok and all(0 <= r["mean_staleness"] <= r["max_staleness"] for r in records)
        if consistency == "ssp":
            ok = ok and max(peaks) <= staleness
        verdict = (ok, f"staleness per epoch {peaks}, summary {written['max_staleness']}")
    all_ranks(comm, *verdict)


def test_ps_checkpoint_resumes_in_allreduce_mode(comm, shared_tmp):
    S = splits(comm)[-1]
    kw = dict(BASE)
    _, ref = train(Config(out=os.path.join(shared_tmp, f"resume-ref-{comm.rank}"), **kw), SerialComm())
    half = os.path.join(shared_tmp, "ps-20")
    train(Config(out=half, mode="ps", servers=S, **{**kw, "max_steps": 20}), comm)
    # every rank resumes the ps checkpoint on its own, in allreduce mode
    summary, resumed = train(Config(out=os.path.join(shared_tmp, f"ar-resume-{comm.rank}"),
                                    resume=os.path.join(half, "checkpoint.npz"), **kw), SerialComm())
    d = rel_diff(resumed, ref)
    all_ranks(comm, d <= 1e-12 and summary["steps"] == 50, f"ps -> allreduce resume differs by {d:.3e}")


def test_allreduce_checkpoint_resumes_in_ps_mode(comm, shared_tmp):
    S = splits(comm)[-1]
    kw = dict(BASE, optimizer="adam", momentum=0.0, lr=0.01)
    _, ref = train(Config(out=os.path.join(shared_tmp, f"ps-resume-ref-{comm.rank}"), **kw), SerialComm())
    half = os.path.join(shared_tmp, "ar-20")
    if comm.rank == 0:
        train(Config(out=half, **{**kw, "max_steps": 20}), SerialComm())
    comm.barrier()
    out = os.path.join(shared_tmp, "ps-resumed")
    summary, mine = train(Config(out=out, mode="ps", servers=S, resume=os.path.join(half, "checkpoint.npz"), **kw),
                          comm)
    d = rel_diff(mine, ref) if comm.rank >= S else 0.0
    all_ranks(comm, d <= 1e-12 and summary["steps"] == 50, f"allreduce -> ps resume differs by {d:.3e}")
    verdict = (True, "")
    if comm.rank == 0:                      # the resumed run appended epochs 3.. to a fresh metrics file
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            steps = [json.loads(line)["step"] for line in fh]
        verdict = (steps == [24, 32, 40, 48, 50], steps)
    all_ranks(comm, *verdict)


def test_usage_errors_on_every_rank(comm, shared_tmp):
    """Too many servers (or one rank in all): every rank raises the same UsageError, none waits."""
    for S, expect in [(comm.size, "ps mode needs at least 2 ranks" if comm.size == 1 else "leaves no worker"),
                      (comm.size + 2, "ps mode needs" if comm.size == 1 else "leaves no worker")]:
        try:
            run(Config(out=os.path.join(shared_tmp, "err"), mode="ps", servers=S, **BASE), comm)
            msg = "no error"
        except UsageError as e:
            msg = str(e)
        all_ranks(comm, expect in msg, msg)


@pytest.mark.parametrize("consistency", ["sync", "async", "ssp"])
def test_divergence_stops_every_rank(comm, shared_tmp, consistency):
    S = splits(comm)[0]
    cfg = Config(out=os.path.join(shared_tmp, f"nan-{consistency}"), mode="ps", servers=S,
                 consistency=consistency, staleness=1, **{**BASE, "lr": 1e12})
    try:
        run(cfg, comm)
        msg = "no error"
    except TrainingError as e:
        msg = str(e)
    all_ranks(comm, "NaN" in msg or "loss became" in msg, msg)
    all_ranks(comm, len(set(comm.allgather_obj(msg))) == 1, "ranks report different errors")
