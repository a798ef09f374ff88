"""--compress auto (issue 19, deliverable 2, first part): the candidates are timed on the job's own ranks before
training. These tests hold the timings' outcome fixed by construction (a reduction that costs nothing, a link
that costs a microsecond per byte), never by a threshold on this machine's speed."""
import json
import os
import time

import numpy as np
import pytest

from ddp.autotune import choose_compress, decide
from ddp.comm import SerialComm
from ddp.config import Config
from ddp.errors import UsageError
from ddp.model import MLP
from ddp.train import run


class SlowLink(SerialComm):
    """One rank whose every reduction waits 1 us per byte, as a 1 MB/s link would: compression must win."""

    def allreduce_sum(self, buf, compress=None):
        time.sleep(buf.nbytes / (2 if compress == "fp16" else 1) * 1e-6)
        super().allreduce_sum(buf, compress)


def batch(model, n=32):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, model.sizes[0])), rng.integers(0, model.sizes[-1], n)


def test_a_reduction_that_costs_nothing_keeps_plain_allreduce():
    """One process: plain allreduce is a no-op, every compression does work on top of it."""
    model = MLP([30, 64, 10], dtype="float64")
    choice, why = choose_compress(model, SerialComm(), *batch(model), denom=32, seed=0)
    assert choice == "none" and "none" in why and "powersgd:2" in why


def test_a_slow_link_picks_a_compression_and_the_model_is_left_as_it_was():
    model = MLP([30, 256, 10], dtype="float64")        # 10,506 parameters: 84 ms a reduction at 1 MB/s
    before = model.state_dict()
    choice, why = choose_compress(model, SlowLink(), *batch(model), denom=32, seed=0)
    assert choice.startswith("powersgd:"), why          # 2-4 ms of factors beat 42 ms of fp16
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


def test_auto_is_refused_in_ps_mode():
    with pytest.raises(UsageError, match="--compress auto needs --mode allreduce"):
        Config(compress="auto", mode="ps").validate()
