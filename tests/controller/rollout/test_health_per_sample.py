"""Health judged per sample under comparable load (issue 9, item 8): the pure rules."""

from __future__ import annotations

from dataclasses import replace

from edgefleet.controller.rollout.engine import (
    DeviceState,
    DeviceView,
    Health,
    LoadBaseline,
    RolloutConfig,
    WindowHealth,
    comparable,
    judge_health,
    judge_latency,
)

CFG = RolloutConfig(max_p95_ratio=1.5, p95_slack_ms=0.5)
# The previous version: singles at 10 requests/s, 0.2 ms per sample at p95.
BASE = LoadBaseline(sample_p95_ms=0.2, batch=1.0, rate_rps=10.0)
# Limit: 0.2 x 1.5 + 0.5 = 0.8 ms per sample.


def window(
    requests: int, samples: int, sample_p95_ms: float, window_s: float = 1.0
) -> WindowHealth:
    return WindowHealth(requests, window_s, samples, sample_p95_ms)


def observed(*windows: WindowHealth, p95_ms: float = 50.0, errors: int = 0) -> DeviceView:
    requests = sum(w.requests for w in windows)
    return DeviceView(
        "d",
        DeviceState.OBSERVING,
        baseline_p95_ms=0.3,
        baseline_load=BASE,
        health=Health(len(windows), requests, errors, p95_ms, tuple(windows)),
    )


def test_big_batches_with_slow_requests_are_healthy_per_sample() -> None:
    # 10 singles and 5 batches of 6,000 a second: per request p95 is 50 ms (the
    # batches), far over the per-request limit, but per sample it is 0.01 ms.
    view = observed(window(15, 30_010, 0.01), window(15, 30_010, 0.012))
    ok, why = judge_health(CFG, view)
    assert ok is True, why
    assert "per-sample p95 0.011 ms within 0.800 ms" in why
    # The same device judged per request (an older agent) would have failed.
    legacy = replace(view, baseline_load=None)
    assert judge_health(CFG, legacy)[0] is False


def test_slower_per_sample_fails_whatever_the_batch() -> None:
    ok, why = judge_health(CFG, observed(window(10, 10, 2.0), window(10, 10, 3.0)))
    assert ok is False
    assert "per-sample p95 latency 2.500 ms exceeds 0.800 ms" in why
    assert "2 of 2 window(s) under comparable load" in why
    # Bigger batches only make per-sample latency cheaper: still a regression.
    ok, _ = judge_health(CFG, observed(window(10, 640, 1.5)))
    assert ok is False


def test_comparable_load_rules() -> None:
    # Batch: at least half the baseline's mean batch.
    base = replace(BASE, batch=8.0)
    assert comparable(window(10, 40, 1.0), base)  # mean batch 4 = 8 x 0.5
    assert not comparable(window(10, 39, 1.0), base)
    # Rate: at most 4 x 10 + 1 = 41 requests/s.
    assert comparable(window(41, 41, 1.0), BASE)
    assert not comparable(window(42, 42, 1.0), BASE)
    assert comparable(window(82, 82, 1.0, window_s=2.0), BASE)
    # No per-sample figures: never comparable.
    assert not comparable(WindowHealth(10, 1.0), BASE)
    assert not comparable(WindowHealth(0, 1.0, 0, None), BASE)


def test_a_local_flood_is_not_held_against_the_model() -> None:
    # 200 requests/s of singles (a local client hammering the endpoint): the
    # window's per-sample p95 measures the queue, not the model.
    flood = window(200, 200, 9.0)
    ok, why = judge_health(CFG, observed(flood))
    assert ok is True
    assert "per-sample latency not judged: none of 1 window(s)" in why
    # ... while windows at ordinary load in the same observation are judged.
    ok, why = judge_health(CFG, observed(flood, window(10, 10, 2.0)))
    assert ok is False and "1 of 2 window(s)" in why


def test_errors_are_judged_over_every_window_even_not_comparable_ones() -> None:
    ok, why = judge_health(CFG, observed(window(200, 200, 0.1), errors=50))
    assert ok is False and "error rate" in why


def test_older_agents_fall_back_to_per_request_p95() -> None:
    no_samples = WindowHealth(10, 1.0)
    assert judge_latency(CFG, BASE, [no_samples]) is None
    view = observed(no_samples, p95_ms=0.5)  # per request: 0.3 x 1.5 + 0.5 = 0.95 ms
    ok, why = judge_health(CFG, view)
    assert ok is True and "p95 0.50 ms" in why
    assert judge_health(CFG, observed(no_samples, p95_ms=1.0))[0] is False


def test_samples_weight_the_judged_windows() -> None:
    # A window serving 1,000 samples at 0.1 ms outweighs one serving 10 at 1.0 ms.
    result = judge_latency(CFG, BASE, [window(10, 1000, 0.1), window(10, 10, 1.0)])
    assert result is not None and result[0] is True
    assert "0.109 ms" in result[1]
