"""Issue 19: PowerSGD (--compress powersgd:R) against a float64 NumPy reference of Algorithm 1 written here,
and N ranks against one process."""
import contextlib

import numpy as np
import pytest
from helpers import rel_diff
from test_train import final_params

from ddp.comm_simulated import run_simulated
from ddp.config import Config
from ddp.model import MLP
from ddp.parallel import DataParallel
from ddp.powersgd import PowerSGD

SIZES, R, RANKS = [6, 7, 2], 2, 3


def reference(shares, q0, steps):
    """Vogels et al., Algorithm 1, for ONE weight matrix over the ranks' shares (sums, not means), written out."""
    errs, q, out = [np.zeros_like(shares[0][0]) for _ in shares], q0.copy(), []
    for t in range(steps):
        Ms = [g[t] + e for g, e in zip(shares, errs)]
        P = sum(M @ q for M in Ms)
        for i in range(P.shape[1]):                  # Gram-Schmidt
            P[:, i] -= P[:, :i] @ (P[:, :i].T @ P[:, i])
            P[:, i] /= np.linalg.norm(P[:, i]) + 1e-8
        Qs = [M.T @ P for M in Ms]
        errs = [M - P @ Qr.T for M, Qr in zip(Ms, Qs)]
        q = sum(Qs)
        out.append(P @ q.T)
    return out


def test_two_steps_equal_algorithm_1_with_error_feedback_and_warm_start():
    model = MLP(SIZES, dtype="float64", seed=0)
    rng = np.random.default_rng(1)
    grads = rng.standard_normal((RANKS, 2, model.num_params))        # each rank's share, two steps

    def rank(comm):
        m = MLP(SIZES, dtype="float64", seed=0)
        ps = PowerSGD(m, comm, R, seed=3)
        got = []
        for t in range(2):
            m.grads[...] = grads[comm.rank, t]
            ps.reduce(m.grads, lambda *a, **k: contextlib.nullcontext())
            got.append(m.grads.copy())
        return got, [(o, n, mm) for o, n, mm in ps.mats], ps.plain
    results = run_simulated(RANKS, rank)
    got, mats, plain = results[0]
    assert [(n, m) for _, n, m in mats] == [(7, 6)]     # 2x7 is not: rank 2 factors hold 18 > 14 elements
    q0 = np.random.default_rng(3).standard_normal((6, R))
    for o, n, m in mats:
        shares = [[grads[r, t, o:o + n * m].reshape(n, m) for t in range(2)] for r in range(RANKS)]
        want = reference(shares, q0, 2)
        for t in range(2):
            np.testing.assert_allclose(got[t][o:o + n * m].reshape(n, m), want[t], rtol=1e-12, atol=1e-12)
    for t in range(2):                                  # everything else is summed as it is
        np.testing.assert_allclose(got[t][plain], grads[:, t, plain].sum(0), rtol=1e-12)
    assert all(np.array_equal(r[0][1], got[1]) for r in results)    # every rank holds the same gradient


@pytest.mark.parametrize("extra", [dict(), dict(accumulate=2)])
def test_simulated_ranks_with_powersgd_equal_one_process_over_the_first_steps(tmp_path, extra):
    """Linear in the ranks' shares, so 3 ranks compress what one process compresses, error feedback and warm
    start included. Only over the first steps, though: the warm start turns P's columns nearly parallel (power
    iteration), and normalizing them magnifies the rounding of a sum taken in another order about 10x per step
    on this problem (3e-14 after 8 steps, 1e-3 after 20), so two long runs end equally good, not equal."""
    base = dict(dataset="synthetic_classification", n_samples=330, hidden="16", batch_size=24, max_steps=8,
                lr=0.1, momentum=0.9, dtype="float64", progress=False, val_fraction=0.1, test_fraction=0.1,
                compress="powersgd:2")
    ref = final_params(Config(out=str(tmp_path / "one"), **base))
    sim = final_params(Config(out=str(tmp_path / "sim"), simulate_ranks=3, **base, **extra))
    assert rel_diff(sim, ref) <= 1e-12
    plain = final_params(Config(out=str(tmp_path / "plain"), **{**base, "compress": "none"}))
    assert rel_diff(plain, ref) > 1e-3                      # it did compress


def test_bytes_per_step_are_the_factors_and_the_rest():
    m = MLP([784, 800, 10], dtype="float32", seed=0)
    dp = DataParallel(m, __import__("ddp.comm", fromlist=["SerialComm"]).SerialComm(), compress="powersgd:2")
    # W0 (800, 784) as rank-2 factors; W1 (10, 800) too (2 * 810 < 8,000); the biases (810) as they are
    want = (2 * (800 + 784) + 2 * (10 + 800) + 810) * 4
    assert dp.bytes_per_step == want and dp.overlap is False
    assert m.grads.nbytes / want > 60


def test_a_bad_compress_spec_is_one_line():
    from helpers import run_cli
    for spec, word in (("powersgd:0", "powersgd:R"), ("powersgd", "powersgd:R"), ("gzip", "unknown compress")):
        res = run_cli("train", "--compress", spec, "--epochs", "1")
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and word in res.stderr, res.stderr
    res = run_cli("train", "--compress", "powersgd:2", "--mode", "ps")
    assert res.returncode == 2 and "--compress powersgd needs --mode allreduce" in res.stderr
