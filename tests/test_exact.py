"""--deterministic (issue 16): float32 training whose every checkpoint array, metric and summary figure is the
same bits for any world size. Simulated ranks here (1..8, and a resume at another world size); real MPI ranks in
tests/mpi/test_allreduce.py (1, 2, 4) and tests/test_run_mpi.py (3, through the launcher)."""
import json
import os

import numpy as np
import pytest

from ddp.comm import SerialComm
from ddp.comm_simulated import run_simulated
from ddp.config import Config
from ddp.data import chunk_shard, shard_range
from ddp.errors import UsageError
from ddp.exact import ExactSum
from ddp.train import run

CKPT = "checkpoint.npz"
TIMING = {"samples_per_s", "elapsed_s", "phase_s", "straggler"}


def arrays(out):
    """Every checkpoint array but the configuration (which records the world size and the folder)."""
    z = np.load(os.path.join(out, CKPT), allow_pickle=False)
    return {k: z[k] for k in z.files if k != "config"}


def figures(out):
    """metrics.jsonl and summary.json without what the clock decides."""
    lines = [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in open(os.path.join(out, "metrics.jsonl"))]
    summary = json.load(open(os.path.join(out, "summary.json")))
    return lines, {k: v for k, v in summary.items() if k.startswith(("test_", "val_", "steps", "epochs"))}


def same_bits(a: dict, b: dict) -> list:
    """Names of the arrays that differ in shape, dtype or any bit."""
    assert a.keys() == b.keys()
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]


def train(tmp_path, name, ranks=0, **kw):
    base = dict(dataset="digits", hidden="24,16", lr=0.02, momentum=0.9, batch_size=32, epochs=2, seed=3,
                deterministic=True, progress=False, quiet=True, check_every=5)
    out = str(tmp_path / name)
    run(Config(out=out, simulate_ranks=ranks, **{**base, **kw}))
    return out


