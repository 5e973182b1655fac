"""Tests for serving metrics, rejection counters and the process sampler."""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest

from edgefleet.agent.metrics import (
    MAX_REASONS,
    ProcessSampler,
    RejectionCounter,
    ServingMetrics,
    WindowStats,
)
from edgefleet.protocols.messages import LatencySummary


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_window_percentiles_counts_and_reset() -> None:
    clock = FakeClock()
    metrics = ServingMetrics(clock=clock)
    latencies_ms = list(range(1, 101))
    random.Random(1).shuffle(latencies_ms)
    for i, ms in enumerate(latencies_ms):
        metrics.record(ms / 1000.0, ok=i % 10 != 0)
    clock.now += 30.0

    stats = metrics.take_window()
    assert stats.requests == 100
    assert stats.errors == 10
    assert stats.p50_ms == pytest.approx(50.0)
    assert stats.p95_ms == pytest.approx(95.0)
    assert stats.p99_ms == pytest.approx(99.0)
    assert stats.window_s == pytest.approx(30.0)
    assert stats.latency == LatencySummary(p50=50.0, p95=95.0, p99=99.0)

    clock.now += 5.0
    empty = metrics.take_window()
    assert empty == WindowStats(0, 0, None, None, None, pytest.approx(5.0))  # type: ignore[arg-type]
    assert empty.latency is None
    assert metrics.total_requests == 100
    assert metrics.total_errors == 10


def test_single_sample_window() -> None:
    metrics = ServingMetrics()
    metrics.record(0.0125, ok=True)
    stats = metrics.take_window()
    assert (stats.p50_ms, stats.p95_ms, stats.p99_ms) == pytest.approx((12.5, 12.5, 12.5))


def test_reservoir_bounds_memory_but_counts_exactly() -> None:
    metrics = ServingMetrics(max_samples=50, rng=random.Random(7))
    for i in range(10_000):
        metrics.record(0.001 if i % 2 else 0.009, ok=True)
    assert len(metrics._samples) == 50
    stats = metrics.take_window()
    assert stats.requests == 10_000
    assert stats.p50_ms in (pytest.approx(1.0), pytest.approx(9.0))
    assert stats.p99_ms == pytest.approx(9.0)


def test_record_is_thread_safe() -> None:
    """Concurrent record() and take_window() lose and double-count nothing.

    Without the lock this fails every run: take_window() reads the counters,
    then calls the clock, then resets them, so any record() in between is
    counted in no window. The clock here sleeps, which hands the GIL to the
    recorders at exactly that point; a tiny switch interval adds interleavings
    inside record() itself. (A bare counter loop cannot show the race: on
    CPython ``self.n += 1`` is not interrupted between load and store.)
    """
    recorders, per_thread = 8, 2_000

    def slow_clock() -> float:
        time.sleep(0.0002)  # releases the GIL in the middle of take_window()
        return time.monotonic()

    metrics = ServingMetrics(max_samples=10 * recorders * per_thread, clock=slow_clock)
    start = threading.Barrier(recorders + 1)

    def record() -> None:
        start.wait()
        for i in range(per_thread):
            metrics.record(0.001, ok=i % 4 != 0)

    windows: list[WindowStats] = []
    threads = [threading.Thread(target=record) for _ in range(recorders)]
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        start.wait()
        while any(t.is_alive() for t in threads):
            windows.append(metrics.take_window())
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(previous)
    windows.append(metrics.take_window())

    total = recorders * per_thread
    assert len(windows) > 2, "the recorders finished before a window was taken"
    assert sum(w.requests for w in windows) == total
    assert sum(w.errors for w in windows) == total // 4
    assert metrics.total_requests == total
    assert metrics.total_errors == total // 4


def test_rejection_counter_is_cumulative_and_bounded() -> None:
    counter = RejectionCounter()
    counter.count("malformed_desired")
    counter.count("malformed_desired")
    counter.count("wrong_device")
    snap = counter.snapshot()
    assert snap == {"malformed_desired": 2, "wrong_device": 1}
    snap["wrong_device"] = 99
    assert counter.snapshot()["wrong_device"] == 1  # a copy

    for i in range(200):
        counter.count(f"reason-{i}")
    snap = counter.snapshot()
    assert len(snap) == MAX_REASONS
    assert snap["other"] == 200 - (MAX_REASONS - 3)
    assert snap["malformed_desired"] == 2


