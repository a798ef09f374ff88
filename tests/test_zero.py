"""--shard-optimizer (issue 16, ZeRO stage 1): each rank keeps ceil(P/N) elements of each optimizer state array;
the weights equal the unsharded run's (bitwise with --deterministic, to 1e-12 in float64), and checkpoints hold
the whole state, so any world size, sharded or not, resumes them. Real MPI ranks: tests/mpi/test_allreduce.py
and tests/test_run_mpi.py (SIGTERM on 2 sharded ranks, resumed on 3)."""
import json
import math
import os

import numpy as np
import pytest

from helpers import rel_diff
from ddp.comm import SerialComm
from ddp.comm_simulated import run_simulated
from ddp.config import Config
from ddp.errors import UsageError
from ddp.optim import make_optimizer
from ddp.train import run
from ddp.zero import ShardedOptimizer

CKPT = "checkpoint.npz"


def arrays(out):
    z = np.load(os.path.join(out, CKPT), allow_pickle=False)
    return {k: z[k] for k in z.files if k != "config"}


def differing(a, b):
    assert a.keys() == b.keys()
    return [k for k in a if a[k].tobytes() != b[k].tobytes()]


def grad_norms(out):
    return [json.loads(x)["grad_norm"] for x in open(os.path.join(out, "metrics.jsonl"))]


def train(tmp_path, name, ranks=0, **kw):
    base = dict(dataset="synthetic_classification", n_samples=300, n_features=12, hidden="15,8", batch_size=24,
                lr=0.01, optimizer="adam", momentum=0.0, epochs=2, seed=4, progress=False, quiet=True,
                check_every=5)
    out = str(tmp_path / name)
    run(Config(out=out, simulate_ranks=ranks, **{**base, **kw}))
    return out


VARIANTS = {
    "sgd-momentum": dict(optimizer="sgd", momentum=0.9, lr=0.05, nesterov=True, weight_decay=1e-3),
    "adam-cosine-clip": dict(schedule="cosine", warmup_steps=3, clip_grad_norm=0.05),
    "adamw": dict(optimizer="adamw", weight_decay=0.05),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_equals_unsharded_bitwise_with_deterministic(tmp_path, variant):
    """float32, --deterministic: 1 to 4 simulated ranks sharded end in the unsharded one-process checkpoint's
    bits, optimizer state included (gathered whole), and the same gradient norms (clipping uses the global one)."""
    kw = dict(VARIANTS[variant], dtype="float32", deterministic=True)
    ref = train(tmp_path, "ref", **kw)
    for n in (1, 2, 3, 4):
        out = train(tmp_path, f"zero{n}", ranks=n if n > 1 else 0, shard_optimizer=True, **kw)
        assert differing(arrays(out), arrays(ref)) == [], f"{n} ranks"
        assert grad_norms(out) == grad_norms(ref)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_equals_one_process_in_float64(tmp_path, variant):
    kw = dict(VARIANTS[variant], dtype="float64")
    ref = arrays(train(tmp_path, "ref", **kw))
    for n in (2, 3):
        got = arrays(train(tmp_path, f"zero{n}", ranks=n, shard_optimizer=True, **kw))
        assert [k for k in ref if k != "meta" and rel_diff(got[k], ref[k]) > 1e-12] == [], f"{n} ranks"


def test_a_sharded_checkpoint_resumes_on_any_world_size_sharded_or_not(tmp_path):
    kw = dict(dtype="float32", deterministic=True)
    ref = arrays(train(tmp_path, "ref", **kw))
    for name, first, then in (("2-to-3", 2, dict(ranks=3, shard_optimizer=True)),
                              ("3-to-1-unsharded", 3, dict()),
                              ("unsharded-2-to-sharded-4", 0, dict(ranks=4, shard_optimizer=True))):
        out = train(tmp_path, name, ranks=first, shard_optimizer=bool(first), max_steps=17, **kw)
        assert int(arrays(out)["step"]) == 17
        train(tmp_path, name, resume=os.path.join(out, CKPT), **then, **kw)
        assert differing(arrays(out), ref) == [], name


def test_each_rank_keeps_ceil_p_over_n_of_each_state_array():
    p = 1001

    def body(comm):
        params, grads = np.zeros(p, np.float32), np.zeros(p, np.float32)
        opt = ShardedOptimizer(lambda a, g: make_optimizer("adam", a, g, lr=0.1), params, grads, comm)
        return [getattr(opt.inner, name).size for name in opt.state_names]
    for n in (1, 2, 3, 4, 7):
        sizes = run_simulated(n, body) if n > 1 else [body(SerialComm())]
        assert max(max(s) for s in sizes) == math.ceil(p / n)
        assert sum(s[0] for s in sizes) == p                     # the shards cover the arena once


def test_sharded_step_updates_only_its_shard_then_gathers_the_whole():
    """The reduce-scatter fills each rank's part; the update and the allgather give every rank the SGD step of
    the summed gradient over the whole arena (a float64 NumPy reference written here)."""
    p, rng = 23, np.random.default_rng(0)
    w0 = rng.standard_normal(p)
    g = rng.standard_normal((3, p))

    def body(comm):
        params, grads = w0.copy(), g[comm.rank].copy()
        opt = ShardedOptimizer(lambda a, b: make_optimizer("sgd", a, b, lr=0.5), params, grads, comm)
        comm.reduce_scatter_sum(grads, opt.counts)
        opt.step()
        return params
    for got in run_simulated(3, body):
        np.testing.assert_allclose(got, w0 - 0.5 * g.sum(0), rtol=0, atol=1e-15)


def test_trace_shows_the_reduce_scatter(tmp_path):
    trace = str(tmp_path / "t.json")
    train(tmp_path, "traced", ranks=2, shard_optimizer=True, trace=trace, epochs=1)
    names = {e.get("name") for e in json.load(open(trace))["traceEvents"]}
    assert "reduce-scatter" in names


@pytest.mark.parametrize("kw,message", [
    (dict(mode="ps"), "--shard-optimizer needs --mode allreduce"),
    (dict(compress="fp16"), "--shard-optimizer cannot be combined with --compress"),
    (dict(grad_norms=True), "--grad-norms needs the whole gradient"),
])
def test_what_it_cannot_do_is_refused_by_name(kw, message):
    with pytest.raises(UsageError, match=message):
        Config(shard_optimizer=True, **kw).validate()
