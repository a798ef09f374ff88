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


# --------------------------------------------------------------------------- the ps model against a hand count

def busiest_link(n, S, M):
    """Bytes on the busiest link per step, each way, counted link by link: worker w sends each of the S
    servers its shard (M/S bytes), server s receives its shard from each of the n workers."""
    worker_link = [sum(M / S for _server in range(S)) for _worker in range(n)]
    server_link = [sum(M / S for _worker in range(n)) for _server in range(S)]
    return max(worker_link + server_link)          # ENVIRONMENT.md: max(M, n*M/S)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("S", [1, 2, 3, 4, 8])
def test_ps_model_against_a_link_by_link_count(n, S):
    link = busiest_link(n, S, M)
    assert scaling.ps_comm(n, S, M, ALPHA, BETA) == pytest.approx(2 * ALPHA + 2 * link * BETA)
    t_c, t_apply = 0.004, 0.0007
    assert scaling.ps_step(t_c, t_c, n, S, M, ALPHA, BETA, t_apply) == pytest.approx(
        t_c + 2 * ALPHA + 2 * link * BETA + t_apply)
    # workers finishing 1..5 ms apart: when the servers' links bind (n > S), the push ends when the link has
    # carried n*M/S from the first worker's finish on (the spread is shorter than the extra bytes take);
    # otherwise the last worker's own link (M) ends it
    first, last = 0.010, 0.010 + 0.001 * min(n, 5)
    if n > S and first + link * BETA >= last + M * BETA:
        push_end = first + link * BETA
    elif n <= S:
        push_end = last + M * BETA
    else:
        return
    assert scaling.ps_step(first, last, n, S, M, ALPHA, BETA, t_apply) == pytest.approx(
        push_end + t_apply + link * BETA + 2 * ALPHA)


def test_predictions_of_measured_cases_use_each_cases_workers_and_servers():
    """predict_cases on a made-up measurement: fitted alpha/beta exactly known, every worker computing t_c."""
    a_p, b_p, a_r, b_r = 30e-6, 8e-9, 20e-6, 12e-9
    sizes = (8, 1 << 18, 1 << 20, 1 << 22)
    sweep = {"pingpong": {m: a_p + (m * b_p if m >= 1 << 18 else 0) for m in sizes},
             "allreduce2": {m: 2 * a_r + (m * b_r if m >= 1 << 18 else 0) for m in sizes}}
    t_c, t_apply = 0.005, 0.0004
    cases = [{"name": "ps 4w 2s", "mode": "ps", "workers": 4, "servers": 2},
             {"name": "ps 2w 4s", "mode": "ps", "workers": 2, "servers": 4},
             {"name": "ps 3w 1s", "mode": "ps", "workers": 3, "servers": 1},
             {"name": "ring 4", "mode": "allreduce", "workers": 4, "servers": 0}]
    records = []
    for c in cases:
        for w in range(c["workers"]):
            records.append({"case": c["name"], "round": 0, "role": "worker", "t_opt": 0.0, "t_c": t_c,
                            "fb_steps": [t_c] * 5, "step": 0.05})
        for s in range(c["servers"]):
            records.append({"case": c["name"], "round": 0, "role": "server", "t_apply": t_apply})
    rows = scaling.predict_cases({"model_bytes": M, "sweeps": [sweep], "cases": cases, "records": records})
    got = {r["case"]: r["predicted"] for r in rows}
    for c in cases[:3]:
        want = t_c + 2 * a_p + 2 * busiest_link(c["workers"], c["servers"], M) * b_p + t_apply
        assert got[c["name"]] == pytest.approx(want), c
    assert got["ring 4"] == pytest.approx(t_c + 2 * 3 * a_r + 2 * 3 / 4 * M * b_r)


def test_predicted_table_ps_columns():
    """The projection table's ps columns: p workers with p/4 servers, then with p servers."""
    t_c, alpha, gbit = 0.02, 25e-6, 10
    beta = 8 / (gbit * 1e9)
    rows = scaling.predicted_rows(M, t_c, alpha, gbit)
    assert [int(r[1]) for r in rows] == list(scaling.RANKS)
    for r in rows:
        p = int(r[1])
        want = [f"{t_c / (t_c + 2 * alpha + 2 * busiest_link(p, S, M) * beta):.0%}" for S in (p // 4, p)]
        assert r[-2:] == want, (p, r)
