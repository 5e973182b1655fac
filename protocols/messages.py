"""JSON messages exchanged over MQTT, with validation and a schema version.

Each message is a frozen dataclass with ``to_dict``/``from_dict`` and
``encode``/``decode`` (UTF-8 JSON bytes). Like ``tuf.api.metadata``, parsing
validates every field it knows and keeps the fields it does not know in
``extra``, so an older agent tolerates a newer controller and vice versa.
Every message carries ``"v": SCHEMA_VERSION``; a message from a *newer* major
schema is still parsed (unknown fields are kept), a message without ``v`` or
with a non-integer ``v`` is refused.

Validation failures raise :class:`~edgefleet.protocols.errors.MessageError`
with a message naming the offending field; handlers log and count them.

Telemetry and events are checked as values, not only as types, against the
ranges in :mod:`edgefleet.protocols.bounds`: counts within ``0..2**53`` and
``errors <= requests``; finite, non-negative latencies with ``p50 <= p95 <=
p99``; a sane window, CPU and RSS. Unknown ``rejected`` reasons are folded
into ``other``, and an event's unknown fields larger than
:data:`~edgefleet.protocols.bounds.MAX_DETAIL_BYTES` are replaced by a
``_truncated`` marker (the event itself is kept: it may be the only record
of a failed install). Whether ``at`` is close to now needs a clock, so the
controller checks that at ingest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, TypeVar

from edgefleet.protocols import _fields as f
from edgefleet.protocols import bounds
from edgefleet.protocols.errors import MessageError
from edgefleet.protocols.topics import DEVICE_ID_PATTERN

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "AgentState",
    "DesiredState",
    "ErrorInfo",
    "Event",
    "EventAck",
    "EventKind",
    "FileRequest",
    "HardwareInfo",
    "LatencySummary",
    "Message",
    "ModelRef",
    "ReportedState",
    "Telemetry",
    "decode",
]

SCHEMA_VERSION = 1
# Nothing legitimate in JSON is this large; larger payloads are refused before
# json.loads so a hostile publisher cannot make us parse megabytes.
MAX_MESSAGE_BYTES = 256 * 1024

JSONDict = dict[str, Any]
M = TypeVar("M", bound="Message")


# --------------------------------------------------------------------------- base
class Message:
    """Common encode/decode for every message type."""

    KIND: ClassVar[str]
    FIELDS: ClassVar[frozenset[str]]

    extra: JSONDict

    def to_dict(self) -> JSONDict:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[M], d: Mapping[str, Any]) -> M:  # pragma: no cover - overridden
        raise NotImplementedError

    def encode(self) -> bytes:
        """Serialize to compact UTF-8 JSON with the schema version."""
        body = {**self.extra, **self.to_dict(), "v": SCHEMA_VERSION}
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls: type[M], payload: bytes | bytearray | str) -> M:
        """Parse and validate one message.

        Raises:
            MessageError: the payload is too large, not JSON, not an object,
                has no usable schema version, or a field is invalid.
        """
        return cls.from_dict(decode(payload))


def decode(payload: bytes | bytearray | str) -> JSONDict:
    """Parse a payload into a JSON object that carries a schema version."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MessageError(f"payload must be a JSON object, got {type(body).__name__}")
    version = body.get("v")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MessageError("payload has no valid schema version 'v'")
    return body


