"""The root of edgefleet's exception tree, and the protocol-level errors.

Every error edgefleet raises on purpose derives from :class:`EdgefleetError`,
so a caller can catch "anything edgefleet refused" in one place::

    EdgefleetError
    ├── ProtocolError            (protocols: a message or frame is malformed)
    │   ├── MessageError         a JSON message failed validation
    │   ├── TopicError           a topic is not one of ours
    │   └── FrameError           a binary block frame is malformed
    ├── TransferError            (agent: a file transfer failed)
    ├── VerificationError        (agent: a bundle failed TUF or policy checks)
    ├── InstallError             (agent: a verified bundle could not go live)
    ├── RegistryError            (controller: the registry refused an operation)
    ├── TrustError               (controller: the TUF repository refused)
    ├── BrokerError              (either side: the MQTT broker is unreachable or refused us)
    └── ConfigError              (either side: a configuration file is wrong)

The subclasses of the agent and controller branches live next to the code that
raises them (``edgefleet.agent.errors``, ``edgefleet.controller.errors``).
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "EdgefleetError",
    "FrameError",
    "MessageError",
    "ProtocolError",
    "TopicError",
]


class EdgefleetError(Exception):
    """Base class of every error edgefleet raises deliberately."""


class ConfigError(EdgefleetError):
    """A configuration file or value is missing or wrong."""


class BrokerError(EdgefleetError):
    """The MQTT broker cannot be reached, refused the connection, or dropped us."""


class ProtocolError(EdgefleetError):
    """Something received over the wire does not follow the protocol."""


class MessageError(ProtocolError):
    """A JSON message is not valid: bad JSON, wrong types, missing fields."""


class TopicError(ProtocolError):
    """A topic string is not an edgefleet topic, or names an invalid device."""


class FrameError(ProtocolError):
    """A binary transfer frame is truncated, oversized or inconsistent."""
