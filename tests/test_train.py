"""Single-process training end to end: learning on real data, resume, batch modes, simulated ranks."""
import json
import os

import numpy as np
import pytest

from helpers import rel_diff
from ddp import backend
from ddp.config import Config
from ddp.setup import load_data
from ddp.train import run


def cfg_for(tmp_path, **kw):
    kw.setdefault("progress", False)
    return Config(out=str(tmp_path / "run"), **kw)


def final_params(cfg, comm=None):
    """Run and return the last model's parameters (on this rank)."""
    got = {}

    def grab(step, model, comm):
        got["p"] = backend.to_numpy(model.params).copy()
    run(cfg, comm, on_step=grab)
    return got["p"]


REAL = [
    ("digits", dict(hidden="128,64", lr=0.02, momentum=0.9, epochs=40, batch_size=32), "test_accuracy", 0.97),
    ("breast_cancer", dict(hidden="16", lr=0.01, epochs=50, optimizer="adam", weight_decay=1e-2),
     "test_accuracy", 0.96),
    ("diabetes", dict(hidden="16", lr=0.01, momentum=0.9, epochs=60, batch_size=32, weight_decay=1e-2),
     "test_r2", 0.45),
]


@pytest.mark.parametrize("dataset,kw,metric,target", REAL, ids=[r[0] for r in REAL])
def test_learns_real_data_side_by_side_with_sklearn(tmp_path, dataset, kw, metric, target):
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    cfg = cfg_for(tmp_path, dataset=dataset, seed=0, **kw)
    summary = run(cfg)
    train, _, test, _ = load_data(cfg)         # the very split ddp trained and tested on
    hidden = tuple(cfg.hidden_sizes())
    if metric == "test_r2":
        sk = MLPRegressor(hidden_layer_sizes=hidden, max_iter=2000, random_state=0).fit(train.X, train.y.ravel())
        sk_score = sk.score(test.X, test.y.ravel())
    else:
        sk = MLPClassifier(hidden_layer_sizes=hidden, max_iter=1000, random_state=0).fit(train.X, train.y)
        sk_score = sk.score(test.X, test.y)
    print(f"{dataset}: ddp {summary[metric]:.4f}, scikit-learn {sk_score:.4f}")
    assert summary[metric] >= target
    assert summary[metric] >= sk_score - 0.03     # in scikit-learn's league on the same split
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(lines) == cfg.epochs
    val_key = "val_r2" if metric == "test_r2" else "val_accuracy"
    for rec in lines:
        assert {"epoch", "step", "train_loss", "val_loss", val_key, "samples_per_s", "elapsed_s"} <= set(rec)
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_is_bitwise_identical(tmp_path, optimizer):
    base = dict(dataset="synthetic_classification", n_samples=300, hidden="16,8", batch_size=32,
                epochs=5, seed=3, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0,
                lr=0.05, schedule="cosine", dtype="float64")
    k = 13                                            # mid-epoch (10 steps per epoch)
    straight = final_params(Config(out=str(tmp_path / "a"), progress=False, max_steps=2 * k, **base))
    run(Config(out=str(tmp_path / "b"), progress=False, max_steps=k, **base))
    resumed = final_params(Config(out=str(tmp_path / "b"), progress=False, max_steps=2 * k,
                                  resume=str(tmp_path / "b" / "checkpoint.npz"), **base))
    np.testing.assert_array_equal(straight, resumed)
    ck = np.load(tmp_path / "b" / "checkpoint.npz", allow_pickle=False)
    assert int(ck["step"]) == 2 * k
    assert {"layers.0.W", "layers.0.b", "layers.2.W", "optimizer.t", "epoch", "config"} <= set(ck.files)


@pytest.mark.parametrize("mode,steps_per_epoch", [("sgd", 270), ("minibatch", 9), ("full", 1)])
def test_batch_modes(tmp_path, mode, steps_per_epoch):
    cfg = cfg_for(tmp_path, dataset="synthetic_classification", n_samples=300, hidden="8", batch_size=32,
                  batch_mode=mode, epochs=2, lr=0.05, test_fraction=0.0)
    summary = run(cfg)
    assert summary["steps"] == 2 * steps_per_epoch
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [steps_per_epoch, 2 * steps_per_epoch]


def test_full_batch_step_is_one_gradient_descent_step_on_the_whole_set(tmp_path):
    from ddp.model import MLP
    cfg = cfg_for(tmp_path, dataset="synthetic_regression", n_samples=50, hidden="4", batch_mode="full",
                  epochs=1, lr=0.1, dtype="float64", val_fraction=0.0, test_fraction=0.0)
    p = final_params(cfg)
    train, _, _, _ = load_data(cfg)
    ref = MLP([train.X.shape[1], 4, 1], loss="mse", dtype="float64", seed=0)
    ref.forward_backward(train.X, train.y)
    np.testing.assert_allclose(p, ref.params - 0.1 * ref.grads, rtol=1e-12, atol=1e-15)


