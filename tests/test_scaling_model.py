"""The pure formulas of benchmarks/scaling.py's cost model, against values worked out by hand.
(The model's validation on emulated hosts is `python benchmarks/scaling.py --check`, outside pytest.)"""
import importlib.util
import os

import pytest

from helpers import ROOT

_spec = importlib.util.spec_from_file_location("scaling", os.path.join(ROOT, "benchmarks", "scaling.py"))
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)

ALPHA, BETA, M = 10e-6, 8e-9, 2_000_000     # 10 us, 1 Gbit/s, 2 MB: M * BETA = 16 ms


def test_mlp_params():
    assert scaling.mlp_params((784, 512, 512, 10)) == 669_706       # 785*512 + 513*512 + 513*10


def test_ring_allreduce():
    # p = 4: 2*3 messages of latency, 2*3/4 of the bytes: 60 us + 24 ms
    assert scaling.ring_comm(4, M, ALPHA, BETA) == pytest.approx(60e-6 + 0.024)
    assert scaling.ring_comm(2, M, ALPHA, BETA) == pytest.approx(20e-6 + 0.016)
    assert scaling.ring_comm(4, M, ALPHA, BETA, buckets=5) == pytest.approx(300e-6 + 0.024)
    assert scaling.ring_comm(1, M, ALPHA, BETA) == 0.0


def test_parameter_server_busiest_link():
    # n = 3 workers, S = 1: the server's link carries 3M each way: 2*alpha + 2*3*16 ms
    assert scaling.ps_comm(3, 1, M, ALPHA, BETA) == pytest.approx(20e-6 + 0.096)
    # S = 3 >= n: a worker's own link (M each way) is the busiest
    assert scaling.ps_comm(3, 3, M, ALPHA, BETA) == pytest.approx(20e-6 + 0.032)
    assert scaling.ps_comm(4, 2, M, ALPHA, BETA) == pytest.approx(20e-6 + 0.064)


def test_overlap_hides_at_most_the_backward_pass():
    # p = 2, 4 buckets: C = 4*2*10 us + 16 ms = 16.08 ms; last bucket 20 us + 4 ms.
    # t_c = 30 ms -> t_bwd = 20 ms > C - last = 12.06 ms: hides 12.06 ms.
    assert scaling.overlapped_step(0.030, 2, M, ALPHA, BETA, 4) == pytest.approx(0.030 + 0.01608 - 0.01206)
    # t_c = 3 ms -> t_bwd = 2 ms bounds what is hidden.
    assert scaling.overlapped_step(0.003, 2, M, ALPHA, BETA, 4) == pytest.approx(0.003 + 0.01608 - 0.002)
    # one bucket cannot overlap: it waits for the end of backward
    assert scaling.overlapped_step(0.030, 2, M, ALPHA, BETA, 1) == pytest.approx(0.030 + 0.01602)


def test_fit_recovers_alpha_and_beta():
    pts = [(2.0, m, 2 * 50e-6 + m * 3e-9) for m in (1e4, 1e5, 1e6, 4e6)]
    alpha, beta = scaling.fit_latency_bandwidth(pts)
    assert alpha == pytest.approx(50e-6) and beta == pytest.approx(3e-9)
    assert scaling.fit_line([1, 2, 4], [3, 5, 9]) == pytest.approx((1.0, 2.0))


def test_ps_step_with_stragglers():
    # equal compute: t_c + ps_comm + t_apply
    assert scaling.ps_step(0.01, 0.01, 3, 1, M, ALPHA, BETA, 0.001) == pytest.approx(
        0.01 + scaling.ps_comm(3, 1, M, ALPHA, BETA) + 0.001)
    # the server's link (3M = 48 ms) starts with the first worker at 10 ms; the last worker's own
    # link (16 ms) from 20 ms: the push ends at max(36, 58) = 58 ms, then the 48 ms pull
    assert scaling.ps_step(0.010, 0.020, 3, 1, M, ALPHA, BETA) == pytest.approx(0.058 + 0.048 + 2 * ALPHA)
    # S = n: the workers' links bind, so the last worker sets the pace: 20 + 16 + 16 ms
    assert scaling.ps_step(0.010, 0.020, 2, 2, M, ALPHA, BETA) == pytest.approx(0.052 + 2 * ALPHA)


def test_network_fits_take_alpha_from_small_and_beta_from_large_messages():
    # A burst lets mid-sized messages through at wire speed; from 256 KiB on, times follow the shaped rate,
    # less the burst's head start (a constant): the slope is beta, and no line through the origin gives it.
    head_start = 100e-6
    pp = {8: 30e-6, 1024: 31e-6, 65536: 60e-6, 1 << 18: 30e-6 + (1 << 18) * 8e-9 - head_start,
          1 << 20: 30e-6 + (1 << 20) * 8e-9 - head_start, 1 << 22: 30e-6 + (1 << 22) * 8e-9 - head_start}
    ar = {m: 2 * 20e-6 + m * 12e-9 for m in pp}
    fits = scaling.network_fits({"pingpong": pp, "allreduce2": ar})
    assert fits["p2p"] == pytest.approx((30e-6, 8e-9))
    assert fits["ring"] == pytest.approx((20e-6, 12e-9), rel=0.01)
