from __future__ import annotations

import pytest

from edgefleet.protocols.errors import TopicError
from edgefleet.protocols.topics import Channel, DeviceTopic, controller_subscriptions


def test_round_trip_every_channel() -> None:
    for channel in Channel:
        topic = DeviceTopic("gw-01", channel)
        assert DeviceTopic.parse(str(topic)) == topic


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/devices/gw/desired",
        "edgefleet/v1/devices/gw",
        "edgefleet/v1/devices/gw/unknown",
        "edgefleet/v1/devices/+/desired",
        "edgefleet/v1/devices/../desired",
        "edgefleet/v2/devices/gw/desired",
    ],
)
def test_parse_refuses_foreign_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        DeviceTopic.parse(topic)


@pytest.mark.parametrize("device_id", ["", "a/b", "#", "+", "-lead", "x" * 65, "sp ace"])
def test_invalid_device_ids(device_id: str) -> None:
    with pytest.raises(TopicError):
        DeviceTopic(device_id, Channel.DESIRED)


def test_controller_subscribes_to_agent_channels_only() -> None:
    subs = controller_subscriptions()
    assert "edgefleet/v1/devices/+/reported" in subs
    assert "edgefleet/v1/devices/+/files/request" in subs
    assert not any(s.endswith("/desired") or s.endswith("/files/blocks") for s in subs)
