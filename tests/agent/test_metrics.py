"""Tests for serving metrics, rejection counters and the process sampler."""

from __future__ import annotations

import os
import random
import threading
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
    metrics = ServingMetrics()

    def worker() -> None:
        for _ in range(2000):
            metrics.record(0.001, ok=False)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = metrics.take_window()
    assert stats.requests == stats.errors == 16_000
    assert metrics.total_requests == 16_000


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
