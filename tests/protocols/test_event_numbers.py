"""Event numbers (``journal``, ``seq``) and the controller's :class:`EventAck`."""

from __future__ import annotations

import json

import pytest

from edgefleet.protocols.errors import MessageError
from edgefleet.protocols.messages import Event, EventAck, EventKind

J = "0123456789abcdef"


def test_numbered_events_round_trip_and_unnumbered_ones_stay_as_they_were() -> None:
    numbered = Event("gw-1", EventKind.INSTALLED, journal=J, seq=7)
    assert Event.decode(numbered.encode()) == numbered
    plain = Event("gw-1", EventKind.INSTALLED)
    assert "seq" not in json.loads(plain.encode())  # older controllers see no new field
    assert Event.decode(plain.encode()).seq is None


@pytest.mark.parametrize(
    "fields",
    [
        {"journal": J},  # a number without its journal, or the reverse
        {"seq": 3},
        {"journal": J, "seq": 0},
        {"journal": J, "seq": -1},
        {"journal": "XYZ" * 4, "seq": 1},
        {"journal": "ab", "seq": 1},
        {"journal": J, "seq": "1"},
    ],
)
def test_bad_numbers_are_refused(fields: dict[str, object]) -> None:
    body = {"v": 1, "device_id": "gw-1", "kind": "installed", **fields}
    with pytest.raises(MessageError):
        Event.decode(json.dumps(body))


def test_event_ack_round_trip_and_refusals() -> None:
    ack = EventAck("gw-1", J, 12)
    assert EventAck.decode(ack.encode()) == ack
    for bad in ({"journal": J}, {"seq": 1}, {"journal": J, "seq": 0}, {}):
        with pytest.raises(MessageError):
            EventAck.decode(json.dumps({"v": 1, "device_id": "gw-1", **bad}))
