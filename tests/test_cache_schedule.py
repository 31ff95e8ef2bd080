"""The budgeted cache schedule (velodiff.accel.cache_schedule): the dynamic program returns a schedule
with the requested number of full steps, step 0 full, and the least drift of every such schedule
(checked against all of them on small cases)."""

from __future__ import annotations

import itertools
import random

import pytest

from velodiff.accel.cache_schedule import budgeted_schedule, schedule_drift


def brute_force(changes, full):
    n = len(changes)
    best = None
    for rest in itertools.combinations(range(1, n), full - 1):
        s = [i == 0 or i in rest for i in range(n)]
        d = schedule_drift(changes, s)
        best = d if best is None or d < best else best
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_is_optimal(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    changes = [rng.random() ** 2 for _ in range(n)]
    for full in range(1, n + 1):
        s = budgeted_schedule(changes, full)
        assert len(s) == n and s[0] and sum(s) == full
        assert schedule_drift(changes, s) == pytest.approx(brute_force(changes, full), abs=1e-12)


def test_full_steps_go_where_features_change():
    changes = [0.0, 0.01, 0.01, 0.5, 0.6, 0.5, 0.01, 0.01, 0.01, 0.01]
    s = budgeted_schedule(changes, 4)
    assert s[0] and sum(s[3:6]) == 3  # the fast-changing stretch is computed, the flat ones reused
    assert (
        budgeted_schedule(changes, 10) == [True] * 10
        and budgeted_schedule(changes, 1) == [True] + [False] * 9
    )
    with pytest.raises(ValueError):
        budgeted_schedule([0.0, -1.0], 1)
