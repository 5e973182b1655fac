"""Topic names: the one place that says who publishes what, where.

Every device owns a subtree ``edgefleet/v1/devices/{device_id}/...``. Keeping
all of a device's traffic under its own prefix is what lets a broker ACL with
``%u``/``%c`` patterns confine a device to its own topics.

================================  ==========  ========  =======  ======
topic (under devices/{id}/)       publisher   retained  QoS      body
================================  ==========  ========  =======  ======
``desired``                       controller  yes       1        JSON :class:`DesiredState`
``reported``                      agent       yes       1        JSON :class:`ReportedState`
``status``                        agent+LWT   yes       1        ``online`` / ``offline``
``events``                        agent       no        1        JSON :class:`Event`
``events/ack``                    controller  no        1        JSON :class:`EventAck`
``telemetry``                     agent       no        0        JSON :class:`Telemetry`
``files/request``                 agent       no        1        JSON :class:`FileRequest`
``files/blocks``                  controller  no        1        binary frame (framing.py)
================================  ==========  ========  =======  ======

Fan-out (ADR 0010): the blocks of a bundle several devices are fetching go
once to ``edgefleet/v1/broadcast/targets/{hash}/blocks``
(:func:`target_stream_topic`), published by the controller, not retained,
QoS 1, as binary stream frames. ``{hash}`` is the first 32 hex characters
of the SHA-256 in the target's file name, so the topic names signed content,
not a device; every enrolled device may read ``broadcast/#`` (the ACL).

One topic is the controller's own: ``edgefleet/v1/controller/outbox``
(:data:`OUTBOX_MARKER_TOPIC`, retained), published after desired states. It
holds a digest of the desired-state generations the broker was given, so a
controller that reconnects can tell whether the broker still holds them
(then nothing is re-published) or lost its retained messages (then all are).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from edgefleet.protocols.errors import TopicError

__all__ = [
    "DEVICE_ID_PATTERN",
    "OUTBOX_MARKER_TOPIC",
    "PREFIX",
    "STREAM_PREFIX",
    "Channel",
    "DeviceTopic",
    "controller_subscriptions",
    "target_stream_topic",
    "validate_device_id",
]

PREFIX = "edgefleet/v1"
OUTBOX_MARKER_TOPIC = f"{PREFIX}/controller/outbox"
STREAM_PREFIX = f"{PREFIX}/broadcast/targets"
# A consistent-snapshot target file: ``targets/[dirs/]<sha256>.<name>``.
_TARGET_FILE = re.compile(r"^targets/(?:[^/]+/)*([0-9a-f]{64})\.[^/]+$")

# Device ids become topic levels and file names, so they must contain no MQTT
# wildcard, no separator and nothing a shell or filesystem would misread.
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Channel(str, Enum):
    """The per-device channels, as they appear after ``devices/{id}/``."""

    DESIRED = "desired"
    REPORTED = "reported"
    STATUS = "status"
    EVENTS = "events"
    EVENTS_ACK = "events/ack"
    TELEMETRY = "telemetry"
    FILE_REQUEST = "files/request"
    FILE_BLOCKS = "files/blocks"


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` unchanged if it is a valid device id.

    Raises:
        TopicError: the id is empty, too long, or has characters that are
            unsafe in topics or file names.
    """
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.match(device_id):
        raise TopicError(
            f"invalid device id {device_id!r}: use 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return device_id


@dataclass(frozen=True)
class DeviceTopic:
    """A concrete topic of one device, e.g. ``edgefleet/v1/devices/gw-1/desired``."""

    device_id: str
    channel: Channel

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)

    def __str__(self) -> str:
        return f"{PREFIX}/devices/{self.device_id}/{self.channel.value}"

    @classmethod
    def parse(cls, topic: str) -> DeviceTopic:
        """Parse a topic string received from the broker.

        Raises:
            TopicError: the topic is not a device topic of this protocol version.
        """
        head = f"{PREFIX}/devices/"
        if not topic.startswith(head):
            raise TopicError(f"not an edgefleet device topic: {topic!r}")
        device_id, sep, rest = topic[len(head) :].partition("/")
        if not sep:
            raise TopicError(f"topic has no channel: {topic!r}")
        try:
            channel = Channel(rest)
        except ValueError:
            raise TopicError(f"unknown channel {rest!r} in topic {topic!r}") from None
        return cls(device_id, channel)

    @staticmethod
    def wildcard(channel: Channel) -> str:
        """The subscription filter matching ``channel`` of every device."""
        return f"{PREFIX}/devices/+/{channel.value}"


def controller_subscriptions() -> list[str]:
    """The filters the controller subscribes to: everything agents publish."""
    return [
        DeviceTopic.wildcard(ch)
        for ch in (
            Channel.REPORTED,
            Channel.STATUS,
            Channel.EVENTS,
            Channel.TELEMETRY,
            Channel.FILE_REQUEST,
        )
    ]


def target_stream_topic(repo_path: str) -> str | None:
    """The fan-out topic of a target file, or None if ``repo_path`` is not one.

    Only content-addressed target files (``targets/.../<sha256>.<name>``) have
    one: metadata changes under the same name, and a stream must carry bytes
    that every subscriber can check against a signed hash.
    """
    match = _TARGET_FILE.match(repo_path)
    if match is None:
        return None
    return f"{STREAM_PREFIX}/{match.group(1)[:32]}/blocks"
