"""The device path, test by test against NumPy: every body runs once on NumPy and once on the
device (CuPy on a GPU; otherwise, or under `pytest --emulated-gpu`, the strict emulated device).

The NumPy path is the reference (it is checked against central differences and PyTorch in
test_nn.py and test_optim.py); float64 results must agree to rounding.

    pytest -m gpu                       # the gpu half (on the emulated device without a GPU)
"""
import os
import sys

import numpy as np
import pytest

from conftest import need_gpu
from helpers import ROOT, rel_diff
from ddp import backend
from ddp.comm import SerialComm
from ddp.config import Config
from ddp.model import MLP
from ddp.nn import ACTIVATIONS, dense_forward
from ddp.losses import LOSSES
from ddp.optim import make_optimizer
from ddp.checkpoint import CHECKPOINT, load_checkpoint
from ddp.evaluate import evaluate
from ddp.setup import build
from ddp.train import run

ACTS = sorted(ACTIVATIONS)


@pytest.fixture(params=[pytest.param("gpu", id="cupy", marks=pytest.mark.gpu)])
def gpu(request):
    """The device alone, for tests that count what NumPy does not have (transfers, devices)."""
    need_gpu()
    return request.param


def problem(loss, B=9, n_in=5, n_out=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((B, n_in))
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, n_out, B)
    elif loss == "binary_cross_entropy":
        y = rng.integers(0, 2, B).astype(np.float64)
    else:
        y = rng.standard_normal((B, n_out))
    return X, y


def pair(device, sizes, **kw):
    """The same model on NumPy (the reference) and on `device`."""
    kw.setdefault("dtype", "float64")
    return MLP(sizes, device="cpu", **kw), MLP(sizes, device=device, **kw)


def on(model, a):
    return model.xp.asarray(a)


@pytest.mark.parametrize("act", ACTS)
def test_forward(device, act):
    ref, m = pair(device, [5, 9, 7, 3], activation=act)
    X, _ = problem("mse")
    Z = m.forward(on(m, X))
    assert backend.get_array_module(Z) is m.xp
    assert rel_diff(backend.to_numpy(Z), ref.forward(X)) <= 1e-13


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("act", ACTS)
def test_backward_and_loss(device, act, loss):
    n_out = 1 if loss == "binary_cross_entropy" else 3
    ref, m = pair(device, [5, 8, n_out], activation=act, loss=loss)
    X, y = problem(loss, n_out=n_out)
    want = ref.forward_backward(X, y)
    got = m.forward_backward(on(m, X), on(m, y))
    # the loss stays on the device: making it a float is the trainer's one sync per step
    assert backend.get_array_module(got) is m.xp and got.ndim == 0
    assert abs(float(got) - float(want)) <= 1e-13 * max(1.0, abs(float(want)))
    assert rel_diff(backend.to_numpy(m.grads), ref.grads) <= 1e-12


OPTIMIZERS = {
    "sgd-momentum": dict(name="sgd", momentum=0.9),
    "sgd-nesterov": dict(name="sgd", momentum=0.9, nesterov=True),
    "sgd-weight-decay": dict(name="sgd", momentum=0.5, weight_decay=0.01),
    "adam": dict(name="adam"),
    "adam-weight-decay": dict(name="adam", weight_decay=0.01),
    "adamw": dict(name="adamw", weight_decay=0.05),
}


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_optimizer(device, kind):
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(50)
    grads = rng.standard_normal((6, 50))
    out = {}
    for dev in ("cpu", device):
        xp = backend.get_xp(dev)
        p, g = xp.asarray(p0.copy()), xp.zeros(50)     # (NumPy asarray would update p0 itself)
        opt = make_optimizer(lr=0.01, params=p, grads=g, **OPTIMIZERS[kind])
        for step_grads in grads:
            g[...] = xp.asarray(step_grads)
            opt.step()
        out[dev] = backend.to_numpy(p), opt.state_dict()
    (ref, ref_state), (got, got_state) = out["cpu"], out[device]
    assert rel_diff(got, ref) <= 1e-13
    assert ref_state.keys() == got_state.keys()
    assert all(rel_diff(got_state[k], ref_state[k]) <= 1e-13 for k in ref_state if k != "t")


