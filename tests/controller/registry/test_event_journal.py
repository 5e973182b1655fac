"""Numbered events are stored once; the ack mark moves only over numbers stored without a gap.

And the outbox digest, which tells a reconnecting controller whether the
broker still holds the desired states it was given.
"""

from __future__ import annotations

from edgefleet.controller.registry import Registry
from edgefleet.protocols.messages import Event, EventKind
from tests.controller.registry.builders import make_bundle, make_version

J1 = "a1" * 8
J2 = "b2" * 8


def _event(seq: int, journal: str = J1, device: str = "gw-1") -> Event:
    return Event(device, EventKind.INSTALLED, journal=journal, seq=seq)


def test_replays_and_duplicates_are_stored_once(registry: Registry) -> None:
    registry.enroll_device("gw-1")
    assert registry.add_events([_event(1), _event(2), _event(2)]) == 2  # a copy in one batch
    assert registry.add_events([_event(1), _event(2), _event(3)]) == 1  # a replay
    # Unnumbered events (agents without a journal) are never collapsed.
    plain = Event("gw-1", EventKind.ROLLED_BACK)
    assert registry.add_events([plain, plain]) == 2
    # The same number in another journal (a re-created state dir) is another event.
    assert registry.add_events([_event(1, J2)]) == 1
    assert len(registry.events_for("gw-1", limit=100)) == 6


def test_the_ack_mark_stops_at_the_first_gap(registry: Registry) -> None:
    registry.enroll_device("gw-1")
    registry.enroll_device("gw-2")
    registry.add_events([_event(1), _event(2), _event(4)])
    assert registry.advance_event_acks({("gw-1", J1)}) == [("gw-1", J1, 2)]
    registry.add_events([_event(3)])  # the gap is filled
    assert registry.advance_event_acks({("gw-1", J1)}) == [("gw-1", J1, 4)]
    # Nothing new: the same mark again (an agent that missed the ack is told again).
    assert registry.advance_event_acks({("gw-1", J1)}) == [("gw-1", J1, 4)]
    # A new journal starts from its own beginning; unknown devices are skipped.
    registry.add_events([_event(1, J2), _event(1, J1, "gw-2")])
    assert registry.advance_event_acks({("gw-1", J2), ("gw-2", J1), ("ghost", J1)}) == [
        ("gw-1", J2, 1),
        ("gw-2", J1, 1),
    ]
    assert registry.advance_event_acks(set()) == []


def test_the_published_digest_follows_published_generations(registry: Registry) -> None:
    empty = registry.published_digest()
    mv = make_version(registry)
    make_bundle(registry, mv, "generic")
    registry.enroll_device("a")
    registry.enroll_device("b")
    registry.create_deployment(mv.id, ["a", "b"])
    assert registry.published_digest() == empty  # nothing published yet
    registry.mark_published("a", 1)
    one = registry.published_digest()
    assert one != empty
    registry.create_deployment(mv.id, ["b"])  # a change not yet published
    assert registry.published_digest() == one
    registry.mark_published("b", 2)
    assert registry.published_digest() not in (empty, one)
