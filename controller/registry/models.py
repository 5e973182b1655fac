"""The registry's tables as SQLAlchemy 2.0 typed ORM classes.

These classes are the schema's source of truth for *reading and writing*; the
schema itself is created only by the Alembic migrations in
``migrations/versions``, and a test checks that the two agree. Nothing outside
:mod:`edgefleet.controller.registry` should use these classes: the
:class:`~edgefleet.controller.registry.store.Registry` returns frozen
dataclasses instead, so no caller ever holds a session-bound object across
threads.

Portability rules that every column here follows, because the same schema must
work on SQLite (the default, a file next to the controller) and PostgreSQL:

* timestamps are :class:`UTCDateTime`: always timezone-aware UTC in Python,
  whatever the database does with time zones;
* string columns have lengths that match the protocol's own limits, so
  PostgreSQL never rejects what SQLite would silently accept;
* high-volume tables get 64-bit keys on PostgreSQL but stay ``INTEGER`` on
  SQLite, where only an ``INTEGER PRIMARY KEY`` autoincrements;
* constraints follow :data:`NAMING_CONVENTION`, so migrations can name (and
  later drop or alter) them identically on both databases.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "NAMING_CONVENTION",
    "ApiToken",
    "Base",
    "Bundle",
    "Counter",
    "Deployment",
    "DeploymentTarget",
    "DesiredStateRecord",
    "Device",
    "DeviceEvent",
    "EventJournalMark",
    "Model",
    "ModelVersion",
    "Rollout",
    "RolloutDecision",
    "RolloutDevice",
    "TelemetryMinute",
    "TelemetryRecord",
    "UTCDateTime",
    "from_epoch",
    "utcnow",
]

# Deterministic constraint names: without them PostgreSQL and SQLite invent
# different names and a later migration could not drop a constraint portably.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# A 64-bit key on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is an alias of
# the rowid (and so autoincrements), and it is 64-bit there anyway.
BigIntKey = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# ``None`` must be SQL NULL rather than the JSON literal ``null``, so that
# "IS NULL" means "absent" on every database.
NullableJSON = sa.JSON(none_as_null=True)


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def from_epoch(ts: float, fallback: datetime) -> datetime:
    """Convert an agent's epoch timestamp, or use ``fallback`` if unset or absurd."""
    if ts <= 0:
        return fallback
    try:
        return datetime.fromtimestamp(ts, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return fallback


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that is always an aware UTC ``datetime`` in Python.

    PostgreSQL stores ``timestamptz`` and returns aware values in the session's
    time zone; SQLite has no time zone support and returns naive values. This
    type normalizes both directions so that comparisons and arithmetic in the
    controller never mix naive and aware datetimes.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes and store UTC.

        Raises:
            ValueError: ``value`` is naive; its time zone would be a guess.
        """
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"refusing to store naive datetime {value!r}; use UTC")
        value = value.astimezone(timezone.utc)
        # SQLite's DATETIME storage format has no offset; store the UTC wall time.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime whatever the database handed back."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base carrying the shared metadata and naming convention."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


# --------------------------------------------------------------------------- models
class Model(Base):
    """A model name; the owner of the per-name release counter.

    ``last_release`` is stored rather than computed as ``max(release)`` so that
    releases keep increasing even if a version row were ever deleted: agents
    refuse any release lower than the one they run (rollback protection).
    """

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), unique=True)
    last_release: Mapped[int] = mapped_column(sa.Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ModelVersion(Base):
    """One version of a model, with its release counter and I/O signature."""

    __tablename__ = "model_versions"
    __table_args__ = (
        sa.UniqueConstraint("model_id", "version"),
        # Belt and braces for the release counter: two versions of one model can
        # never share a release, even if the counter logic had a race.
        sa.UniqueConstraint("model_id", "release"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(sa.ForeignKey("models.id"))
    version: Mapped[str] = mapped_column(sa.String(64))
    release: Mapped[int] = mapped_column(sa.Integer)
    source_sha256: Mapped[str] = mapped_column(sa.String(64))
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON)
    outputs: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON)
    description: Mapped[str] = mapped_column(sa.Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    # Every read of a version needs its model's name, so load it in the same query.
    model: Mapped[Model] = relationship(lazy="joined")


class Bundle(Base):
    """A built bundle of one model version for one hardware class and runtime.

    ``target_path`` is the TUF target path; it is unique because an agent
    identifies what to download by it alone.
    """

    __tablename__ = "bundles"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(sa.ForeignKey("model_versions.id"), index=True)
    hardware_class: Mapped[str] = mapped_column(sa.String(64))
    runtime: Mapped[str] = mapped_column(sa.String(32))
    precision: Mapped[str] = mapped_column(sa.String(16))
    target_path: Mapped[str] = mapped_column(sa.String(512), unique=True)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    length: Mapped[int] = mapped_column(sa.BigInteger)
    report: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # A re-issue (migration 0003) signs the bytes of bundle ``reissue_of`` again
    # under a new target path with a newer ``release``, so agents that refuse
    # older releases accept going back to it. NULL: the version's own release.
    release: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    reissue_of: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)


# --------------------------------------------------------------------------- devices
class Device(Base):
    """An enrolled device and the last state it reported.

    The hardware columns start empty at enrollment and are filled from the
    agent's reports; ``reported`` keeps the whole last report so fields this
    controller does not model yet are not lost.
    """

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    hardware_class: Mapped[str] = mapped_column(sa.String(64))
    arch: Mapped[str] = mapped_column(sa.String(64), default="")
    cpu_features: Mapped[list[str]] = mapped_column(sa.JSON)
    runtimes: Mapped[list[str]] = mapped_column(sa.JSON)
    tags: Mapped[list[str]] = mapped_column(sa.JSON)
    online: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    reported: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON, nullable=True)
    state: Mapped[str | None] = mapped_column(sa.String(16), nullable=True)
    active_model: Mapped[str | None] = mapped_column(sa.String(128), nullable=True)
    active_version: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    active_release: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    last_error: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON, nullable=True)
    # The compiler profile matched from the reported hardware (migration 0002).
    profile: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)


# --------------------------------------------------------------------------- deployments
class Deployment(Base):
    """One operator request: roll a model version out to a set of devices."""

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    model_version_id: Mapped[int] = mapped_column(sa.ForeignKey("model_versions.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    status: Mapped[str] = mapped_column(sa.String(16))


class DeploymentTarget(Base):
    """Which bundle a deployment chose for one device, at which generation."""

    __tablename__ = "deployment_targets"

    deployment_id: Mapped[str] = mapped_column(sa.ForeignKey("deployments.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(
        sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    bundle_id: Mapped[int] = mapped_column(sa.ForeignKey("bundles.id"))
    generation: Mapped[int] = mapped_column(sa.Integer)


class DesiredStateRecord(Base):
    """The current desired state of one device, and how far it was published.

    ``generation`` increases with every change; ``published_generation`` is
    the highest generation the controller has published (retained) to the
    broker, so a restarted controller republishes exactly the rows where the
    two differ.
    """

    __tablename__ = "desired_states"

    device_id: Mapped[str] = mapped_column(
        sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    generation: Mapped[int] = mapped_column(sa.Integer)
    deployment_id: Mapped[str | None] = mapped_column(
        sa.ForeignKey("deployments.id"), nullable=True
    )
    bundle_id: Mapped[int | None] = mapped_column(sa.ForeignKey("bundles.id"), nullable=True)
    published_generation: Mapped[int] = mapped_column(
        sa.Integer, default=0, server_default=sa.text("0")
    )
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# --------------------------------------------------------------------------- ingest
class DeviceEvent(Base):
    """One event an agent emitted while working on a desired state.

    ``deployment_id`` is what the agent *said*, so it is not a foreign key: a
    confused or stale agent must not make ingest fail.
    """

    __tablename__ = "device_events"
    __table_args__ = (
        sa.Index(None, "device_id", "id"),
        # An event's identity (migration 0005): a replayed or retained copy
        # is stored once. NULLs (events of agents without a journal) are
        # distinct on every database, so those are never collapsed.
        sa.Index(None, "device_id", "journal", "seq", unique=True),
    )

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    device_id: Mapped[str] = mapped_column(sa.ForeignKey("devices.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(sa.String(32))
    deployment_id: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    generation: Mapped[int] = mapped_column(sa.Integer, default=0)
    error: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON, nullable=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    journal: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)
    seq: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)


class EventJournalMark(Base):
    """How far the controller holds a device's event journal without a gap (migration 0005).

    ``acked_seq`` is what the controller acknowledges on ``events/ack``: every
    event of ``journal`` numbered 1..``acked_seq`` is stored. A device whose
    journal is new (its state directory was re-created) starts again at 0.
    """

    __tablename__ = "event_journals"

    device_id: Mapped[str] = mapped_column(
        sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    journal: Mapped[str] = mapped_column(sa.String(32))
    acked_seq: Mapped[int] = mapped_column(sa.BigInteger, default=0)


class TelemetryRecord(Base):
    """One telemetry window of one device.

    Latency percentiles are NULL for windows without requests, so summaries can
    pick the newest window that actually measured something.
    """

    __tablename__ = "telemetry"
    __table_args__ = (sa.Index(None, "device_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    device_id: Mapped[str] = mapped_column(sa.ForeignKey("devices.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    window_s: Mapped[float] = mapped_column(sa.Double)
    requests: Mapped[int] = mapped_column(sa.BigInteger)
    errors: Mapped[int] = mapped_column(sa.BigInteger)
    p50_ms: Mapped[float | None] = mapped_column(sa.Double, nullable=True)
    p95_ms: Mapped[float | None] = mapped_column(sa.Double, nullable=True)
    p99_ms: Mapped[float | None] = mapped_column(sa.Double, nullable=True)
    model_version: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    rss_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    cpu_percent: Mapped[float] = mapped_column(sa.Double)
    # Per-sample figures (migration 0004); NULL from agents that do not report them.
    samples: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    sample_p95_ms: Mapped[float | None] = mapped_column(sa.Double, nullable=True)


class Counter(Base):
    """A named monotonic counter (messages rejected, blocks served, ...)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    value: Mapped[int] = mapped_column(sa.BigInteger, default=0)


# --------------------------------------------------------------------------- rollouts
class Rollout(Base):
    """A staged rollout of one model version to a selection of devices (migration 0003).

    Everything the rollout engine knows lives in this row, its
    :class:`RolloutDevice` rows and its decision log, so a controller killed
    at any point resumes exactly where the last committed step left off.
    ``selector`` says which devices belong (ids, tags, profiles or all) and
    ``config`` holds the strategy (canary, waves, thresholds, timeouts). The
    forward deployment's id equals the rollout's id, so a device can be
    started at most once (``deployment_targets`` is keyed by deployment and
    device).
    """

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    model_version_id: Mapped[int] = mapped_column(sa.ForeignKey("model_versions.id"), index=True)
    status: Mapped[str] = mapped_column(sa.String(16), index=True)
    selector: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    config: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    wave: Mapped[int] = mapped_column(sa.Integer, default=0)
    wave_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    next_wave_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    reason: Mapped[str] = mapped_column(sa.Text, default="")
    steps: Mapped[int] = mapped_column(sa.Integer, default=0)


class RolloutDevice(Base):
    """One device's progress through one rollout.

    ``previous_bundle_id`` is the bundle the device ran when it was started:
    what a rollback re-issues. ``telemetry_mark`` is the newest telemetry id
    when observation began; health is judged only from windows after it, so
    device clock skew cannot smuggle old windows into the judgement.
    """

    __tablename__ = "rollout_devices"
    __table_args__ = (sa.Index(None, "rollout_id", "state"),)

    rollout_id: Mapped[str] = mapped_column(sa.ForeignKey("rollouts.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(
        sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    state: Mapped[str] = mapped_column(sa.String(16))
    wave: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    generation: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    bundle_id: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    previous_bundle_id: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    baseline_p95_ms: Mapped[float | None] = mapped_column(sa.Double, nullable=True)
    telemetry_mark: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    rollback_deployment_id: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)
    rollback_generation: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    rollback_bundle_id: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    joined_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    state_since: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    observed_p95_ms: Mapped[float | None] = mapped_column(sa.Double, nullable=True)
    observed_requests: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    observed_errors: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    reason: Mapped[str] = mapped_column(sa.Text, default="")
    # The previous version's per-sample p95 and the load it was measured under
    # (mean batch, requests/s), taken at start (migration 0004).
    baseline_sample_p95_ms: Mapped[float | None] = mapped_column(sa.Double, nullable=True)
    baseline_batch: Mapped[float | None] = mapped_column(sa.Double, nullable=True)
    baseline_rate_rps: Mapped[float | None] = mapped_column(sa.Double, nullable=True)


class RolloutDecision(Base):
    """One decision of a rollout, with its reason: the story ``rollout show`` tells."""

    __tablename__ = "rollout_decisions"
    __table_args__ = (sa.Index(None, "rollout_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    rollout_id: Mapped[str] = mapped_column(sa.ForeignKey("rollouts.id"))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    kind: Mapped[str] = mapped_column(sa.String(32))
    device_id: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    wave: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    actor: Mapped[str] = mapped_column(sa.String(128), default="")
    reason: Mapped[str] = mapped_column(sa.Text, default="")


class TelemetryMinute(Base):
    """Per-minute telemetry aggregate of one device and model version.

    Raw windows roll up into these rows and are then deleted after their
    retention; minutes are kept for their own, longer retention. Every column
    is a sum or a max, so folding more windows into a minute is associative
    (late windows and several controllers rolling up are harmless).
    ``p95_weighted_ms`` is the sum of ``p95 * requests`` over windows that
    measured latency, ``p95_weight`` the sum of their requests.
    """

    __tablename__ = "telemetry_minutes"

    device_id: Mapped[str] = mapped_column(
        sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    minute: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True, index=True)
    model_version: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    windows: Mapped[int] = mapped_column(sa.Integer)
    requests: Mapped[int] = mapped_column(sa.BigInteger)
    errors: Mapped[int] = mapped_column(sa.BigInteger)
    p95_weighted_ms: Mapped[float] = mapped_column(sa.Double)
    p95_weight: Mapped[int] = mapped_column(sa.BigInteger)
    p95_max_ms: Mapped[float | None] = mapped_column(sa.Double, nullable=True)
    rss_max_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    cpu_percent_sum: Mapped[float] = mapped_column(sa.Double)


# --------------------------------------------------------------------------- api
class ApiToken(Base):
    """A management-API token (migration 0006): only a hash of its secret is stored.

    A token reads ``eft_<id>_<secret>``; ``id`` is public (it names the token
    in listings and finds its row), ``secret_sha256`` is the SHA-256 of the
    whole token, compared in constant time. A revoked token keeps its row,
    so listings show who had access until when.
    """

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128))
    role: Mapped[str] = mapped_column(sa.String(16))
    secret_sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
