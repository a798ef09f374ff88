"""--compress auto and --bucket-mb auto (issue 19, deliverable 2): the candidates are timed on the job's own ranks
before training. These tests hold the timings' outcome fixed by construction (a reduction that costs nothing, a link
that costs a microsecond per byte), never by a threshold on this machine's speed."""
import json
import os
import time

import numpy as np
import pytest

from ddp.autotune import GRID_MB, BucketTuner, choose_compress, decide
from ddp.comm import SerialComm
from ddp.config import Config, load_toml
from ddp.errors import UsageError
from ddp.model import MLP
from ddp.parallel import DataParallel
from ddp.train import run


class SlowLink(SerialComm):
    """One rank whose every reduction waits 1 us per byte, as a 1 MB/s link would: compression must win."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def allreduce_sum(self, buf, compress=None):
        self.sizes.append((buf.size, compress))
        time.sleep(buf.nbytes / (2 if compress == "fp16" else 1) * 1e-6)
        super().allreduce_sum(buf, compress)


def batch(model, n=32):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, model.sizes[0])), rng.integers(0, model.sizes[-1], n)


def test_a_reduction_that_costs_nothing_keeps_plain_allreduce():
    """One process: plain allreduce is a no-op, every compression does work on top of it."""
    model = MLP([30, 64, 10], dtype="float64")
    choice, why = choose_compress(model, SerialComm(), *batch(model), denom=32, seed=0)
    assert choice == "none" and "none" in why and "powersgd:2" in why and ">" not in why   # all timed whole


def test_a_slow_link_picks_a_compression_and_the_model_is_left_as_it_was():
    model = MLP([30, 256, 10], dtype="float64")        # 10,506 parameters: 84 ms a reduction at 1 MB/s
    before = model.state_dict()
    link = SlowLink()
    choice, why = choose_compress(model, link, *batch(model), denom=32, seed=0)
    assert choice.startswith("powersgd:"), why          # 2-4 ms of factors beat 42 ms of fp16
    # fp16 and none lost on a probe (a part of the arena): the whole arena never went through the link
    assert "fp16 > " in why and "none > " in why and (model.num_params, None) not in link.sizes, why
    assert (model.num_params // 32, None) in link.sizes
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before) and not model.grads.any()


def test_auto_trains_what_its_choice_trains(tmp_path):
    """The trial steps leave no trace: a batch-norm network's running statistics are put back, so the run with
    --compress auto (one process: it keeps none) ends in the bits of the run with --compress none."""
    kw = dict(dataset="synthetic_classification", n_samples=200, n_features=8, arch="dense:16,batchnorm,relu,dense:3",
              batch_size=32, epochs=2, progress=False, quiet=True)
    got = run(Config(out=str(tmp_path / "auto"), compress="auto", **kw))
    run(Config(out=str(tmp_path / "none"), compress="none", **kw))
    assert got["compress"] == "none"
    a, b = (np.load(os.path.join(tmp_path, d, "checkpoint.npz")) for d in ("auto", "none"))
    assert [k for k in b.files if k != "config" and a[k].tobytes() != b[k].tobytes()] == []
    assert json.load(open(tmp_path / "auto" / "summary.json"))["compress"] == "none"


@pytest.mark.parametrize("compute, times, want", [
    (10.0, dict(none=2.0, fp16=1.0, **{"powersgd:2": 1.5}), "none"),        # 11 ms is not below 0.9 x 12
    (10.0, dict(none=4.0, fp16=2.0, **{"powersgd:2": 0.5}), "powersgd:2"),  # 10.5 < 0.9 x 14
    (1.0, dict(none=4.0, fp16=1.0, **{"powersgd:2": 2.0}), "fp16"),
    (1.0, dict(none=1.0, fp16=3.0, **{"powersgd:2": 2.0}), "none"),
])
def test_a_compression_must_save_a_tenth_of_the_step(compute, times, want):
    assert decide(compute, times)[0] == want


def test_a_candidate_out_on_its_probe_is_never_chosen_and_shown_as_a_bound():
    choice, why = decide(1e-3, {"powersgd:1": 3e-3, "powersgd:2": 2e-3}, {"fp16": 5e-3, "none": 9e-3})
    assert choice == "powersgd:2" and "none > 10.00 ms" in why and "powersgd:1 4.00 ms" in why


def test_auto_is_refused_in_ps_mode():
    with pytest.raises(UsageError, match="--compress auto needs --mode allreduce"):
        Config(compress="auto", mode="ps").validate()


class LatencyLink(SerialComm):
    """Every reduction waits 20 ms, as a link with a long latency would: the fewest buckets must win."""

    def iallreduce_sum(self, buf, compress=None):
        time.sleep(0.02)
        return super().iallreduce_sum(buf, compress)


class HiddenLink(SerialComm):
    """Reductions started during backward cost nothing (as if hidden behind it); the blocking one after backward
    waits 1 us per byte: the smallest last bucket, one bucket per layer, must win."""

    def allreduce_sum(self, buf, compress=None):
        time.sleep(buf.nbytes * 1e-6)
        super().allreduce_sum(buf, compress)


@pytest.mark.parametrize("link, want, buckets", [(LatencyLink, 1 / 16, 1), (HiddenLink, 0, 3)])
def test_bucket_auto_keeps_the_bucketing_with_the_fastest_steps(link, want, buckets):
    model = MLP([30, 64, 64, 10], dtype="float64")       # 54 KB of gradient: 1/16 MB and up is one bucket
    dp = DataParallel(model, link(), bucket_bytes=1 << 20, overlap=True)
    tuner = BucketTuner(dp)
    tried, why = [], None
    while why is None:                                    # the training loop: a step, then step_done
        tried.append(len(dp.buckets))
        dp.forward_backward(*batch(model), denom=32, step=0)
        why = tuner.step_done()
    assert tried == [3] * 4 + [1] * 4                     # each distinct bucketing: one step to settle, 3 timed
    assert (tuner.choice, len(dp.buckets)) == (want, buckets), why
    assert "after 8 steps" in why and "0 MB (3 buckets)" in why and "0.0625 MB (1 bucket)" in why


def test_bucket_auto_on_simulated_ranks_trains_what_a_fixed_bucket_trains(tmp_path, capsys):
    kw = dict(dataset="synthetic_classification", n_samples=300, n_features=12, arch="dense:32,batchnorm,relu,dense:3",
              batch_size=30, epochs=2, simulate_ranks=3, progress=False)
    got = run(Config(out=str(tmp_path / "auto"), bucket_mb="auto", **kw))
    assert got["bucket_mb"] in GRID_MB
    assert f"--bucket-mb auto chose {got['bucket_mb']:g} after 8 steps" in capsys.readouterr().out
    run(Config(out=str(tmp_path / "fixed"), bucket_mb=1.0, overlap="on", **kw))
    a, b = (np.load(os.path.join(tmp_path, d, "checkpoint.npz")) for d in ("auto", "fixed"))
    assert [k for k in b.files if k != "config" and a[k].tobytes() != b[k].tobytes()] == []


def test_bucket_auto_from_toml_and_its_refusals(tmp_path):
    (tmp_path / "a.toml").write_text('bucket_mb = "auto"\n')
    assert load_toml(str(tmp_path / "a.toml")) == {"bucket_mb": "auto"}
    (tmp_path / "b.toml").write_text('bucket_mb = "fast"\n')
    with pytest.raises(UsageError, match="bucket_mb.*must be a float"):
        load_toml(str(tmp_path / "b.toml"))
    for kw in (dict(mode="ps"), dict(overlap="off"), dict(deterministic=True), dict(shard_optimizer=True),
               dict(compress="powersgd:2")):
        with pytest.raises(UsageError, match="--bucket-mb auto times overlapped buckets"):
            Config(bucket_mb="auto", **kw).validate()
