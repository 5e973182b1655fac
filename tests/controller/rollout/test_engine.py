"""The rollout engine's pure decision core: every rule is a unit test away."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from edgefleet.controller.rollout.engine import (
    DeviceState,
    DeviceView,
    Health,
    Plan,
    RolloutConfig,
    RolloutStatus,
    RolloutView,
    judge_health,
    plan,
    wave_size,
)
from edgefleet.controller.rollout.errors import RolloutConfigError

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
S = DeviceState
CFG = RolloutConfig(
    canary_count=2,
    base_rate=2,
    increment_factor=2.0,
    max_rate=4,
    max_in_flight=3,
    soak_s=10,
    observe_s=5,
    device_timeout_s=30,
    failure_threshold_pct=10,
    timeout_threshold_pct=20,
    min_executed=4,
)


def fleet(n: int, **kw: object) -> list[DeviceView]:
    return [DeviceView(f"d{i:02d}", S.PENDING, **kw) for i in range(n)]  # type: ignore[arg-type]


def moved(p: Plan) -> dict[str, DeviceState]:
    """Each device's first transition in the plan (a halt may add a rollback after it)."""
    out: dict[str, DeviceState] = {}
    for t in p.transitions:
        out.setdefault(t.device_id, t.state)
    return out


def running(**kw: object) -> RolloutView:
    return RolloutView(RolloutStatus.RUNNING, **kw)  # type: ignore[arg-type]


def test_wave_sizes_grow_exponentially_up_to_max_rate() -> None:
    assert [wave_size(CFG, w, 100) for w in range(5)] == [2, 2, 4, 4, 4]
    pct = RolloutConfig(canary_count=None, canary_pct=5, base_rate=3, increment_factor=1.5)
    assert wave_size(pct, 0, 30) == 2  # ceil(1.5)
    assert [wave_size(pct, w, 30) for w in (1, 2, 3)] == [3, 5, 7]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"canary_count": None}, "exactly one of canary_count"),
        ({"canary_count": 1, "canary_pct": 5}, "exactly one of canary_count"),
        ({"canary_count": 0}, "canary_count must be at least 1"),
        ({"max_rate": 1, "base_rate": 2}, "max_rate (1) must be >= base_rate (2)"),
        ({"increment_factor": 0.5}, "increment_factor must be >= 1"),
        ({"failure_threshold_pct": 150}, "failure_threshold_pct must be in [0, 100]"),
        ({"device_timeout_s": 0}, "device_timeout_s must be > 0"),
    ],
)
def test_bad_settings_are_named(kw: dict[str, object], message: str) -> None:
    with pytest.raises(RolloutConfigError, match=re.escape(message)):
        RolloutConfig(**kw)  # type: ignore[arg-type]
    with pytest.raises(RolloutConfigError, match="unknown rollout setting"):
        RolloutConfig.from_dict({"canary": 3})


def test_canary_starts_only_online_devices_and_respects_its_size() -> None:
    devices = fleet(6)
    devices[0] = replace(devices[0], online=False)
    p = plan(CFG, running(), devices, T0)
    assert moved(p) == {"d01": S.IN_FLIGHT, "d02": S.IN_FLIGHT}
    assert all(t.wave == 0 for t in p.transitions)
    assert p.wave_started_at == T0
    assert next(d.kind for d in p.decisions) == "wave_started"


def test_max_in_flight_caps_starts() -> None:
    cfg = replace(CFG, canary_count=5, max_in_flight=2)
    p = plan(cfg, running(wave_started_at=T0), fleet(6), T0)
    assert len(p.transitions) == 2


def test_device_lifecycle_install_observe_updated() -> None:
    d = DeviceView("d1", S.IN_FLIGHT, wave=0, state_since=T0)
    assert moved(plan(CFG, running(wave_started_at=T0), [d], T0 + timedelta(seconds=1))) == {}
    d = replace(d, runs_target=True)
    assert moved(plan(CFG, running(wave_started_at=T0), [d], T0 + timedelta(seconds=1))) == {
        "d1": S.OBSERVING
    }
    obs = replace(
        d, state=S.OBSERVING, state_since=T0, health=Health(3, 30, 0, 1.0), baseline_p95_ms=1.0
    )
    # Not before the observation window is over...
    assert moved(plan(CFG, running(wave_started_at=T0), [obs], T0 + timedelta(seconds=4))) == {}
    # ...then healthy means updated; a finished download alone never is.
    p = plan(CFG, running(wave_started_at=T0), [obs], T0 + timedelta(seconds=5))
    assert moved(p) == {"d1": S.UPDATED}
    assert p.transitions[0].health == Health(3, 30, 0, 1.0)


