"""The registry's results: frozen dataclasses, safe to hand to any thread.

Every registry method returns these (or protocol messages), never ORM rows,
so no caller holds an object bound to a session. They are grouped here, one
module for all aggregates, so callers import results without pulling in the
code that stores them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgefleet.protocols.bundle import TensorSpec
from edgefleet.protocols.messages import ErrorInfo, ModelRef

__all__ = [
    "BundleInfo",
    "DeploymentInfo",
    "DeploymentTargetInfo",
    "DeviceInfo",
    "DeviceSummary",
    "EventInfo",
    "FleetStatus",
    "ModelVersionInfo",
    "TelemetryInfo",
    "error_info",
]


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered model version.

    ``release`` is the per-model counter agents use for rollback protection.
    """

    id: int
    name: str
    version: str
    release: int
    source_sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str
    created_at: datetime

    @property
    def label(self) -> str:
        """``name@version``, the way operators and logs name a version."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class BundleInfo:
    """A bundle of a model version built for one hardware class and runtime."""

    id: int
    model_version_id: int
    hardware_class: str
    runtime: str
    precision: str
    target_path: str
    sha256: str
    length: int
    report: dict[str, Any] | None
    created_at: datetime
    release: int | None = None
    reissue_of: int | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """An enrolled device as last reported.

    Hardware fields are empty until the agent's first report.
    """

    id: str
    hardware_class: str
    arch: str
    cpu_features: tuple[str, ...]
    runtimes: tuple[str, ...]
    tags: tuple[str, ...]
    online: bool
    last_seen: datetime | None
    enrolled_at: datetime
    state: str | None
    active_model: str | None
    active_version: str | None
    active_release: int | None
    last_error: ErrorInfo | None
    reported: dict[str, Any] | None = field(default=None, compare=False)
    profile: str | None = None


@dataclass(frozen=True)
class DeploymentTargetInfo:
    """What one deployment asked of one device."""

    device_id: str
    generation: int
    model: ModelRef
    bundle_id: int


@dataclass(frozen=True)
class DeploymentInfo:
    """A deployment and, per device, the generation and bundle it set."""

    id: str
    model_version_id: int
    model: str
    version: str
    release: int
    created_at: datetime
    status: str
    targets: tuple[DeploymentTargetInfo, ...]


@dataclass(frozen=True)
class EventInfo:
    """A stored device event.

    ``detail`` holds the event's optional fields (model, byte counts, unknown
    fields from newer agents).
    """

    id: int
    device_id: str
    kind: str
    deployment_id: str | None
    generation: int
    error: ErrorInfo | None
    detail: dict[str, Any] | None
    at: datetime
    # The agent's journal and its number there: the device's own order of its
    # events (None for events the controller recorded, or from older agents).
    journal: str | None = None
    seq: int | None = None


@dataclass(frozen=True)
class TelemetryInfo:
    """One stored telemetry window."""

    id: int
    device_id: str
    at: datetime
    window_s: float
    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    model_version: str | None
    rss_bytes: int
    cpu_percent: float


@dataclass(frozen=True)
class DeviceSummary:
    """One row of the fleet table: what a device runs, how well, and what it should run."""

    device_id: str
    hardware_class: str
    online: bool
    state: str | None
    active_model: str | None
    active_version: str | None
    last_error_code: str | None
    last_error_message: str | None
    last_seen: datetime | None
    inferences: int
    errors: int
    p50_ms: float | None
    desired_model: str | None
    desired_version: str | None
    profile: str | None = None
    # The variant (bundle hardware class) of the bundle the device reports it
    # runs; its tags; when two agents last seemed to share its id (None: not
    # within the last DUPLICATE_RECENT_S).
    variant: str | None = None
    tags: tuple[str, ...] = ()
    duplicate_at: datetime | None = None
    # Delivery of the desired state: its generation, whether the controller
    # has published it, since when it is desired, and the generation the
    # device last reported (see registry.fleet.delivery_state).
    desired_generation: int | None = None
    desired_published: bool | None = None
    desired_since: datetime | None = None
    reported_generation: int | None = None


@dataclass(frozen=True)
class FleetStatus:
    """Fleet-wide totals.

    ``devices`` is the number enrolled; ``online``/``offline`` follow the
    status channel; ``failed`` counts devices whose agent reports the
    ``failed`` state. ``versions`` maps ``name@version`` to the number of
    devices running it; ``inferences``/``errors`` sum all stored telemetry.
    """

    devices: int
    online: int
    offline: int
    failed: int
    versions: dict[str, int]
    inferences: int
    errors: int
    counters: dict[str, int]
    duplicates: int = 0  # devices two agents seemed to share recently (DeviceSummary.duplicate_at)


def error_info(d: Mapping[str, Any] | None) -> ErrorInfo | None:
    """The :class:`ErrorInfo` stored as JSON in an error column, or ``None``."""
    if not d:
        return None
    return ErrorInfo(code=str(d.get("code", "")), message=str(d.get("message", "")))