BASE = dict(dataset="synthetic_classification", n_samples=240, hidden="16,8", batch_size=24, lr=0.1,
            momentum=0.9, dtype="float64", progress=False, val_fraction=0.1, test_fraction=0.1, epochs=2)


def final_params(cfg, comm=None):
    got = {}

    def grab(step, model, comm):
        got["p"] = backend.to_numpy(model.params).copy()
    summary = run(cfg, comm, on_step=grab)
    return got["p"], summary


def test_training_run(device, tmp_path):
    ref, ref_sum = final_params(Config(out=str(tmp_path / "cpu"), device="cpu", **BASE))
    got, got_sum = final_params(Config(out=str(tmp_path / "dev"), device=device, **BASE))
    assert rel_diff(got, ref) <= 1e-12
    assert got_sum["test_accuracy"] == ref_sum["test_accuracy"]
    assert abs(got_sum["val_loss"] - ref_sum["val_loss"]) <= 1e-12


@pytest.mark.parametrize("kw", [dict(overlap="on", bucket_mb=0.0005), dict(overlap="off", accumulate=2),
                                dict(overlap="on", compress="fp16"),
                                dict(shard_optimizer=True, optimizer="adamw")],
                         ids=["overlap", "accumulate", "fp16", "shard-optimizer"])
def test_data_parallel_over_two_simulated_ranks(device, tmp_path, kw):
    """Two simulated ranks on the device compute what one NumPy process computes (fp16: what
    two simulated NumPy ranks compute, the rounding to float16 being the same)."""
    ref_kw = dict(kw, simulate_ranks=2) if "compress" in kw else {k: v for k, v in kw.items() if k == "optimizer"}
    ref, _ = final_params(Config(out=str(tmp_path / "cpu"), device="cpu", **BASE, **ref_kw))
    got, _ = final_params(Config(out=str(tmp_path / "dev"), device=device, simulate_ranks=2, **BASE, **kw))
    assert rel_diff(got, ref) <= (1e-12 if "compress" not in kw else 1e-6)


def test_deterministic_on_the_device_is_bitwise_for_any_world_size(device, tmp_path):
    """--deterministic in float32 on the device: 1 and 3 simulated ranks end in the same bits (GPU kernels
    other than the BLAS's may differ from NumPy's, so the reference is the device itself)."""
    kw = {**BASE, "dtype": "float32", "deterministic": True, "device": device}
    one, _ = final_params(Config(out=str(tmp_path / "one"), **kw))
    three, _ = final_params(Config(out=str(tmp_path / "three"), simulate_ranks=3, **kw))
    assert one.dtype == np.float32 and one.tobytes() == three.tobytes()


def test_simulated_ranks_on_two_devices(gpu, emulated, monkeypatch, tmp_path):
    """Simulated rank r takes device r: every sum must be done on one device, from explicit copies."""
    if emulated is not None:
        monkeypatch.setattr(emulated, "DEVICE_COUNT", 2)
    elif backend.gpu_count() < 2:
        pytest.skip("needs 2 GPUs (the emulated device has as many as a test asks for)")
    devices = {}

    def where(step, model, comm):
        devices[comm.rank] = model.params.device.id
    cfg = Config(out=str(tmp_path / "dev"), device="gpu", simulate_ranks=2, overlap="on", bucket_mb=0.0005, **BASE)
    run(cfg, on_step=where)
    ref, _ = final_params(Config(out=str(tmp_path / "cpu"), device="cpu", **BASE))
    got, _ = final_params(Config(out=str(tmp_path / "dev2"), device="gpu", simulate_ranks=2, **BASE))
    assert devices == {0: 0, 1: 1}
    assert rel_diff(got, ref) <= 1e-12


def test_checkpoint_save_and_resume(device, tmp_path):
    """Stop after 7 steps on the device, resume on the device: the NumPy run of 16 steps, and a
    checkpoint that NumPy reads without pickle."""
    kw = dict(BASE, epochs=3)
    ref, _ = final_params(Config(out=str(tmp_path / "ref"), device="cpu", max_steps=16, **kw))
    out = str(tmp_path / "dev")
    run(Config(out=out, device=device, max_steps=7, **kw))
    ckpt = load_checkpoint(os.path.join(out, CHECKPOINT))
    layers = [k for k in ckpt if k.startswith("layers.")]
    assert int(ckpt["step"]) == 7 and layers and all(type(ckpt[k]) is np.ndarray for k in layers)
    got, _ = final_params(Config(out=out, device=device, max_steps=16,
                                 resume=os.path.join(out, CHECKPOINT), **kw))
    assert rel_diff(got, ref) <= 1e-12