VARIANTS = {
    "sgd-momentum": {},
    "adam-cosine-clip": dict(optimizer="adam", momentum=0.0, lr=0.005, schedule="cosine", warmup_steps=4,
                             clip_grad_norm=0.5),
    "adamw-uneven-batches": dict(optimizer="adamw", momentum=0.0, lr=0.005, batch_size=37, weight_decay=0.01),
    # conv, pooling, layernorm and dropout (its mask keyed by global rows) are row by row: chunks need nothing more
    "cnn": dict(input_shape="1,8,8", epochs=1, arch="conv:4:3:1:1,relu,maxpool:2,flatten,layernorm,dense:16,relu,"
                                                   "dropout:0.2,dense:10"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_is_bitwise_the_same_on_1_to_8_simulated_ranks(tmp_path, variant):
    kw = VARIANTS[variant]
    ref = train(tmp_path, "one", **kw)
    ref_arrays, ref_figures = arrays(ref), figures(ref)
    assert ref_arrays["layers.0.W"].dtype == np.float32 if "layers.0.W" in ref_arrays else True
    for n in (2, 3, 5, 8):
        # overlap, buckets and accumulation change how the work is scheduled, never what is summed
        out = train(tmp_path, f"sim{n}", ranks=n, overlap="on", bucket_mb=0.0, accumulate=2, **kw)
        assert same_bits(arrays(out), ref_arrays) == [], f"{n} simulated ranks"
        assert figures(out) == ref_figures, f"{n} simulated ranks"


def test_without_it_float32_depends_on_the_world_size(tmp_path):
    """The reason for the flag: the same run on 3 and 5 ranks ends in other bits (the sum's order differs)."""
    ref = arrays(train(tmp_path, "one", deterministic=False))
    diffs = [same_bits(arrays(train(tmp_path, f"sim{n}", ranks=n, deterministic=False)), ref) for n in (3, 5)]
    assert any(k.startswith("layers.") for d in diffs for k in d), diffs


def test_a_resume_on_another_world_size_is_bitwise(tmp_path):
    """2 ranks train 13 steps and stop; 3 ranks resume and finish: every array equals one uninterrupted process."""
    ref = arrays(train(tmp_path, "one", optimizer="adam", momentum=0.0, lr=0.005))
    out = train(tmp_path, "split", ranks=2, optimizer="adam", momentum=0.0, lr=0.005, max_steps=13)
    assert int(arrays(out)["step"]) == 13
    train(tmp_path, "split", ranks=3, optimizer="adam", momentum=0.0, lr=0.005, resume=os.path.join(out, CKPT))
    assert same_bits(arrays(out), ref) == []


@pytest.mark.parametrize("servers, workers", [(1, 1), (1, 3), (2, 2), (3, 5)])
def test_sync_ps_mode_is_bitwise_allreduce_mode(tmp_path, servers, workers):
    """The workers push their chunks' exact float64 sums; the servers add them in float64: every checkpoint array
    of one allreduce process, for any number of servers and workers (Adam, whose axpy is exact too)."""
    kw = dict(optimizer="adam", momentum=0.0, lr=0.005, batch_size=37)
    ref = arrays(train(tmp_path, "one", **kw))
    out = train(tmp_path, "ps", ranks=servers + workers, mode="ps", servers=servers, **kw)
    assert same_bits(arrays(out), ref) == []


def test_exact_sum_of_chunks_equals_the_float64_sum_rounded_once_for_every_split():
    """Chunks of wildly different scales (1e-30 .. 1e3, mixed signs): every split over ranks gives the same bits,
    within one float32 rounding of the float64 sum, plus K half quanta (2^-49 of the largest element here)."""
    rng = np.random.default_rng(0)
    k, p = 7, 500
    chunks = (rng.standard_normal((k, p)) * 10.0 ** rng.integers(-30, 4, (k, p))).astype(np.float32)
    want = chunks.astype(np.float64).sum(0)
    results = []
    for world in (1, 2, 3, 4, 7, 9):
        def body(comm):
            ex = ExactSum(comm, np.zeros(p, np.float32), k)
            a, b = shard_range(k, comm.rank, world)
            for i in range(a, b) if b > a else [None]:
                g = chunks[i] if i is not None else np.zeros(p, np.float32)
                ex.add(g, 0.25 * (i or 0))
            out = np.zeros(p, np.float32)
            ex.finish(out)
            return out, ex.loss
        got = run_simulated(world, body) if world > 1 else [body(SerialComm())]
        assert all(g[0].tobytes() == got[0][0].tobytes() for g in got)        # every rank the same
        results.append(got[0])
    assert all(r[0].tobytes() == results[0][0].tobytes() for r in results), "a split changed the bits"
    assert all(r[1] == 0.25 * sum(range(k)) for r in results)
    # rounding loses at most half a quantum per chunk: 2^(E - 49) for the largest element |g| < 2^E, K = 7
    quantum = 2.0 ** (np.frexp(np.abs(chunks).max())[1] - 49)
    np.testing.assert_allclose(results[0][0], want.astype(np.float32), rtol=2 ** -23, atol=k * quantum)


@pytest.mark.parametrize("scale", [1e300, 1e-300], ids=["huge", "tiny"])
def test_exact_sum_spans_float64s_exponents(scale):
    """float64 arenas reach exponents float32 never does (their histogram is wider): the same bits for every split,
    the float64 sum's value for huge elements, and no overflow of the scale for tiny ones (below 2^-948 a step adds
    in units of 2^-1000)."""
    rng = np.random.default_rng(1)
    k, p = 5, 64
    chunks = rng.standard_normal((k, p)) * scale

    def total(world):
        def body(comm):
            ex = ExactSum(comm, np.zeros(p), k)
            a, b = shard_range(k, comm.rank, world)
            for i in range(a, b) if b > a else [None]:
                ex.add(chunks[i] if i is not None else np.zeros(p), 0.0)
            out = np.zeros(p)
            ex.finish(out)
            return out
        return run_simulated(world, body)[0] if world > 1 else body(SerialComm())
    got = [total(w) for w in (1, 2, 3, 6)]
    assert all(g.tobytes() == got[0].tobytes() for g in got)
    if scale > 1:
        np.testing.assert_allclose(got[0], chunks.sum(0), rtol=1e-12)
    else:
        assert np.all(np.abs(got[0] - chunks.sum(0)) <= k * 2.0 ** -1000)


def test_exact_sum_passes_nan_on_so_the_finite_check_names_the_step():
    ex = ExactSum(SerialComm(), np.zeros(4, np.float32), 2)
    ex.add(np.array([1, 2, np.nan, 3], np.float32), 0.0)
    ex.add(np.ones(4, np.float32), 0.0)
    out = np.zeros(4, np.float32)
    ex.finish(out)
    assert np.isnan(out).all()


def test_chunks_are_cut_by_the_batch_alone():
    batch = np.arange(37)
    want = [c.tolist() for c in np.array_split(batch, 8)]
    for world in (1, 2, 3, 4, 6, 8, 11):
        mine = [chunk_shard(batch, r, world, 8) for r in range(world)]
        assert [c.tolist() for m in mine for c in m if len(c)] == want, world
        assert all(len(m) >= 1 for m in mine)             # a rank with no chunk still joins the step


@pytest.mark.parametrize("kw,message", [
    (dict(mode="ps", consistency="async"), "--deterministic in ps mode needs --consistency sync"),
    (dict(mode="ps", clip_grad_norm=1.0), "--clip-grad-norm with --deterministic needs --mode allreduce"),
    (dict(compress="fp16"), "cannot be combined with --compress"),
    (dict(noise_scale=True), "--noise-scale needs each rank's own gradient"),
    (dict(arch="dense:8,batchnorm,relu,dense:3"), "cannot train batchnorm"),
    (dict(chunks=0), "chunks 0 must be >= 1"),
])
def test_what_it_cannot_do_is_refused_by_name(kw, message):
    with pytest.raises(UsageError, match=message):
        Config(deterministic=True, **kw).validate()
