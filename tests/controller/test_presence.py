"""The pure presence tracker: liveness, duplicate device ids, held-back offlines."""

from __future__ import annotations

from edgefleet.controller.presence import PresenceTracker


def test_a_new_journal_is_not_a_duplicate_but_one_that_comes_back_is() -> None:
    p = PresenceTracker(window_s=60)
    assert p.journal("d", "j1", 0.0) is None
    assert p.journal("d", "j1", 1.0) is None
    assert p.journal("d", "j2", 2.0) is None  # state directory re-created: a new journal
    dup = p.journal("d", "j1", 3.0)
    assert dup is not None and dup.reason == "journals" and dup.detail["journals"] == ["j1", "j2"]
    assert p.journal("d", "j2", 4.0) is None  # reported once per window
    assert p.suspected("d", 4.0) and not p.suspected("d", 64.0)
    assert p.journal("other", "j9", 4.0) is None and not p.suspected("other", 4.0)


def test_overlapping_telemetry_windows_twice_mean_two_agents() -> None:
    p = PresenceTracker(window_s=60)
    # One agent: windows follow each other (and a restart starts a fresh one).
    for i in range(1, 10):
        assert p.telemetry_window("one", at=100.0 + 10 * i, window_s=10.0, now=float(i)) is None
    assert p.telemetry_window("one", at=200.0, window_s=2.0, now=10.0) is None
    # Two agents, each every 10 s, 3 s apart.
    results = [
        p.telemetry_window("two", at=at, window_s=10.0, now=at - 100)
        for at in (110.0, 113.0, 120.0, 123.0)
    ]
    assert results[:2] == [None, None]
    found = [r for r in results if r is not None]
    assert len(found) == 1 and found[0].reason == "telemetry_overlap"


def test_flapping_status_while_sending_is_a_duplicate_and_its_offline_is_held() -> None:
    p = PresenceTracker(window_s=60, flaps=2, alive_grace_s=5)
    assert p.alive("d", 0.0) is True  # first sign of life: store online
    assert p.alive("d", 1.0) is False  # already stored
    assert p.status("d", False, 2.0) == (True, None)  # one offline: a restart, stored
    assert p.alive("d", 3.0) is True  # back: store online again
    store, dup = p.status("d", False, 4.0)  # the second offline within the window
    assert dup is not None and dup.reason == "status_flapping"
    assert store is False  # the other agent's will must not hide the running one
    assert p.due_offline(6.0) == []  # it sent within the grace
    assert p.due_offline(9.5) == ["d"]  # silent since 3.0: the offline is stored after all
    assert p.due_offline(20.0) == []


def test_a_single_restart_is_not_a_duplicate() -> None:
    p = PresenceTracker(window_s=60, flaps=2)
    p.alive("d", 0.0)
    assert p.status("d", False, 1.0) == (True, None)
    assert p.status("d", True, 2.0) == (True, None)
    p.alive("d", 3.0)
    # An offline long after: the first left the window.
    assert p.status("d", False, 100.0) == (True, None)
    # Offlines of a device that sends nothing are never a duplicate.
    q = PresenceTracker(window_s=60, flaps=2)
    assert [q.status("quiet", False, t)[1] for t in (1.0, 2.0, 3.0)] == [None, None, None]


def test_memory_is_bounded() -> None:
    p = PresenceTracker(max_devices=10)
    for i in range(100):
        p.alive(f"d{i}", float(i))
    assert len(p._devices) == 10


def test_a_device_sending_without_pause_costs_bounded_memory() -> None:
    # A hostile device: 10,000 offline statuses and overlapping windows within
    # one window_s. The verdicts still come; the per-device state stays small.
    p = PresenceTracker(window_s=120, flaps=3)
    p.alive("d", 0.0)
    verdicts = set()
    for i in range(10_000):
        now = i * 0.001
        _, dup = p.status("d", False, now)
        if dup is not None:
            verdicts.add(dup.reason)
        dup = p.telemetry_window("d", at=1000.0 + i * 0.001, window_s=10.0, now=now)
        if dup is not None:
            verdicts.add(dup.reason)
        p.journal("d", f"j{i}", now)
    d = p._devices["d"]
    assert len(d.offlines) <= 3 and len(d.overlaps) <= 2
    assert len(d.windows) <= 4 and len(d.journals) <= 3
    assert "status_flapping" in verdicts
    assert p.suspected("d", 9.0)