@pytest.mark.parametrize("dataset", ["synthetic_classification", "synthetic_regression"])
def test_evaluate(device, dataset):
    kw = dict(BASE, dataset=dataset)
    out = {}
    for dev in ("cpu", device):
        s = build(Config(device=dev, **kw).validate())
        out[dev] = evaluate(s.model, s.test, SerialComm(), chunk=10)
    assert out["cpu"].keys() == out[device].keys() and len(out["cpu"]) == 2
    assert all(abs(out[device][k] - out["cpu"][k]) <= 1e-12 for k in out["cpu"])


def test_load_predict_and_evaluate(device, tmp_path):
    """ddp.load(..., device=) of a trained run: predict, predict_proba and evaluate equal NumPy's."""
    import ddp
    out = str(tmp_path / "run")
    run(Config(out=out, device="cpu", **BASE))
    X = np.random.default_rng(5).standard_normal((50, 20))
    ref, got = ddp.load(out, device="cpu"), ddp.load(out, device=device)
    assert backend.get_array_module(got.mlp.params) is got.mlp.xp
    y = ref.predict(X)
    assert np.array_equal(got.predict(X), y)
    assert rel_diff(got.predict_proba(X), ref.predict_proba(X)) <= 1e-12
    want, have = ref.evaluate(X, y[::-1]), got.evaluate(X, y[::-1])
    assert want.keys() == have.keys() and all(abs(have[k] - want[k]) <= 1e-12 for k in want)


def leaky_dense_forward(X, W, b):
    """A copy of nn.dense_forward with a deliberate implicit host conversion of the bias."""
    xp = backend.get_array_module(X)
    Z = xp.matmul(X, W.T)
    Z += np.asarray(b)               # the bug: fine on NumPy, a TypeError on a GPU
    return Z


def test_implicit_host_conversion_is_caught(device):
    m = MLP([5, 4], dtype="float64", device=device)
    X = on(m, problem("mse")[0])
    L = m.layers[0]
    if device == "cpu":
        assert rel_diff(leaky_dense_forward(X, L.W, L.b), dense_forward(X, L.W, L.b)) == 0
    else:
        with pytest.raises(TypeError, match="[Ii]mplicit conversion"):
            leaky_dense_forward(X, L.W, L.b)


# ------------------------------------------------------------------ host synchronizations

def test_one_host_sync_per_training_step(gpu, emulated, tmp_path):
    """Each step waits for the GPU once: the loss and the NaN check come back in one transfer.
    The emulated device also sees implicit syncs (float() of an array), so there it must count
    exactly what went through ddp.backend."""
    counts = []

    def snap(step, model, comm):
        counts.append((dict(backend.stats), emulated.counter.snapshot() if emulated else None))
    run(Config(out=str(tmp_path / "run"), device="gpu", dataset="synthetic_classification", n_samples=400,
               hidden="16", batch_size=16, epochs=1, progress=False), on_step=snap)
    per_step = [{k: b[k] - a[k] for k in a} for (a, _), (b, _) in zip(counts, counts[1:])]
    print("per step (ddp.backend):", per_step[:3])
    assert len(per_step) >= 15
    assert all(s["syncs"] <= 1 and s["d2h"] == 1 for s in per_step)
    if emulated:
        seen = [{k: b[k] - a[k] for k in ("d2h", "syncs")} for (_, a), (_, b) in zip(counts, counts[1:])]
        print("per step (emulated device):", seen[:3])
        assert seen == per_step


def test_bench_step_reports_transfers_and_syncs(gpu, capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_step
    assert bench_step.main(["--device", "gpu", "--iters", "4", "--rounds", "2", "--no-torch"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "per training step: 1 device-to-host transfer(s), 1 host synchronization(s)" in out