def test_clip_grad_norm_is_a_float64_reference_of_clipped_momentum_sgd(tmp_path):
    """Issue 16: full-batch steps, each gradient scaled by min(1, MAX / (|g| + 1e-6)) before momentum SGD,
    written here in NumPy; some steps clip and some do not, and the epoch records count them."""
    from ddp.model import MLP
    MAX, LR, MU, EPOCHS = 1.5, 0.1, 0.9, 12
    cfg = cfg_for(tmp_path, dataset="synthetic_regression", n_samples=50, hidden="4", batch_mode="full",
                  epochs=EPOCHS, lr=LR, momentum=MU, dtype="float64", val_fraction=0.0, test_fraction=0.0,
                  clip_grad_norm=MAX)
    p = final_params(cfg)
    train, _, _, _ = load_data(cfg)
    ref = MLP([train.X.shape[1], 4, 1], loss="mse", dtype="float64", seed=0)
    v, clipped = np.zeros_like(ref.params), []
    for _ in range(EPOCHS):
        ref.forward_backward(train.X, train.y)
        g = ref.grads.copy()
        norm = np.sqrt(g @ g)
        clipped.append(MAX / (norm + 1e-6) < 1)
        g *= min(1.0, MAX / (norm + 1e-6))
        v = MU * v + g
        ref.params[...] -= LR * v
    assert 0 < sum(clipped) < EPOCHS, clipped                  # both branches are exercised
    np.testing.assert_allclose(p, ref.params, rtol=1e-12, atol=1e-15)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["clipped_steps"] for r in records] == [int(c) for c in clipped]


def test_clipping_on_simulated_ranks_equals_one_rank(tmp_path):
    """The norm is the averaged gradient's, the same on every rank: N ranks clip what one rank clips."""
    base = dict(dataset="synthetic_classification", n_samples=300, hidden="16", batch_size=50, epochs=2,
                lr=0.1, momentum=0.9, dtype="float64", progress=False, val_fraction=0.1, test_fraction=0.1,
                clip_grad_norm=0.3)
    ref = final_params(Config(out=str(tmp_path / "one"), **base))
    sim = final_params(Config(out=str(tmp_path / "sim"), simulate_ranks=3, accumulate=2, overlap="on", **base))
    assert rel_diff(sim, ref) <= 1e-12
    clipped = [json.loads(line)["clipped_steps"] for line in open(tmp_path / "one" / "metrics.jsonl")]
    assert 0 < sum(clipped) < 2 * 6, clipped
    assert rel_diff(final_params(Config(out=str(tmp_path / "off"), **{**base, "clip_grad_norm": 0.0})), ref) > 1e-3


@pytest.mark.parametrize("extra", [dict(overlap="off"), dict(overlap="on", bucket_mb=0.0, accumulate=2)])
def test_noise_scale_is_mccandlishs_estimator_on_the_ranks_gradients(tmp_path, extra):
    """Issue 19: one step of 30 rows on 3 simulated ranks (10 each). The reference, in float64 here: each
    shard's mean gradient |G_b|^2 (b = 10) and the batch's |G_B|^2 (B = 30), combined as in appendix A.1."""
    from ddp.data import epoch_batches, shard
    from ddp.model import MLP
    cfg = cfg_for(tmp_path, dataset="synthetic_classification", n_samples=30, hidden="8", batch_size=30,
                  epochs=1, dtype="float64", val_fraction=0.0, test_fraction=0.0, simulate_ranks=3,
                  noise_scale=True, **extra)
    run(cfg)
    got = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["noise_scale"]
    train, _, _, _ = load_data(cfg)
    gb = epoch_batches(len(train), 30, seed=cfg.seed, epoch=0)[0]
    ref = MLP([train.X.shape[1], 8, int(train.y.max()) + 1], dtype="float64", seed=0)

    def sq(rows):
        ref.forward_backward(train.X[rows], train.y[rows])
        return float(ref.grads @ ref.grads)
    big, b, B = sq(gb), 10, 30
    smalls = [sq(shard(gb, r, 3)) for r in range(3)]
    g2 = sum((B * big - b * s) / (B - b) for s in smalls)
    trace = sum((s - big) / (1 / b - 1 / B) for s in smalls)
    assert got == pytest.approx(trace / g2, rel=1e-10)


@pytest.mark.parametrize("extra", [dict(), dict(overlap="off"), dict(accumulate=3, overlap="on"),
                                   dict(bucket_mb=0.0, overlap="on")])