# --------------------------------------------------------------------------- parts
@dataclass(frozen=True)
class ModelRef:
    """Which bundle: a model version, its release counter and its TUF target path.

    ``release`` is the monotonically increasing counter the agent uses to
    refuse rollbacks; ``target`` is the TUF target path of the bundle.
    """

    name: str
    version: str
    release: int
    target: str

    def to_dict(self) -> JSONDict:
        return {
            "name": self.name,
            "version": self.version,
            "release": self.release,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelRef:
        if not isinstance(d, Mapping):
            raise MessageError("model reference must be an object")
        return cls(
            name=f.text(d, "name", max_len=128),
            version=f.text(d, "version", max_len=64),
            release=f.integer(d, "release", minimum=1),
            target=f.text(d, "target", max_len=512),
        )

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ErrorInfo:
    """A machine-readable reason (``code``) and a human one (``message``)."""

    code: str
    message: str

    def to_dict(self) -> JSONDict:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ErrorInfo:
        if not isinstance(d, Mapping):
            raise MessageError("error must be an object")
        return cls(code=f.text(d, "code", max_len=64), message=f.text(d, "message", max_len=4096))


@dataclass(frozen=True)
class HardwareInfo:
    """What a device is: CPU architecture and features, runtimes, class."""

    arch: str
    cpu_features: tuple[str, ...] = ()
    runtimes: tuple[str, ...] = ()
    hardware_class: str = "generic"

    def to_dict(self) -> JSONDict:
        return {
            "arch": self.arch,
            "cpu_features": list(self.cpu_features),
            "runtimes": list(self.runtimes),
            "hardware_class": self.hardware_class,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HardwareInfo:
        if not isinstance(d, Mapping):
            raise MessageError("hardware must be an object")
        return cls(
            arch=f.text(d, "arch", max_len=64),
            cpu_features=tuple(f.text_list(d, "cpu_features", max_items=512)),
            runtimes=tuple(f.text_list(d, "runtimes")),
            hardware_class=f.text(d, "hardware_class", optional=True, max_len=64) or "generic",
        )


@dataclass(frozen=True)
class LatencySummary:
    """Latency percentiles in milliseconds over one telemetry window."""

    p50: float
    p95: float
    p99: float

    def to_dict(self) -> JSONDict:
        return {"p50": self.p50, "p95": self.p95, "p99": self.p99}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencySummary:
        if not isinstance(d, Mapping):
            raise MessageError("latency_ms must be an object")
        p50, p95, p99 = (
            f.number(d, key, minimum=0.0, maximum=bounds.MAX_LATENCY_MS)
            for key in ("p50", "p95", "p99")
        )
        if not p50 <= p95 <= p99:
            raise MessageError(
                f"latency_ms must have p50 <= p95 <= p99, got {p50:g}, {p95:g}, {p99:g}"
            )
        return cls(p50=p50, p95=p95, p99=p99)


def _opt(part: Any) -> Any:
    return None if part is None else part.to_dict()


def _capped_extra(d: Mapping[str, Any], known: set[str]) -> JSONDict:
    """Unknown fields, or a ``_truncated`` marker when they encode larger than the cap."""
    extra = f.extra(d, known)
    if not extra:
        return extra
    size = len(json.dumps(extra, separators=(",", ":"), sort_keys=True).encode())
    if size <= bounds.MAX_DETAIL_BYTES:
        return extra
    return {bounds.TRUNCATED_KEY: {"bytes": size, "keys": len(extra)}}


# --------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class DesiredState(Message):
    """The model a device should run. Published retained, QoS 1, by the controller.

    ``generation`` increases every time the controller changes this device's
    desired state; the agent echoes it in its reports so the controller can
    tell which intent a report answers. ``model=None`` means "no model".
    """

    KIND: ClassVar[str] = "desired"

    device_id: str
    generation: int
    model: ModelRef | None
    deployment_id: str | None = None
    issued_at: float = 0.0
    extra: JSONDict = field(default_factory=dict, compare=False)

    def to_dict(self) -> JSONDict:
        return {
            "device_id": self.device_id,
            "generation": self.generation,
            "model": _opt(self.model),
            "deployment_id": self.deployment_id,
            "issued_at": self.issued_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DesiredState:
        model = f.obj(d, "model", optional=True)
        return cls(
            device_id=f.device_id(d),
            generation=f.integer(d, "generation"),
            model=None if model is None else ModelRef.from_dict(model),
            deployment_id=f.text(d, "deployment_id", optional=True, max_len=64),
            issued_at=f.number(d, "issued_at", optional=True) or 0.0,
            extra=f.extra(d, {"device_id", "generation", "model", "deployment_id", "issued_at"}),
        )


class AgentState(str, Enum):
    """What the agent is doing right now."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    FAILED = "failed"


@dataclass(frozen=True)
class ReportedState(Message):
    """What a device runs. Published retained, QoS 1, by the agent.

    ``generation``/``deployment_id`` name the desired state the agent last
    acted on; ``last_error`` explains a failed attempt while ``active`` keeps
    naming the model still being served.
    """

    KIND: ClassVar[str] = "reported"

    device_id: str
    state: AgentState
    active: ModelRef | None
    hardware: HardwareInfo
    generation: int = 0
    deployment_id: str | None = None
    previous: ModelRef | None = None
    last_error: ErrorInfo | None = None
    agent_version: str = ""
    updated_at: float = 0.0
    extra: JSONDict = field(default_factory=dict, compare=False)

    def to_dict(self) -> JSONDict:
        return {
            "device_id": self.device_id,
            "state": self.state.value,
            "active": _opt(self.active),
            "previous": _opt(self.previous),
            "hardware": self.hardware.to_dict(),
            "generation": self.generation,
            "deployment_id": self.deployment_id,
            "last_error": _opt(self.last_error),
            "agent_version": self.agent_version,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReportedState:
        active = f.obj(d, "active", optional=True)
        previous = f.obj(d, "previous", optional=True)
        error = f.obj(d, "last_error", optional=True)
        return cls(
            device_id=f.device_id(d),
            state=f.member(d, "state", AgentState),
            active=None if active is None else ModelRef.from_dict(active),
            previous=None if previous is None else ModelRef.from_dict(previous),
            hardware=HardwareInfo.from_dict(f.obj(d, "hardware")),
            generation=f.integer(d, "generation", optional=True) or 0,
            deployment_id=f.text(d, "deployment_id", optional=True, max_len=64),
            last_error=None if error is None else ErrorInfo.from_dict(error),
            agent_version=f.text(d, "agent_version", optional=True, max_len=64) or "",
            updated_at=f.number(d, "updated_at", optional=True) or 0.0,
            extra=f.extra(
                d,
                {
                    "device_id",
                    "state",
                    "active",
                    "previous",
                    "hardware",
                    "generation",
                    "deployment_id",
                    "last_error",
                    "agent_version",
                    "updated_at",
                },
            ),
        )


class EventKind(str, Enum):
    """Progress and outcome events an agent emits while reconciling."""

    DOWNLOAD_STARTED = "download_started"
    DOWNLOAD_PROGRESS = "download_progress"
    VERIFIED = "verified"
    INSTALLED = "installed"
    INSTALL_FAILED = "install_failed"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class Event(Message):
    """One step of a device's work on a desired state. QoS 1, not retained.

    ``journal`` and ``seq`` identify the event for good: ``seq`` numbers the
    events of one agent journal (``agent/journal.py``) 1, 2, 3, ... An agent
    publishes an event again until the controller acknowledges its ``seq``
    (:class:`EventAck`), and the controller stores each (device, journal,
    seq) once, so replays cost nothing. Both are absent in events of agents
    older than the journal.
    """

    KIND: ClassVar[str] = "event"

    device_id: str
    kind: EventKind
    generation: int = 0
    deployment_id: str | None = None
    model: ModelRef | None = None
    error: ErrorInfo | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    at: float = 0.0
    journal: str | None = None
    seq: int | None = None
    extra: JSONDict = field(default_factory=dict, compare=False)

    def to_dict(self) -> JSONDict:
        numbered = {} if self.seq is None else {"journal": self.journal, "seq": self.seq}
        return {
            **numbered,
            "device_id": self.device_id,
            "kind": self.kind.value,
            "generation": self.generation,
            "deployment_id": self.deployment_id,
            "model": _opt(self.model),
            "error": _opt(self.error),
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        model = f.obj(d, "model", optional=True)
        error = f.obj(d, "error", optional=True)
        journal, seq = _journal_and_seq(d)
        return cls(
            device_id=f.device_id(d),
            kind=f.member(d, "kind", EventKind),
            generation=f.integer(d, "generation", optional=True, maximum=bounds.MAX_GENERATION)
            or 0,
            deployment_id=f.text(d, "deployment_id", optional=True, max_len=64),
            model=None if model is None else ModelRef.from_dict(model),
            error=None if error is None else ErrorInfo.from_dict(error),
            bytes_done=f.integer(d, "bytes_done", optional=True, maximum=bounds.MAX_COUNT),
            bytes_total=f.integer(d, "bytes_total", optional=True, maximum=bounds.MAX_COUNT),
            at=f.number(d, "at", optional=True, minimum=0.0) or 0.0,
            journal=journal,
            seq=seq,
            extra=_capped_extra(
                d,
                {
                    "journal",
                    "seq",
                    "device_id",
                    "kind",
                    "generation",
                    "deployment_id",
                    "model",
                    "error",
                    "bytes_done",
                    "bytes_total",
                    "at",
                },
            ),
        )


@dataclass(frozen=True)
class Telemetry(Message):
    """Aggregates over one interval of serving. QoS 0, not retained.

    ``requests``/``errors`` count inferences in this window only, so the
    controller can sum windows; ``rejected`` counts malformed messages the
    agent dropped since it started, by reason (reasons outside
    :data:`~edgefleet.protocols.bounds.KNOWN_REJECTION_REASONS` are parsed
    as ``other``).

    ``samples`` (rows inferred: the sum of the requests' batch sizes) and
    ``sample_latency_ms`` (sample-weighted percentiles of latency divided by
    batch size, see :mod:`edgefleet.agent.metrics`) are optional: agents
    before them leave them out and still validate, and the controller then
    judges health on ``latency_ms`` per request as before.
    """

    KIND: ClassVar[str] = "telemetry"

    device_id: str
    window_s: float
    requests: int
    errors: int
    latency_ms: LatencySummary | None
    model: ModelRef | None
    rss_bytes: int
    cpu_percent: float
    rejected: dict[str, int] = field(default_factory=dict)
    at: float = 0.0
    samples: int | None = None
    sample_latency_ms: LatencySummary | None = None
    extra: JSONDict = field(default_factory=dict, compare=False)

    def to_dict(self) -> JSONDict:
        out: JSONDict = {
            "device_id": self.device_id,
            "window_s": self.window_s,
            "requests": self.requests,
            "errors": self.errors,
            "latency_ms": _opt(self.latency_ms),
            "model": _opt(self.model),
            "rss_bytes": self.rss_bytes,
            "cpu_percent": self.cpu_percent,
            "rejected": dict(self.rejected),
            "at": self.at,
        }
        # Only when known, so a window reads the same as an older agent's.
        if self.samples is not None:
            out["samples"] = self.samples
        if self.sample_latency_ms is not None:
            out["sample_latency_ms"] = self.sample_latency_ms.to_dict()
        return out

    @classmethod
    def decode(cls, payload: bytes | bytearray | str) -> Telemetry:
        """Parse and validate one telemetry window (the hot message: see :func:`_fast_telemetry`).

        Raises:
            MessageError: as :meth:`Message.decode`, with the same messages.
        """
        if len(payload) <= MAX_MESSAGE_BYTES:
            fast = _fast_telemetry(payload)
            if fast is not None:
                return fast
        return cls.from_dict(decode(payload))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Telemetry:
        latency = f.obj(d, "latency_ms", optional=True)
        sample_latency = f.obj(d, "sample_latency_ms", optional=True)
        model = f.obj(d, "model", optional=True)
        rejected = f.obj(d, "rejected", optional=True) or {}
        if len(rejected) > 64 or not all(
            isinstance(k, str)
            and isinstance(v, int)
            and not isinstance(v, bool)
            and 0 <= v <= bounds.MAX_COUNT
            for k, v in rejected.items()
        ):
            raise MessageError(
                f"field 'rejected' must map reasons to counts in 0..{bounds.MAX_COUNT}"
            )
        requests = f.integer(d, "requests", maximum=bounds.MAX_COUNT)
        errors = f.integer(d, "errors", maximum=bounds.MAX_COUNT)
        if errors > requests:
            raise MessageError(f"field 'errors' ({errors}) exceeds 'requests' ({requests})")
        return cls(
            device_id=f.device_id(d),
            window_s=f.number(d, "window_s", minimum=0.0, maximum=bounds.MAX_WINDOW_S),
            requests=requests,
            errors=errors,
            latency_ms=None if latency is None else LatencySummary.from_dict(latency),
            model=None if model is None else ModelRef.from_dict(model),
            rss_bytes=f.integer(d, "rss_bytes", maximum=bounds.MAX_COUNT),
            cpu_percent=f.number(d, "cpu_percent", minimum=0.0, maximum=bounds.MAX_CPU_PERCENT),
            rejected=bounds.fold_reasons(rejected),
            at=f.number(d, "at", optional=True, minimum=0.0) or 0.0,
            samples=f.integer(d, "samples", optional=True, maximum=bounds.MAX_COUNT),
            sample_latency_ms=None
            if sample_latency is None
            else LatencySummary.from_dict(sample_latency),
            extra=f.extra(
                d,
                {
                    "device_id",
                    "window_s",
                    "requests",
                    "errors",
                    "latency_ms",
                    "model",
                    "rss_bytes",
                    "cpu_percent",
                    "rejected",
                    "at",
                    "samples",
                    "sample_latency_ms",
                },
            ),
        )


# --------------------------------------------------------------------------- fast telemetry
# Telemetry is most of what the controller receives (one window per device per
# interval). json.loads plus the field readers above cost ~17 us a window;
# msgspec decodes and type/range-checks the same JSON into typed structs in C
# in ~2 us. The fast path only ever *accepts*: any payload it does not fully
# accept (a type or range error, an unknown field - kept in ``extra`` only by
# the readers -, non-UTF-8 bytes, NaN, a cross-field rule) goes through
# ``Telemetry.from_dict``, so every error message is the readers' own, and a
# value the fast path returns is the one ``from_dict`` would build. msgspec
# is optional (the controller extra brings it); without it every window takes
# the readers' path.
try:
    import msgspec
except ImportError:  # pragma: no cover - exercised on installs without the controller extra
    msgspec = None  # type: ignore[assignment]

_fast_telemetry_decoder: Any = None
if msgspec is not None:
    from typing import Annotated

    _Count = Annotated[int, msgspec.Meta(ge=0, le=bounds.MAX_COUNT)]
    _Latency = Annotated[float, msgspec.Meta(ge=0.0, le=bounds.MAX_LATENCY_MS)]

    class _FastLatency(msgspec.Struct):
        p50: _Latency
        p95: _Latency
        p99: _Latency

    class _FastModel(msgspec.Struct):
        name: Annotated[str, msgspec.Meta(max_length=128)]
        version: Annotated[str, msgspec.Meta(max_length=64)]
        release: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
        target: Annotated[str, msgspec.Meta(max_length=512)]

    class _FastTelemetry(msgspec.Struct, forbid_unknown_fields=True):
        v: Annotated[int, msgspec.Meta(ge=1)]
        device_id: Annotated[str, msgspec.Meta(max_length=64)]
        window_s: Annotated[float, msgspec.Meta(ge=0.0, le=bounds.MAX_WINDOW_S)]
        requests: _Count
        errors: _Count
        rss_bytes: _Count
        cpu_percent: Annotated[float, msgspec.Meta(ge=0.0, le=bounds.MAX_CPU_PERCENT)]
        latency_ms: _FastLatency | None = None
        model: _FastModel | None = None
        rejected: Annotated[dict[str, _Count], msgspec.Meta(max_length=64)] | None = None
        at: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
        samples: _Count | None = None
        sample_latency_ms: _FastLatency | None = None

    _fast_telemetry_decoder = msgspec.json.Decoder(_FastTelemetry)


def _fast_latency(raw: Any) -> LatencySummary | None:
    """A latency summary; raises ``ValueError`` where ``LatencySummary.from_dict`` would refuse."""
    if raw is None:
        return None
    if not raw.p50 <= raw.p95 <= raw.p99:
        raise ValueError("unordered percentiles")
    return LatencySummary(p50=raw.p50, p95=raw.p95, p99=raw.p99)


def _fast_telemetry(payload: bytes | bytearray | str) -> Telemetry | None:
    """The window msgspec fully accepts, or ``None`` to take the readers' path."""
    if _fast_telemetry_decoder is None:
        return None
    try:
        raw = _fast_telemetry_decoder.decode(payload)
        if raw.errors > raw.requests or not DEVICE_ID_PATTERN.match(raw.device_id):
            return None
        model = raw.model
        return Telemetry(
            device_id=raw.device_id,
            window_s=raw.window_s,
            requests=raw.requests,
            errors=raw.errors,
            latency_ms=_fast_latency(raw.latency_ms),
            model=None
            if model is None
            else ModelRef(
                name=model.name, version=model.version, release=model.release, target=model.target
            ),
            rss_bytes=raw.rss_bytes,
            cpu_percent=raw.cpu_percent,
            rejected=bounds.fold_reasons(raw.rejected) if raw.rejected else {},
            at=raw.at or 0.0,
            samples=raw.samples,
            sample_latency_ms=_fast_latency(raw.sample_latency_ms),
        )
    except (msgspec.DecodeError, ValueError):  # ValidationError is a DecodeError
        return None


# A request may name at most this many ranges; agents coalesce missing blocks
# into ranges, so even a badly fragmented file needs few.
MAX_RANGES = 256
MIN_BLOCK_SIZE = 1024
MAX_BLOCK_SIZE = 1024 * 1024


@dataclass(frozen=True)
class FileRequest(Message):
    """An agent asks for blocks of one file from the controller's repository.

    ``path`` is relative to the repository (``metadata/timestamp.json``,
    ``targets/<hash>.<name>``). ``ranges`` lists half-open ``[start, end)``
    block-index ranges the agent still lacks; an empty list asks for the first
    window from block 0 when the agent does not yet know the file's size.
    ``request_id`` (32 hex chars) is echoed in every answering frame.
    """

    KIND: ClassVar[str] = "file_request"

    device_id: str
    request_id: str
    path: str
    block_size: int
    ranges: tuple[tuple[int, int], ...]
    extra: JSONDict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not (MIN_BLOCK_SIZE <= self.block_size <= MAX_BLOCK_SIZE):
            raise MessageError(
                f"block_size must be between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} bytes"
            )
        if len(self.request_id) != 32 or any(c not in "0123456789abcdef" for c in self.request_id):
            raise MessageError("request_id must be 32 lowercase hex characters")
        if not self.path or self.path.startswith("/") or ".." in self.path.split("/"):
            raise MessageError(f"path {self.path!r} must be relative and stay in the repository")
        if len(self.ranges) > MAX_RANGES:
            raise MessageError(f"at most {MAX_RANGES} block ranges per request")
        for start, end in self.ranges:
            if start < 0 or end <= start:
                raise MessageError(f"invalid block range [{start}, {end})")

    def to_dict(self) -> JSONDict:
        return {
            "device_id": self.device_id,
            "request_id": self.request_id,
            "path": self.path,
            "block_size": self.block_size,
            "ranges": [list(r) for r in self.ranges],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FileRequest:
        raw_ranges = f.get(d, "ranges", list, optional=True) or []
        ranges: list[tuple[int, int]] = []
        if len(raw_ranges) > MAX_RANGES:
            raise MessageError(f"at most {MAX_RANGES} block ranges per request")
        for item in raw_ranges:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            ):
                raise MessageError("each range must be a [start, end) pair of integers")
            ranges.append((item[0], item[1]))
        return cls(
            device_id=f.device_id(d),
            request_id=f.text(d, "request_id", max_len=32),
            path=f.text(d, "path", max_len=512),
            block_size=f.integer(d, "block_size", minimum=1),
            ranges=tuple(ranges),
            extra=f.extra(d, {"device_id", "request_id", "path", "block_size", "ranges"}),
        )

    def block_indices(self, limit: int) -> list[int]:
        """Expand the ranges into at most ``limit`` block indices, in order."""
        out: list[int] = []
        for start, end in self.ranges:
            for i in range(start, end):
                if len(out) >= limit:
                    return out
                out.append(i)
        return out


def _journal_and_seq(d: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """``journal`` and ``seq`` of an event or ack: both or neither, seq >= 1."""
    journal = f.text(d, "journal", optional=True, max_len=32)
    seq = f.integer(d, "seq", optional=True, minimum=1)
    if (journal is None) != (seq is None):
        raise MessageError("fields 'journal' and 'seq' go together")
    if journal is not None and not JOURNAL_ID_PATTERN.match(journal):
        raise MessageError("field 'journal' must be 8-32 lowercase hex characters")
    return journal, seq


JOURNAL_ID_PATTERN = re.compile(r"^[0-9a-f]{8,32}$")


@dataclass(frozen=True)
class EventAck(Message):
    """The controller holds every event of ``journal`` up to ``seq``. QoS 1, not retained.

    Published on ``devices/{id}/events/ack`` after each stored batch with the
    highest *contiguous* ``seq`` stored (a gap means an event is still
    missing, and the agent must keep it); the agent then forgets those
    events. Repeats and stale acks are harmless: the agent ignores an ack at
    or below what it already dropped.
    """

    KIND: ClassVar[str] = "event_ack"

    device_id: str
    journal: str
    seq: int
    extra: JSONDict = field(default_factory=dict, compare=False)

    def to_dict(self) -> JSONDict:
        return {"device_id": self.device_id, "journal": self.journal, "seq": self.seq}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EventAck:
        journal, seq = _journal_and_seq(d)
        if journal is None or seq is None:
            raise MessageError("an event ack needs 'journal' and 'seq'")
        return cls(
            device_id=f.device_id(d),
            journal=journal,
            seq=seq,
            extra=f.extra(d, {"device_id", "journal", "seq"}),
        )