def test_health_judges_error_rate_and_latency_against_own_baseline() -> None:
    base = DeviceView("d", S.OBSERVING, baseline_p95_ms=10.0)
    assert judge_health(CFG, base)[0] is None  # no telemetry yet
    ok, why = judge_health(CFG, replace(base, health=Health(2, 100, 20, 5.0)))
    assert ok is False and "error rate 20.0%" in why
    # 10 ms x 1.5 + 2 ms slack = 17 ms
    assert judge_health(CFG, replace(base, health=Health(2, 100, 0, 16.9)))[0] is True
    ok, why = judge_health(CFG, replace(base, health=Health(2, 100, 0, 17.5)))
    assert ok is False and "p95 latency 17.50 ms exceeds 17.00 ms" in why
    # Without a baseline only errors count; without requests nothing to judge but liveness.
    assert judge_health(CFG, replace(base, baseline_p95_ms=None, health=Health(1, 5, 0, 99.0)))[0]
    assert judge_health(CFG, replace(base, health=Health(1, 0, 0, None)))[0] is True


def test_install_refusal_fails_and_slow_install_times_out() -> None:
    a = DeviceView("a", S.IN_FLIGHT, wave=0, state_since=T0, install_error="smoke_test_failed: x")
    b = DeviceView("b", S.IN_FLIGHT, wave=0, state_since=T0, online=False)
    p = plan(
        replace(CFG, canary_count=10),
        running(wave_started_at=T0),
        [a, b],
        T0 + timedelta(seconds=31),
    )
    assert moved(p) == {"a": S.FAILED, "b": S.TIMED_OUT}
    reasons: dict[str, str] = {}
    for t in p.transitions:
        reasons.setdefault(t.device_id, t.reason)
    assert "smoke_test_failed" in reasons["a"]
    assert "within 30s (device offline)" in reasons["b"]
    # Both canary devices finished badly: the same step halts and rolls them back.
    assert p.status is RolloutStatus.HALTED
    assert [t.state for t in p.transitions if t.device_id == "a"] == [S.FAILED, S.ROLLING_BACK]


def test_observing_without_telemetry_times_out_eventually() -> None:
    d = DeviceView("d", S.OBSERVING, wave=0, state_since=T0, runs_target=True)
    assert moved(plan(CFG, running(wave_started_at=T0), [d], T0 + timedelta(seconds=20))) == {}
    p = plan(CFG, running(wave_started_at=T0), [d], T0 + timedelta(seconds=36))
    assert moved(p) == {"d": S.TIMED_OUT}


def _canary_done(states: list[DeviceState], rest: int = 6) -> list[DeviceView]:
    done = [DeviceView(f"c{i}", st, wave=0, state_since=T0) for i, st in enumerate(states)]
    return done + fleet(rest)


def test_failing_canary_halts_and_rolls_back_despite_min_executed() -> None:
    devices = _canary_done([S.UPDATED, S.FAILED])
    p = plan(CFG, running(wave_started_at=T0), devices, T0)
    assert p.status is RolloutStatus.HALTED
    assert "1/2 (50%) of the canary failed" in (p.reason or "")
    m = moved(p)
    assert m["c0"] is S.ROLLING_BACK and m["c1"] is S.ROLLING_BACK
    assert {m[f"d{i:02d}"] for i in range(6)} == {S.CANCELLED}
    assert [d.kind for d in p.decisions if d.device_id is None] == ["halted"]


def test_healthy_canary_soaks_then_next_wave_starts() -> None:
    devices = _canary_done([S.UPDATED, S.UPDATED])
    p = plan(CFG, running(wave_started_at=T0), devices, T0)
    assert p.status is None and p.next_wave_at == T0 + timedelta(seconds=10)
    assert moved(p) == {}
    soaking = running(wave_started_at=T0, next_wave_at=T0 + timedelta(seconds=10))
    assert plan(CFG, soaking, devices, T0 + timedelta(seconds=9)).empty
    p = plan(CFG, soaking, devices, T0 + timedelta(seconds=10))
    assert p.wave == 1 and p.clear_next_wave_at
    assert moved(p) == {"d00": S.IN_FLIGHT, "d01": S.IN_FLIGHT}  # base_rate 2
    assert {t.wave for t in p.transitions} == {1}


