"""Issue 19: a rank that holds the others up is named in the epoch line, with its phase; an even job is not."""
import numpy as np
import pytest

from ddp.straggler import PHASES, PhaseClock, find


def table(rows):
    return np.array(rows, dtype=float)


def test_the_rule():
    even = table([[0.1, 2.0, 0.1, 0.50], [0.1, 2.05, 0.1, 0.45], [0.1, 1.95, 0.1, 0.55]])
    assert find(even) is None
    slow = table([[0.1, 2.0, 0.1, 0.9], [0.1, 2.5, 0.1, 0.2], [0.1, 2.05, 0.1, 0.85]])
    assert find(slow) == {"rank": 1, "phase": "compute", "slower_by": pytest.approx(2.7 / 2.225 - 1, abs=1e-4)}
    data = table([[0.1, 2.0, 0.1, 0.9], [0.1, 2.0, 0.1, 0.9], [0.9, 2.0, 0.1, 0.1]])
    assert find(data)["rank"] == 2 and find(data)["phase"] == "data"
    # busier, but nobody waits for it (it waits as long as the others): not a straggler
    assert find(table([[0.1, 2.0, 0.1, 0.5], [0.1, 2.6, 0.1, 0.5]])) is None
    # 20% of a short epoch is timer noise and warm-up
    assert find(table([[0.01, 0.1, 0.01, 0.2], [0.01, 0.13, 0.01, 0.1]])) is None
    assert find(table([[0.1, 2.0, 0.1, 0.5]])) is None


def test_the_clock_books_a_collective_inside_compute_as_waiting():
    clock = PhaseClock()
    clock.t -= 1.0                                # one second ago
    clock.lap("compute", 0.25)
    row = clock.row(1, 2).reshape(2, len(PHASES))
    assert row[0].tolist() == [0, 0, 0, 0]
    assert row[1][PHASES.index("compute")] == pytest.approx(0.75, abs=0.01)
    assert row[1][PHASES.index("wait")] == 0.25
    assert clock.s.tolist() == [0, 0, 0, 0]      # and starts the next epoch from zero


@pytest.mark.mpi
def test_a_rank_twice_as_slow_is_named_and_an_even_job_is_not_named_as_one():
    """Two trials of tests/straggler_trials.py (2 ranks, one per core). Rank 1's compute made 2x slower is named,
    with its phase, in every epoch after the first. The even job is judged loosely: this machine's 2 virtual cores
    differ by up to 13% at times (measured with pinned GEMMs), so a 10% straggler may be real there; the trial
    script measures the false-alarm rate at 20% (benchmarks/RESULTS.md)."""
    import tempfile
    from straggler_trials import PHASES_IN_RECORD, judge, trial
    with tempfile.TemporaryDirectory() as tmp:
        records, code, _ = trial(tmp + "/slow", True, extra=1.0)
        assert judge(records, code, True), (code, [r.get("straggler") for r in records])
        assert all(r["straggler"]["slower_by"] > 0.5 for r in records)
        records, code, _ = trial(tmp + "/even", False)
    assert code == 0 and records
    for r in records:
        assert len(r["phase_s"]) == 2 and all(len(row) == PHASES_IN_RECORD for row in r["phase_s"])
        assert r["straggler"] is None or r["straggler"]["slower_by"] < 0.5, r["straggler"]
