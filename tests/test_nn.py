"""The math: central differences, batch semantics, and PyTorch as an independent reference."""
import numpy as np
import pytest

from ddp import MLP, backend
from ddp.gradcheck import gradcheck, random_problem
from ddp.losses import binary_cross_entropy, mse, softmax_cross_entropy
from ddp.nn import ACTIVATIONS

LOSSES = [("softmax_cross_entropy", 4), ("binary_cross_entropy", 1), ("mse", 3)]
SHAPES = [[5, 7, 4], [3, 6, 5, 2], [4, 3]]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("loss,n_out", LOSSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("batch", [1, 6])
def test_gradcheck_every_activation_and_loss(activation, loss, n_out, shape, batch):
    model = MLP([*shape[:-1], n_out], activation=activation, loss=loss, dtype="float64", seed=batch)
    X, y = random_problem(model, batch, seed=len(shape))
    errs = gradcheck(model, X, y)
    assert len(errs) == len(model.layers)
    assert max(errs) <= 1e-7, errs


def test_gradcheck_detects_a_wrong_backward(monkeypatch):
    """The checker itself must be able to fail: break the tanh derivative."""
    import ddp.nn as nn
    monkeypatch.setitem(nn.ACTIVATIONS, "tanh", (nn.tanh_forward, lambda dA, Z, A, out=None: dA * (1 - A)))
    model = MLP([4, 5, 3], activation="tanh", dtype="float64")
    X, y = random_problem(model, 3)
    assert max(gradcheck(model, X, y)) > 1e-3


@pytest.mark.parametrize("loss,n_out", LOSSES)
def test_batch_gradient_is_mean_of_per_sample_gradients(loss, n_out):
    model = MLP([6, 9, n_out], activation="sigmoid", loss=loss, dtype="float64")
    X, y = random_problem(model, 7)
    batch_loss = model.forward_backward(X, y)
    batch_grad = model.grads.copy()
    per_loss, per_grad = [], []
    for i in range(len(X)):       # the reference is allowed a per-sample loop
        per_loss.append(model.forward_backward(X[i:i + 1], y[i:i + 1]))
        per_grad.append(model.grads.copy())
    np.testing.assert_allclose(batch_loss, np.mean(per_loss), rtol=1e-12)
    np.testing.assert_allclose(batch_grad, np.mean(per_grad, axis=0), rtol=1e-10, atol=1e-14)


def test_denom_turns_a_shard_into_its_share_of_the_global_mean():
    model = MLP([4, 6, 3], activation="relu", dtype="float64")
    X, y = random_problem(model, 10)
    full = model.forward_backward(X, y)
    g_full = model.grads.copy()
    parts = [(X[:3], y[:3]), (X[3:4], y[3:4]), (X[4:], y[4:]), (X[:0], y[:0])]   # uneven, one empty
    total, g = 0.0, np.zeros_like(g_full)
    for Xs, ys in parts:
        total += model.forward_backward(Xs, ys, denom=10)
        g += model.grads
    assert abs(total - full) < 1e-13
    np.testing.assert_allclose(g, g_full, rtol=1e-12, atol=1e-15)


def test_accumulate_adds_micro_batch_gradients():
    model = MLP([4, 6, 3], activation="tanh", dtype="float64")
    X, y = random_problem(model, 8)
    model.forward_backward(X, y, denom=8)
    ref = model.grads.copy()
    model.forward_backward(X[:5], y[:5], denom=8)
    model.forward_backward(X[5:], y[5:], denom=8, accumulate=True)
    np.testing.assert_allclose(model.grads, ref, rtol=1e-12, atol=1e-15)


def test_flat_arena_layout_and_views():
    model = MLP([3, 4, 2], dtype="float64")
    assert model.params.ndim == 1 and model.grads.shape == model.params.shape
    assert model.num_params == 3 * 4 + 4 + 4 * 2 + 2
    L0, L1 = model.layers
    assert (L0.start, L0.stop, L1.start, L1.stop) == (0, 16, 16, 26)
    assert np.shares_memory(L0.W, model.params) and np.shares_memory(L1.db, model.grads)
    model.params[:] = np.arange(26)
    np.testing.assert_array_equal(L0.b, [12, 13, 14, 15])
    np.testing.assert_array_equal(L1.W.ravel(), np.arange(16, 24))


def test_losses_are_stable_for_huge_logits():
    Z = np.array([[1000.0, -1000.0, 0.0], [-800.0, 800.0, 5.0]])
    loss, dZ = softmax_cross_entropy(Z, np.array([1, 1]))
    assert np.isfinite(loss) and np.isfinite(dZ).all()
    assert loss == pytest.approx(2000 / 2, rel=1e-12)       # sample 0 pays 2000, sample 1 ~0
    loss, dZ = binary_cross_entropy(np.array([[1000.0], [-1000.0]]), np.array([0, 0]))
    assert loss == pytest.approx(500.0) and np.isfinite(dZ).all()
    loss, _ = mse(np.ones((2, 3)), np.zeros((2, 3)))
    assert loss == pytest.approx(1.0)                       # the mean over ALL elements


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("loss,n_out", LOSSES)
def test_matches_pytorch(activation, loss, n_out):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    model = MLP([5, 8, 6, n_out], activation=activation, loss=loss, dtype="float64", seed=3)
    X, y = random_problem(model, 9)
    ours = model.forward_backward(X, y)
    Ws = [torch.tensor(L.W.copy(), requires_grad=True) for L in model.layers]
    bs = [torch.tensor(L.b.copy(), requires_grad=True) for L in model.layers]
    act = {"relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.01), "sigmoid": torch.sigmoid,
           "tanh": torch.tanh, "identity": lambda z: z}[activation]
    h = torch.tensor(X)
    for i, (W, b) in enumerate(zip(Ws, bs)):
        h = h @ W.T + b
        if i < len(Ws) - 1:
            h = act(h)
    if loss == "softmax_cross_entropy":
        ref = F.cross_entropy(h, torch.tensor(y))
    elif loss == "binary_cross_entropy":
        ref = F.binary_cross_entropy_with_logits(h[:, 0], torch.tensor(y))
    else:
        ref = F.mse_loss(h, torch.tensor(y))
    ref.backward()
    assert ours == pytest.approx(ref.item(), rel=1e-12)
    for L, W, b in zip(model.layers, Ws, bs):
        np.testing.assert_allclose(L.dW, W.grad.numpy(), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(L.db, b.grad.numpy(), rtol=1e-10, atol=1e-13)


def test_same_results_on_numpy_and_the_device(device):
    """One body for both backends: the GPU run must match the NumPy run."""
    ref = MLP([6, 16, 4], activation="tanh", dtype="float64", device="cpu")
    model = MLP([6, 16, 4], activation="tanh", dtype="float64", device=device)
    X, y = random_problem(ref, 12)
    l_ref = ref.forward_backward(X, y)
    xp = model.xp
    loss = model.forward_backward(xp.asarray(X), xp.asarray(y))
    assert loss == pytest.approx(l_ref, rel=1e-12)
    np.testing.assert_allclose(backend.to_numpy(model.grads), ref.grads, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(backend.to_numpy(model.forward(xp.asarray(X))), ref.forward(X), rtol=1e-12)


def test_model_rejects_bad_arguments():
    from ddp import UsageError
    for kwargs, msg in [(dict(sizes=[4]), "at least two"), (dict(sizes=[4, 0, 2]), "positive"),
                        (dict(sizes=[4, 2], activation="swish"), "swish"),
                        (dict(sizes=[4, 2], loss="hinge"), "hinge"),
                        (dict(sizes=[4, 2], init="zeros"), "zeros"),
                        (dict(sizes=[4, 2], dtype="float16"), "float16"),
                        (dict(sizes=[4, 2], loss="binary_cross_entropy"), "1 output")]:
        with pytest.raises(UsageError, match=msg):
            MLP(**kwargs)
    with pytest.raises(UsageError, match="expects 4 features"):
        MLP([4, 2]).forward(np.zeros((3, 5)))


def test_labels_out_of_range_are_rejected():
    from ddp import UsageError
    model = MLP([4, 3])
    with pytest.raises(UsageError, match="label 3 is out of range for a model with 3 classes"):
        model.forward_backward(np.zeros((2, 4)), np.array([0, 3]))
