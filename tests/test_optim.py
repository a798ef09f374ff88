"""Optimizers against hand-computed updates and, when installed, against torch.optim."""
import math

import numpy as np
import pytest

from ddp import UsageError
from ddp.optim import Schedule, make_optimizer


def test_sgd_momentum_by_hand():
    p, g = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    opt = make_optimizer("sgd", p, g, lr=0.1, momentum=0.9)
    opt.step()                      # v = g, p -= 0.1 g
    np.testing.assert_allclose(p, [0.95, -2.025])
    opt.step()                      # v = 0.9 g + g
    np.testing.assert_allclose(p, [0.95 - 0.1 * 1.9 * 0.5, -2.025 - 0.1 * 1.9 * 0.25])
    np.testing.assert_array_equal(g, [0.5, 0.25])      # the gradient buffer is left alone


def test_adam_first_step_is_lr_times_sign():
    p, g = np.array([1.0, -1.0, 3.0]), np.array([0.3, -4.0, 1e-3])
    make_optimizer("adam", p, g, lr=0.01).step()
    np.testing.assert_allclose(p, [0.99, -0.99, 2.99], rtol=1e-6)


CASES = [("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.01)), ("sgd", dict(momentum=0.5)),
         ("sgd", dict()), ("adam", dict(weight_decay=0.01)), ("adamw", dict(weight_decay=0.05))]


@pytest.mark.parametrize("name,kw", CASES)
def test_matches_torch_optim(name, kw):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal(40), np.zeros(40)
    tp = torch.tensor(p.copy(), requires_grad=True)
    tcls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    topt = tcls([tp], lr=0.01, **kw)
    opt = make_optimizer(name, p, g, lr=0.01, **kw)
    for _ in range(6):
        grad = rng.standard_normal(40)
        g[:] = grad
        opt.step()
        tp.grad = torch.tensor(grad)
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_state_roundtrip_continues_identically():
    rng = np.random.default_rng(1)
    p1, g1 = rng.standard_normal(10), np.zeros(10)
    p2, g2 = p1.copy(), np.zeros(10)
    a = make_optimizer("adam", p1, g1, lr=0.1)
    grads = rng.standard_normal((6, 10))
    for gr in grads[:3]:
        g1[:] = gr
        a.step()
    b = make_optimizer("adam", p2, g2, lr=0.1)
    p2[:] = p1
    b.load_state_dict(a.state_dict())
    for gr in grads[3:]:
        g1[:] = g2[:] = gr
        a.step()
        b.step()
    np.testing.assert_array_equal(p1, p2)


def test_schedules():
    assert Schedule("constant")(1000) == 1.0
    s = Schedule("step", step_size=10, gamma=0.5)
    assert [s(0), s(9), s(10), s(25)] == [1.0, 1.0, 0.5, 0.25]
    c = Schedule("cosine", total_steps=100)
    assert c(0) == 1.0 and c(50) == pytest.approx(0.5) and c(100) == pytest.approx(0.0, abs=1e-12)
    w = Schedule("cosine", total_steps=110, warmup=10)
    assert [w(0), w(4), w(9)] == [0.1, 0.5, 1.0] and w(10) == 1.0
    assert w(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_scheduled_lr_is_used():
    p, g = np.zeros(1), np.ones(1)
    opt = make_optimizer("sgd", p, g, lr=1.0, schedule=Schedule("step", step_size=1, gamma=0.5))
    for _ in range(3):
        opt.step()
    assert p[0] == -(1 + 0.5 + 0.25)


@pytest.mark.parametrize("name,kw,msg", [("sgd", dict(lr=-0.1), "learning rate"), ("sgd", dict(lr=0.1, momentum=1.5), "momentum"),
                                         ("rmsprop", dict(lr=0.1), "rmsprop"), ("adam", dict(lr=0.1, eps=0), "eps"),
                                         ("sgd", dict(lr=0.1, nesterov=True), "nesterov")])
def test_bad_settings(name, kw, msg):
    with pytest.raises(UsageError, match=msg):
        make_optimizer(name, np.zeros(3), np.zeros(3), **kw)