def test_threshold_over_all_executed_devices_after_min_executed() -> None:
    views = [
        DeviceView("a", S.UPDATED, wave=0),
        DeviceView("b", S.UPDATED, wave=0),
        DeviceView("c", S.UPDATED, wave=1),
        DeviceView("d", S.TIMED_OUT, wave=1),
        DeviceView("e", S.PENDING),
    ]
    # 1/4 timed out = 25% > 20%
    p = plan(CFG, running(wave=1, wave_started_at=T0), views, T0)
    assert p.status is RolloutStatus.HALTED and "timed out" in (p.reason or "")
    # Below min_executed (3 < 4) the same ratio does not halt outside the canary.
    p = plan(CFG, running(wave=1, wave_started_at=T0), views[1:], T0)
    assert p.status is None


def test_paused_rollout_starts_nothing_but_still_judges() -> None:
    views = [DeviceView("a", S.IN_FLIGHT, wave=0, state_since=T0, runs_target=True), *fleet(3)]
    p = plan(CFG, RolloutView(RolloutStatus.PAUSED, wave_started_at=T0), views, T0)
    assert moved(p) == {"a": S.OBSERVING}


def test_offline_devices_wait_until_back_or_deadline() -> None:
    views = [DeviceView("a", S.UPDATED, wave=0), DeviceView("z", S.PENDING, online=False)]
    r = running(wave=1, wave_started_at=T0, deadline_at=T0 + timedelta(hours=1))
    p = plan(CFG, r, views, T0 + timedelta(minutes=5))
    assert p.empty  # not started, not completed: waiting
    back = [views[0], replace(views[1], online=True)]
    assert moved(plan(CFG, r, back, T0 + timedelta(minutes=6))) == {"z": S.IN_FLIGHT}
    p = plan(CFG, r, views, T0 + timedelta(hours=2))
    assert moved(p) == {"z": S.EXPIRED}
    assert p.status is RolloutStatus.COMPLETED


def test_completed_rollout_starts_late_joiners_immediately() -> None:
    views = [DeviceView("a", S.UPDATED, wave=2), DeviceView("new", S.PENDING)]
    p = plan(CFG, RolloutView(RolloutStatus.COMPLETED, wave=2), views, T0)
    assert moved(p) == {"new": S.IN_FLIGHT}
    assert p.status is None


def test_abort_rolls_back_started_devices_once() -> None:
    views = [
        DeviceView("a", S.UPDATED, wave=0),
        DeviceView("b", S.IN_FLIGHT, wave=0, state_since=T0),
        DeviceView("c", S.OBSERVING, wave=0, state_since=T0, runs_target=True, has_previous=False),
        DeviceView("d", S.PENDING),
        DeviceView("e", S.ROLLING_BACK, wave=0, state_since=T0, runs_rollback=True),
    ]
    p = plan(CFG, RolloutView(RolloutStatus.ABORTED), views, T0)
    assert moved(p) == {
        "a": S.ROLLING_BACK,
        "b": S.ROLLING_BACK,
        "c": S.ROLLBACK_FAILED,
        "d": S.CANCELLED,
        "e": S.ROLLED_BACK,
    }
    settled = [replace(v, state=moved(p)[v.device_id]) for v in views]
    settled[4] = replace(settled[4], runs_rollback=True)
    again = plan(CFG, RolloutView(RolloutStatus.ABORTED), settled, T0)
    assert S.ROLLING_BACK not in moved(again).values()


def test_rollback_that_does_not_finish_is_reported() -> None:
    v = DeviceView("a", S.ROLLING_BACK, wave=0, state_since=T0)
    p = plan(CFG, RolloutView(RolloutStatus.HALTED), [v], T0 + timedelta(seconds=31))
    assert moved(p) == {"a": S.ROLLBACK_FAILED}


def test_all_done_completes_with_a_summary() -> None:
    views = [DeviceView("a", S.UPDATED, wave=0), DeviceView("b", S.UPDATED, wave=1)]
    p = plan(CFG, running(wave=1, wave_started_at=T0), views, T0)
    assert p.status is RolloutStatus.COMPLETED
    assert p.reason == "completed: 2 updated"


def test_statuses_that_need_no_steps() -> None:
    for status in (RolloutStatus.CREATED, RolloutStatus.SUPERSEDED):
        assert plan(CFG, RolloutView(status), fleet(3), T0).empty
