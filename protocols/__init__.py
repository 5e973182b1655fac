"""Pure protocol code shared by the controller and the agent.

No sockets, no files, no MQTT client: only topic names, message types with
validation, and the binary framing of file transfers. Both sides import this
package; nothing here imports either side.
"""

from edgefleet.protocols.errors import (
    ConfigError,
    EdgefleetError,
    FrameError,
    MessageError,
    ProtocolError,
    TopicError,
)
from edgefleet.protocols.framing import DEFAULT_BLOCK_SIZE, BlockFrame, FrameKind, coalesce
from edgefleet.protocols.messages import (
    SCHEMA_VERSION,
    AgentState,
    DesiredState,
    ErrorInfo,
    Event,
    EventKind,
    FileRequest,
    HardwareInfo,
    LatencySummary,
    ModelRef,
    ReportedState,
    Telemetry,
)
from edgefleet.protocols.topics import PREFIX, Channel, DeviceTopic, validate_device_id

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "PREFIX",
    "SCHEMA_VERSION",
    "AgentState",
    "BlockFrame",
    "Channel",
    "ConfigError",
    "DesiredState",
    "DeviceTopic",
    "EdgefleetError",
    "ErrorInfo",
    "Event",
    "EventKind",
    "FileRequest",
    "FrameError",
    "FrameKind",
    "HardwareInfo",
    "LatencySummary",
    "MessageError",
    "ModelRef",
    "ProtocolError",
    "ReportedState",
    "Telemetry",
    "TopicError",
    "coalesce",
    "validate_device_id",
]
