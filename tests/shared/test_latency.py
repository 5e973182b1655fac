"""The one percentile definition: nearest rank."""

from __future__ import annotations

import pytest

from edgefleet.shared.latency import percentiles


def test_nearest_rank_returns_observed_samples() -> None:
    samples = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert percentiles(samples, 50, 95, 99, 100) == (50.0, 95.0, 99.0, 100.0)


def test_small_windows_round_the_rank_up() -> None:
    # ceil(0.95 * 3) = 3: with three samples p95 is the largest, never an interpolation.
    assert percentiles([10, 30, 20], 50, 95) == (20.0, 30.0)
    assert percentiles([7.5], 1, 50, 100) == (7.5, 7.5, 7.5)


def test_does_not_reorder_the_callers_list() -> None:
    samples = [3.0, 1.0, 2.0]
    percentiles(samples, 50)
    assert samples == [3.0, 1.0, 2.0]


@pytest.mark.parametrize("pct", [0, -5, 100.5])
def test_refuses_percentiles_outside_the_range(pct: float) -> None:
    with pytest.raises(ValueError, match="percentile must be in"):
        percentiles([1.0], pct)


def test_refuses_no_samples() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentiles([], 50)
