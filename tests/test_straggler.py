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
@pytest.mark.parametrize("slow", [True, False])
def test_a_slowed_rank_is_named_and_an_even_job_is_not(tmp_path, slow):
    """One trial of tests/straggler_trials.py (3 ranks; rank 1's compute made 20% slower, or not)."""
    from straggler_trials import judge, trial
    stragglers, code, _ = trial(str(tmp_path), slow)
    assert judge(stragglers, code, slow), (code, stragglers)