def test_simulated_ranks_equal_one_rank(tmp_path, extra):
    """Global batch 50 over 4 ranks with a 300-sample set: uneven shards and a partial last batch."""
    base = dict(dataset="synthetic_classification", n_samples=300, hidden="16", batch_size=50, epochs=2,
                lr=0.1, momentum=0.9, dtype="float64", progress=False, val_fraction=0.1, test_fraction=0.1)
    ref = final_params(Config(out=str(tmp_path / "one"), **base))
    sim = final_params(Config(out=str(tmp_path / "sim"), simulate_ranks=4, **base, **extra))
    assert rel_diff(sim, ref) <= 1e-12


@pytest.mark.parametrize("extra", [{}, dict(mode="ps", servers=1), dict(mode="ps", servers=2)])
def test_simulated_ranks_write_one_process_records(tmp_path, extra):
    """Each epoch's record is reduced over the ranks: 4 simulated ranks (allreduce, or ps sync with 1 or 2 of
    them servers) write one process's train loss and validation figures, to 1e-12."""
    import json
    base = dict(dataset="synthetic_classification", n_samples=300, hidden="16", batch_size=50, epochs=3,
                lr=0.1, momentum=0.9, dtype="float64", progress=False, quiet=True, val_fraction=0.1,
                test_fraction=0.1)
    run(Config(out=str(tmp_path / "one"), **base))
    run(Config(out=str(tmp_path / "sim"), simulate_ranks=4, **base, **extra))

    def records(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    one, sim = records("one"), records("sim")
    assert len(one) == len(sim) == 3
    for a, b in zip(one, sim):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert abs(a[key] - b[key]) <= 1e-12 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_ranks_meet_after_every_step_in_library_use(tmp_path, monkeypatch):
    """Without the CLI's SIGTERM handler too, every rank joins a 1-number allreduce right after each step
    (it drains the links before the next step's gradients: see stop.stop_requested)."""
    from ddp.comm_simulated import SimulatedComm
    events = {0: [], 1: []}
    original = SimulatedComm.iallreduce_sum

    def logged(self, buf, compress=None):
        events[self.rank].append("meet" if buf.size == 1 else f"sum {buf.size}")
        return original(self, buf, compress)
    monkeypatch.setattr(SimulatedComm, "iallreduce_sum", logged)

    def on_step(step, model, comm):
        events[comm.rank].append(f"step {step}")
    cfg = cfg_for(tmp_path, dataset="digits", hidden="8", epochs=1, batch_size=400, simulate_ranks=2)
    run(cfg, on_step=on_step)
    for log in events.values():
        steps = [i for i, e in enumerate(log) if e.startswith("step")]
        assert len(steps) == 4                                  # 1437 training rows in batches of 400
        assert all(log[i + 1] == "meet" and log[i - 1].startswith("sum") for i in steps)


def test_grad_norms_are_logged_per_layer(tmp_path):
    cfg = cfg_for(tmp_path, dataset="digits", hidden="32,32,32,32", activation="sigmoid", epochs=1,
                  grad_norms=True, lr=0.1)
    run(cfg)
    rec = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    norms = rec["grad_norms"]
    assert len(norms) == 5 and all(n > 0 for n in norms)
    # sigmoid's derivative is at most 1/4: the first layer hears far less than the last
    assert norms[0] < norms[-1]


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    from ddp.errors import TrainingError
    cfg = cfg_for(tmp_path, dataset="diabetes", hidden="32", lr=1e6, epochs=3, scale="none")
    with pytest.raises(TrainingError, match="NaN or Inf"):
        run(cfg)


def test_outputs_only_from_rank_zero_in_simulation(tmp_path):
    cfg = cfg_for(tmp_path, dataset="digits", hidden="16", epochs=1, simulate_ranks=3)
    summary = run(cfg)
    assert summary["world_size"] == 3
    assert sorted(os.listdir(tmp_path / "run")) == ["best.npz", "checkpoint.npz", "config.toml", "metrics.jsonl",
                                                    "summary.json"]


def test_a_failing_simulated_rank_never_hangs(tmp_path):
    cfg = cfg_for(tmp_path, dataset="digits", hidden="16", epochs=5, simulate_ranks=3)

    def boom(step, model, comm):
        if comm.rank == 2 and step == 3:
            raise ValueError("rank 2 fails at step 3")
    with pytest.raises(ValueError, match="rank 2 fails at step 3"):
        run(cfg, on_step=boom)


def test_training_on_the_device_matches_numpy(tmp_path, device):
    """The same run on NumPy and on the device (CuPy when a GPU is usable): float64, equal to 1e-10."""
    base = dict(dataset="synthetic_classification", n_samples=200, hidden="16", batch_size=32, epochs=2,
                lr=0.1, momentum=0.9, dtype="float64", progress=False)
    ref = final_params(Config(out=str(tmp_path / "cpu"), device="cpu", **base))
    dev = final_params(Config(out=str(tmp_path / "dev"), device=device, **base))
    assert rel_diff(dev, ref) <= 1e-10