def test_rss_from_statm(tmp_path: Path) -> None:
    statm = tmp_path / "statm"
    statm.write_text("1000 25 10 1 0 50 0\n")
    assert ProcessSampler(statm_path=statm).rss_bytes() == 25 * os.sysconf("SC_PAGE_SIZE")


def test_rss_falls_back_to_getrusage(tmp_path: Path) -> None:
    rss = ProcessSampler(statm_path=tmp_path / "missing").rss_bytes()
    assert rss > 1024 * 1024  # a Python process with numpy is megabytes


def test_real_rss_is_plausible() -> None:
    rss = ProcessSampler().rss_bytes()
    assert 1024 * 1024 < rss < 64 * 1024**3


def test_cpu_percent_since_last_call() -> None:
    cpu = FakeClock()
    wall = FakeClock()
    sampler = ProcessSampler(process_time=cpu, clock=wall)
    cpu.now += 0.5
    wall.now += 2.0
    assert sampler.cpu_percent() == pytest.approx(25.0)
    cpu.now += 3.0
    wall.now += 2.0
    assert sampler.cpu_percent() == pytest.approx(150.0)  # several busy threads
    assert sampler.cpu_percent() == 0.0  # no wall time elapsed


def test_cpu_percent_measures_real_work() -> None:
    sampler = ProcessSampler()
    sum(i * i for i in range(300_000))
    assert sampler.cpu_percent() > 1.0


# --------------------------------------------------------------------------- per sample
def test_weighted_percentiles_nearest_rank_over_weights() -> None:
    from edgefleet.agent.metrics import weighted_percentiles
    from edgefleet.shared.latency import percentiles

    # All weights 1: exactly the unweighted nearest rank.
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert weighted_percentiles([(v, 1) for v in values], 50, 95) == percentiles(values, 50, 95)
    # One value carrying 98 of 100 weights is every percentile from 2% to 100%.
    obs = [(10.0, 1), (0.1, 98), (7.0, 1)]
    assert weighted_percentiles(obs, 50, 95, 99) == (0.1, 0.1, 7.0)
    assert weighted_percentiles([(1.0, 0)], 50) is None


def test_big_batches_lower_latency_per_sample_not_raise_it() -> None:
    m = ServingMetrics()
    for _ in range(19):
        m.record(0.001, ok=True)  # 19 single-row requests of 1 ms
    m.record(0.060, ok=True, batch=6000)  # one 6,000-row batch of 60 ms
    stats = m.take_window()
    assert (stats.requests, stats.samples) == (20, 6019)
    # Per request, the batch is the p99 and drags p95 up to 1 ms at least ...
    assert stats.p99_ms == pytest.approx(60.0)
    # ... per sample, 6,000 of 6,019 samples (99.7%) took 0.01 ms each.
    assert stats.sample_latency is not None
    assert stats.sample_latency.p50 == pytest.approx(0.01)
    assert stats.sample_latency.p95 == pytest.approx(0.01)
    assert stats.sample_latency.p99 == pytest.approx(0.01)


def test_empty_batches_count_requests_but_no_samples() -> None:
    m = ServingMetrics()
    m.record(0.002, ok=True, batch=0)
    stats = m.take_window()
    assert (stats.requests, stats.samples) == (1, 0)
    assert stats.p50_ms == pytest.approx(2.0)
    assert stats.sample_latency is None
    empty = m.take_window()
    assert (empty.samples, empty.sample_latency) == (0, None)


def test_reservoir_keeps_per_sample_figures_consistent() -> None:
    m = ServingMetrics(max_samples=50, rng=random.Random(7))
    for i in range(1000):
        m.record(0.004, ok=True, batch=4 if i % 2 else 1)
    stats = m.take_window()
    assert stats.samples == 500 * 4 + 500
    # Per-sample latency is 1 ms (4 ms / 4) for 4/5 of the samples, 4 ms for the rest.
    assert stats.sample_p50_ms == pytest.approx(1.0)
    assert stats.sample_p99_ms == pytest.approx(4.0)
