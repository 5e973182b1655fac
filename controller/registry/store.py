"""The registry API: everything the controller persists, behind one class.

:class:`Registry` is the only way the rest of the controller touches the
database. It is called from several threads (the CLI, the MQTT ingest loop,
the desired-state publisher), so:

* every method runs in its own short transaction and returns frozen
  dataclasses, never ORM objects that would tie a caller to a session;
* writes that read-then-write take locks up front: ``BEGIN IMMEDIATE`` on
  SQLite (a deferred transaction that later wants to write can fail with
  "database is locked" even with a busy timeout, because SQLite cannot upgrade
  a stale read snapshot), ``SELECT ... FOR UPDATE`` on PostgreSQL;
* the few writes that may race to *create* the same row (a new model name, a
  new counter) retry on a unique-constraint violation.

SQLite runs in WAL mode with foreign keys on and a busy timeout, so readers
never block the writer and short write bursts queue instead of failing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from edgefleet.controller.errors import (
    DuplicateError,
    NoMatchingBundleError,
    NotFoundError,
    RegistryError,
)
from edgefleet.controller.registry import migrations
from edgefleet.controller.registry import models as m
from edgefleet.protocols.bundle import TensorSpec
from edgefleet.protocols.messages import (
    AgentState,
    DesiredState,
    ErrorInfo,
    Event,
    ModelRef,
    ReportedState,
    Telemetry,
)
from edgefleet.protocols.topics import validate_device_id

__all__ = [
    "DEFAULT_DB_FILENAME",
    "GENERIC_HARDWARE_CLASS",
    "BundleInfo",
    "DeploymentInfo",
    "DeploymentTargetInfo",
    "DeviceInfo",
    "DeviceSummary",
    "EventInfo",
    "FleetStatus",
    "ModelVersionInfo",
    "Registry",
    "TelemetryInfo",
    "sqlite_url",
]

DEFAULT_DB_FILENAME = "registry.db"
# Bundles of this class run anywhere the runtime does; they are the fallback
# when a model version has no bundle built for a device's own class.
GENERIC_HARDWARE_CLASS = "generic"
DEPLOYMENT_ACTIVE = "active"

# Long enough to ride out a burst of ingest writes, short enough that a wedged
# writer surfaces as an error instead of a hung controller.
SQLITE_BUSY_TIMEOUT_MS = 15_000
# How often a write that lost a create-race is retried before giving up.
_CREATE_RACE_ATTEMPTS = 3
# Execution option that makes the SQLite "begin" hook take the write lock.
_IMMEDIATE = "edgefleet_sqlite_immediate"

T = TypeVar("T")


# --------------------------------------------------------------------------- results
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


# --------------------------------------------------------------------------- helpers
def sqlite_url(path: str | Path) -> str:
    """Return the SQLAlchemy URL of a SQLite database file at ``path``."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def _text(value: str, what: str, max_len: int) -> str:
    """Check a string destined for a ``VARCHAR(max_len)`` column.

    PostgreSQL rejects over-long strings while SQLite stores them, so the limit
    is enforced here to make both databases behave the same.
    """
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise RegistryError(f"{what} must be 1-{max_len} characters, got {value!r}")
    return value


def _from_epoch(ts: float, fallback: datetime) -> datetime:
    """Convert an agent's epoch timestamp, or use ``fallback`` if unset or absurd."""
    if ts <= 0:
        return fallback
    try:
        return datetime.fromtimestamp(ts, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return fallback


def _error(d: Mapping[str, Any] | None) -> ErrorInfo | None:
    if not d:
        return None
    return ErrorInfo(code=str(d.get("code", "")), message=str(d.get("message", "")))


def _model_version_info(row: m.ModelVersion) -> ModelVersionInfo:
    return ModelVersionInfo(
        id=row.id,
        name=row.model.name,
        version=row.version,
        release=row.release,
        source_sha256=row.source_sha256,
        inputs=tuple(TensorSpec.from_dict(d) for d in row.inputs),
        outputs=tuple(TensorSpec.from_dict(d) for d in row.outputs),
        description=row.description,
        created_at=row.created_at,
    )


def _bundle_info(row: m.Bundle) -> BundleInfo:
    return BundleInfo(
        id=row.id,
        model_version_id=row.model_version_id,
        hardware_class=row.hardware_class,
        runtime=row.runtime,
        precision=row.precision,
        target_path=row.target_path,
        sha256=row.sha256,
        length=row.length,
        report=row.report,
        created_at=row.created_at,
        release=row.release,
        reissue_of=row.reissue_of,
    )


def _device_info(row: m.Device) -> DeviceInfo:
    return DeviceInfo(
        id=row.id,
        hardware_class=row.hardware_class,
        arch=row.arch,
        cpu_features=tuple(row.cpu_features),
        runtimes=tuple(row.runtimes),
        tags=tuple(row.tags),
        online=row.online,
        last_seen=row.last_seen,
        enrolled_at=row.enrolled_at,
        state=row.state,
        active_model=row.active_model,
        active_version=row.active_version,
        active_release=row.active_release,
        last_error=_error(row.last_error),
        reported=row.reported,
        profile=row.profile,
    )


def _event_info(row: m.DeviceEvent) -> EventInfo:
    return EventInfo(
        id=row.id,
        device_id=row.device_id,
        kind=row.kind,
        deployment_id=row.deployment_id,
        generation=row.generation,
        error=_error(row.error),
        detail=row.detail,
        at=row.at,
    )


def _telemetry_info(row: m.TelemetryRecord) -> TelemetryInfo:
    return TelemetryInfo(
        id=row.id,
        device_id=row.device_id,
        at=row.at,
        window_s=row.window_s,
        requests=row.requests,
        errors=row.errors,
        p50_ms=row.p50_ms,
        p95_ms=row.p95_ms,
        p99_ms=row.p99_ms,
        model_version=row.model_version,
        rss_bytes=row.rss_bytes,
        cpu_percent=row.cpu_percent,
    )


def _rowcount(result: sa.Result[Any]) -> int:
    """Rows matched by an UPDATE run through a session.

    ``Session.execute`` is typed to return a plain ``Result``; for DML it is a
    ``CursorResult``, which is what carries ``rowcount``.
    """
    return cast("sa.CursorResult[Any]", result).rowcount


def _pick_bundle(device: m.Device, bundles: Sequence[m.Bundle]) -> m.Bundle | None:
    """Choose the bundle for a device: its matched profile, its own class, else generic.

    Among several bundles of the chosen class, one for a runtime the device
    reported having wins; ties go to the oldest bundle, so the choice is
    stable across deployments.
    """
    for hardware_class in (device.profile, device.hardware_class, GENERIC_HARDWARE_CLASS):
        if hardware_class is None:
            continue
        candidates = [b for b in bundles if b.hardware_class == hardware_class]
        if candidates:
            return min(candidates, key=lambda b: (b.runtime not in device.runtimes, b.id))
    return None


def _model_ref(model: m.Model, version: m.ModelVersion, bundle: m.Bundle) -> ModelRef:
    # A re-issued bundle carries its own, newer release (see models.Bundle).
    release = version.release if bundle.release is None else bundle.release
    return ModelRef(
        name=model.name, version=version.version, release=release, target=bundle.target_path
    )


def assign_desired(
    s: Session,
    deployment_id: str,
    version: m.ModelVersion,
    chosen: Mapping[str, m.Bundle],
    now: datetime,
) -> list[DeploymentTargetInfo]:
    """Point each device's desired state at its chosen bundle, inside ``s``.

    Bumps every device's generation and records a deployment target. The
    caller must have created the deployment row and locked the device rows;
    :meth:`Registry.create_deployment` and the rollout engine share this.
    """
    ids = sorted(chosen)
    desired = {
        d.device_id: d
        for d in s.scalars(
            sa.select(m.DesiredStateRecord).where(m.DesiredStateRecord.device_id.in_(ids))
        )
    }
    targets: list[DeploymentTargetInfo] = []
    for device_id in ids:
        bundle = chosen[device_id]
        record = desired.get(device_id)
        if record is None:
            record = m.DesiredStateRecord(device_id=device_id, generation=0, published_generation=0)
            s.add(record)
        record.generation += 1
        record.deployment_id = deployment_id
        record.bundle_id = bundle.id
        record.updated_at = now
        s.add(
            m.DeploymentTarget(
                deployment_id=deployment_id,
                device_id=device_id,
                bundle_id=bundle.id,
                generation=record.generation,
            )
        )
        targets.append(
            DeploymentTargetInfo(
                device_id=device_id,
                generation=record.generation,
                model=_model_ref(version.model, version, bundle),
                bundle_id=bundle.id,
            )
        )
    return targets


# --------------------------------------------------------------------------- engine
def _prepare_sqlite(url: URL) -> None:
    """Refuse in-memory databases and create a database file's parent dirs.

    An in-memory SQLite database exists per connection, so a pooled,
    multi-threaded registry would silently see different, empty databases.
    """
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        raise RegistryError(
            f"registry database {url.render_as_string(hide_password=True)!r} is in memory;"
            " the registry needs a file (use sqlite:///path/to/registry.db)"
        )
    if database.startswith("file:"):  # an sqlite URI; leave it to sqlite
        return
    try:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RegistryError(
            f"cannot create the directory of registry database {database!r}: {exc}"
        ) from exc


def _create_engine(url: URL) -> Engine:
    """Create the engine, with SQLite's connection pragmas and BEGIN handling."""
    if url.get_backend_name() != "sqlite":
        # pool_pre_ping: the controller runs for weeks; PostgreSQL restarts.
        return sa.create_engine(url, pool_pre_ping=True)

    _prepare_sqlite(url)
    engine = sa.create_engine(url, connect_args={"check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop the sqlite3 module from issuing its own BEGIN (it skips SELECTs
        # and DDL); the "begin" hook below issues the right one instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


# --------------------------------------------------------------------------- registry
class Registry:
    """The controller's persistent state: models, devices, deployments, ingest.

    Args:
        url: a SQLAlchemy database URL, e.g. ``sqlite:////var/lib/edgefleet/registry.db``
            or ``postgresql+psycopg://user@host/db``.
        migrate: run ``alembic upgrade head`` before use. Turn off only when
            something else manages the schema.

    Raises:
        RegistryError: the URL is invalid or in-memory, the database cannot be
            reached, or its schema is newer than this code.
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        try:
            parsed = sa.make_url(url)
        except ArgumentError as exc:
            raise RegistryError(f"invalid registry database URL: {exc}") from exc
        self._url_text = parsed.render_as_string(hide_password=True)
        try:
            self._engine = _create_engine(parsed)
        except ArgumentError as exc:  # includes an unknown dialect or driver
            raise RegistryError(f"cannot use registry database {self._url_text}: {exc}") from exc
        except ImportError as exc:
            raise RegistryError(
                f"the driver for registry database {self._url_text} is not installed: {exc}"
            ) from exc
        # Same pool and hooks; connections from it take the SQLite write lock up front.
        self._write_engine = self._engine.execution_options(**{_IMMEDIATE: True})
        self._reader = sessionmaker(self._engine, expire_on_commit=False)
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)
        try:
            with self._write_engine.begin() as connection:
                if migrate:
                    migrations.upgrade(connection)
        except DBAPIError as exc:
            # OperationalError for an unreachable server or locked file, plain
            # DatabaseError for a file that is not a SQLite database at all.
            self._engine.dispose()
            raise RegistryError(
                f"cannot open registry database {self._url_text}: {exc.orig}"
            ) from exc
        except CommandError as exc:
            self._engine.dispose()
            raise RegistryError(
                f"cannot migrate registry database {self._url_text} (is it from a newer"
                f" edgefleet?): {exc}"
            ) from exc

    @property
    def url(self) -> str:
        """The database URL with any password masked, for logs and messages."""
        return self._url_text

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for health checks and tests; not for queries."""
        return self._engine

    def close(self) -> None:
        """Close all pooled connections; the registry must not be used afterwards."""
        self._engine.dispose()

    # ----------------------------------------------------------------------- sessions
    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reader() as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._writer() as session, session.begin():
            yield session

    def _write_retrying(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in a write transaction, retrying if it lost a create race.

        Two threads (or controllers) may both find a row missing and both
        insert it; the loser gets an ``IntegrityError`` and, on retry, finds
        the row. ``work`` must check for *expected* duplicates itself (and
        raise :class:`DuplicateError`), so that only races reach this loop.
        The race is only possible on PostgreSQL: on SQLite every write
        transaction holds the database's write lock from its first statement.
        """
        for attempt in range(1, _CREATE_RACE_ATTEMPTS + 1):
            try:
                with self._write() as session:
                    return work(session)
            except IntegrityError:
                if attempt == _CREATE_RACE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    # ----------------------------------------------------------------------- models
    def register_model_version(
        self,
        name: str,
        version: str,
        *,
        source_sha256: str,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        description: str = "",
    ) -> ModelVersionInfo:
        """Register a new version of a model, creating the model on first use.

        The version gets ``release`` = the model's highest release so far + 1.
        The counter lives on the model row and is bumped under that row's lock,
        so releases are unique and only ever increase, even with concurrent
        registrations.

        Raises:
            DuplicateError: this name and version are registered already.
            RegistryError: a name, version or hash is empty or too long.
        """
        _text(name, "model name", 128)
        _text(version, "model version", 64)
        _text(source_sha256, "source sha256", 64)
        inputs_json = [spec.to_dict() for spec in inputs]
        outputs_json = [spec.to_dict() for spec in outputs]

        def work(s: Session) -> ModelVersionInfo:
            model = s.scalars(
                sa.select(m.Model).where(m.Model.name == name).with_for_update()
            ).one_or_none()
            if model is None:
                model = m.Model(name=name, last_release=0)
                s.add(model)
                s.flush()
            elif s.scalar(
                sa.select(m.ModelVersion.id).where(
                    m.ModelVersion.model_id == model.id, m.ModelVersion.version == version
                )
            ):
                raise DuplicateError(f"model version {name}@{version} is already registered")
            model.last_release += 1
            row = m.ModelVersion(
                model=model,
                version=version,
                release=model.last_release,
                source_sha256=source_sha256,
                inputs=inputs_json,
                outputs=outputs_json,
                description=description,
            )
            s.add(row)
            s.flush()
            return _model_version_info(row)

        return self._write_retrying(work)

    def add_bundle(
        self,
        model_version_id: int,
        *,
        hardware_class: str,
        runtime: str,
        precision: str,
        target_path: str,
        sha256: str,
        length: int,
        report: dict[str, Any] | None = None,
    ) -> BundleInfo:
        """Record a built bundle of a model version.

        Raises:
            NotFoundError: the model version does not exist.
            DuplicateError: a bundle with this TUF target path exists already.
        """
        _text(hardware_class, "hardware class", 64)
        _text(runtime, "runtime", 32)
        _text(precision, "precision", 16)
        _text(target_path, "target path", 512)
        _text(sha256, "bundle sha256", 64)

        def work(s: Session) -> BundleInfo:
            if s.get(m.ModelVersion, model_version_id) is None:
                raise NotFoundError(f"model version id {model_version_id} does not exist")
            if s.scalar(sa.select(m.Bundle.id).where(m.Bundle.target_path == target_path)):
                raise DuplicateError(f"a bundle with target path {target_path!r} exists already")
            row = m.Bundle(
                model_version_id=model_version_id,
                hardware_class=hardware_class,
                runtime=runtime,
                precision=precision,
                target_path=target_path,
                sha256=sha256,
                length=length,
                report=report,
            )
            s.add(row)
            s.flush()
            return _bundle_info(row)

        # A concurrent add of the same path loses the insert and, retried, is a duplicate.
        return self._write_retrying(work)

    def get_model_version(self, name: str, version: str) -> ModelVersionInfo:
        """Return a model version by name and version.

        Raises:
            NotFoundError: no such model version.
        """
        with self._read() as s:
            row = s.scalars(
                sa.select(m.ModelVersion)
                .join(m.ModelVersion.model)
                .where(m.Model.name == name, m.ModelVersion.version == version)
            ).one_or_none()
            if row is None:
                raise NotFoundError(f"model version {name}@{version} does not exist")
            return _model_version_info(row)

    def list_model_versions(self, name: str | None = None) -> list[ModelVersionInfo]:
        """List model versions, newest first.

        For one model that is descending release; across models it is
        registration order, which agrees with release order within each model.
        """
        stmt = sa.select(m.ModelVersion).join(m.ModelVersion.model)
        if name is not None:
            stmt = stmt.where(m.Model.name == name)
        stmt = stmt.order_by(m.ModelVersion.id.desc())
        with self._read() as s:
            return [_model_version_info(row) for row in s.scalars(stmt)]

    def bundles_for(self, model_version_id: int) -> list[BundleInfo]:
        """List the bundles of a model version, oldest first."""
        with self._read() as s:
            rows = s.scalars(
                sa.select(m.Bundle)
                .where(m.Bundle.model_version_id == model_version_id)
                .order_by(m.Bundle.id)
            )
            return [_bundle_info(row) for row in rows]

    # ----------------------------------------------------------------------- devices
    def enroll_device(
        self,
        device_id: str,
        *,
        hardware_class: str = GENERIC_HARDWARE_CLASS,
        tags: Sequence[str] = (),
    ) -> DeviceInfo:
        """Enroll a device so that the controller accepts its messages.

        Raises:
            TopicError: the id is not a valid device id (it becomes an MQTT
                topic level and a file name).
            DuplicateError: the device is enrolled already.
        """
        validate_device_id(device_id)
        _text(hardware_class, "hardware class", 64)

        def work(s: Session) -> DeviceInfo:
            if s.get(m.Device, device_id) is not None:
                raise DuplicateError(f"device {device_id!r} is already enrolled")
            row = m.Device(
                id=device_id,
                hardware_class=hardware_class,
                arch="",
                cpu_features=[],
                runtimes=[],
                tags=list(tags),
                online=False,
            )
            s.add(row)
            s.flush()
            return _device_info(row)

        # A concurrent enrollment of the same id loses the insert and, retried, is a duplicate.
        return self._write_retrying(work)

    def get_device(self, device_id: str) -> DeviceInfo | None:
        """Return a device, or ``None`` if it is not enrolled."""
        with self._read() as s:
            row = s.get(m.Device, device_id)
            return None if row is None else _device_info(row)

    def list_devices(self) -> list[DeviceInfo]:
        """List all enrolled devices by id."""
        with self._read() as s:
            return [
                _device_info(row) for row in s.scalars(sa.select(m.Device).order_by(m.Device.id))
            ]

    def record_reported(self, reported: ReportedState, *, profile: str | None = None) -> bool:
        """Store a device's reported state.

        Updates hardware, agent state, active model, last error and last-seen
        time, and keeps the whole report. It does not touch ``online``: brokers
        replay retained reports of devices that are long gone, so only the
        status channel (with its last will) says whether a device is online.

        When ``profile`` (matched by the controller from the reported
        hardware) differs from the stored one and the device's desired bundle
        is no longer the best fit among its model version's bundles, the
        desired state is re-targeted (new generation, unpublished): a device
        deployed to before it ever reported gets its own variant, not the
        generic fallback.

        Returns:
            ``False``, writing nothing, if the device is not enrolled.
        """
        with self._write() as s:
            row = s.get(m.Device, reported.device_id)
            if row is None:
                return False
            stored_at = (row.reported or {}).get("updated_at")
            if isinstance(stored_at, int | float) and reported.updated_at < stored_at:
                # An older report arriving late (several controllers share the
                # ingestion, or the broker replayed a retained one) must not
                # overwrite a newer state; the agent stamps every report.
                return True
            hardware = reported.hardware
            profile_changed = (
                profile is not None and profile != row.profile
            ) or hardware.hardware_class != row.hardware_class
            row.hardware_class = hardware.hardware_class
            if profile is not None:
                row.profile = profile
            row.arch = hardware.arch
            row.cpu_features = list(hardware.cpu_features)
            row.runtimes = list(hardware.runtimes)
            row.state = reported.state.value
            active = reported.active
            row.active_model = None if active is None else active.name
            row.active_version = None if active is None else active.version
            row.active_release = None if active is None else active.release
            row.last_error = None if reported.last_error is None else reported.last_error.to_dict()
            row.reported = json.loads(reported.encode())
            row.last_seen = m.utcnow()
            if profile_changed:
                self._retarget(s, row)
            return True

    @staticmethod
    def _retarget(s: Session, device: m.Device) -> bool:
        """Point the device's desired state at the best bundle of the same version."""
        record = s.get(m.DesiredStateRecord, device.id)
        if record is None or record.bundle_id is None:
            return False
        current = s.get(m.Bundle, record.bundle_id)
        if current is None:
            return False
        bundles = list(
            s.scalars(
                sa.select(m.Bundle)
                .where(
                    m.Bundle.model_version_id == current.model_version_id,
                    # Stay on the same release: moving a device from a
                    # re-issue back to the original bundle would go backwards.
                    m.Bundle.release.is_(None)
                    if current.release is None
                    else m.Bundle.release == current.release,
                )
                .order_by(m.Bundle.id)
            )
        )
        best = _pick_bundle(device, bundles)
        if best is None or best.id == current.id:
            return False
        record.generation += 1
        record.bundle_id = best.id
        record.updated_at = m.utcnow()
        if record.deployment_id is not None:
            target = s.get(m.DeploymentTarget, (record.deployment_id, device.id))
            if target is not None:
                target.bundle_id = best.id
                target.generation = record.generation
        return True

    def set_online(self, device_id: str, online: bool) -> bool:
        """Record a device's connection status; going online also counts as seen.

        Returns:
            ``False`` if the device is not enrolled.
        """
        values: dict[str, Any] = {"online": online}
        if online:
            values["last_seen"] = m.utcnow()
        with self._write() as s:
            result = s.execute(sa.update(m.Device).where(m.Device.id == device_id).values(values))
            return bool(_rowcount(result))

    # ----------------------------------------------------------------------- deployments
    def create_deployment(self, model_version_id: int, device_ids: Sequence[str]) -> DeploymentInfo:
        """Deploy a model version to devices, all or nothing.

        For each device the bundle of its own hardware class is chosen, else a
        ``generic`` one; the device's desired-state generation is bumped and
        points at the deployment and bundle. Device rows are locked in id order
        so concurrent deployments to overlapping devices serialize instead of
        deadlocking or losing a generation; ingest is not blocked by that lock.

        Raises:
            RegistryError: no devices were given.
            NotFoundError: the model version or some devices do not exist.
            NoMatchingBundleError: some devices have no fitting bundle; the
                message names them with their hardware classes.
        """
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            raise RegistryError("a deployment needs at least one device")
        with self._write() as s:
            version = s.get(m.ModelVersion, model_version_id)
            if version is None:
                raise NotFoundError(f"model version id {model_version_id} does not exist")
            devices = {
                d.id: d
                for d in s.scalars(
                    sa.select(m.Device)
                    .where(m.Device.id.in_(ids))
                    .order_by(m.Device.id)
                    # FOR NO KEY UPDATE on PostgreSQL: a plain FOR UPDATE would
                    # conflict with the FOR KEY SHARE locks that foreign-key
                    # checks of concurrent ingest batches take on these rows,
                    # and deadlock against them.
                    .with_for_update(key_share=True)
                )
            }
            missing = [i for i in ids if i not in devices]
            if missing:
                raise NotFoundError(f"unknown devices: {', '.join(missing)}")
            bundles = list(
                s.scalars(
                    sa.select(m.Bundle)
                    # Re-issues (rollbacks) are chosen by the rollout engine only.
                    .where(
                        m.Bundle.model_version_id == model_version_id,
                        m.Bundle.reissue_of.is_(None),
                    )
                    .order_by(m.Bundle.id)
                )
            )
            chosen: dict[str, m.Bundle] = {}
            unmatched: list[str] = []
            for device_id in ids:
                bundle = _pick_bundle(devices[device_id], bundles)
                if bundle is None:
                    unmatched.append(f"{device_id} ({devices[device_id].hardware_class})")
                else:
                    chosen[device_id] = bundle
            if unmatched:
                available = sorted({b.hardware_class for b in bundles}) or ["none"]
                raise NoMatchingBundleError(
                    f"{version.model.name}@{version.version} has no bundle for devices"
                    f" {', '.join(unmatched)}; it has bundles for: {', '.join(available)}"
                )

            now = m.utcnow()
            deployment = m.Deployment(
                id=uuid.uuid4().hex,
                model_version_id=model_version_id,
                created_at=now,
                status=DEPLOYMENT_ACTIVE,
            )
            s.add(deployment)
            s.flush()  # the desired states and targets reference it
            targets = assign_desired(s, deployment.id, version, chosen, now)
            return DeploymentInfo(
                id=deployment.id,
                model_version_id=model_version_id,
                model=version.model.name,
                version=version.version,
                release=version.release,
                created_at=now,
                status=deployment.status,
                # Same order as get_deployment, so both describe it identically.
                targets=tuple(sorted(targets, key=lambda t: t.device_id)),
            )

    @staticmethod
    def _desired(s: Session, *where: sa.ColumnElement[bool]) -> list[DesiredState]:
        """Desired-state messages for the rows matching ``where``, by device id."""
        stmt = (
            sa.select(m.DesiredStateRecord, m.Bundle, m.ModelVersion)
            .outerjoin(m.Bundle, m.Bundle.id == m.DesiredStateRecord.bundle_id)
            .outerjoin(m.ModelVersion, m.ModelVersion.id == m.Bundle.model_version_id)
            .where(*where)
            .order_by(m.DesiredStateRecord.device_id)
        )
        result = []
        for record, bundle, version in s.execute(stmt):
            # Outer joins: no bundle (and so no version) means "run no model".
            model = (
                None
                if bundle is None or version is None
                else _model_ref(version.model, version, bundle)
            )
            result.append(
                DesiredState(
                    device_id=record.device_id,
                    generation=record.generation,
                    model=model,
                    deployment_id=record.deployment_id,
                    issued_at=record.updated_at.timestamp(),
                )
            )
        return result

    def desired_for(self, device_id: str) -> DesiredState | None:
        """Return a device's desired state, or ``None`` if nothing was ever deployed to it."""
        with self._read() as s:
            found = self._desired(s, m.DesiredStateRecord.device_id == device_id)
            return found[0] if found else None

    def unpublished_desired(self) -> list[DesiredState]:
        """Desired states changed since they were last published, by device id."""
        with self._read() as s:
            return self._desired(
                s, m.DesiredStateRecord.published_generation < m.DesiredStateRecord.generation
            )

    def mark_published(self, device_id: str, generation: int) -> None:
        """Record that ``generation`` of a device's desired state was published.

        Never lowers the mark: if publishers finish out of order, the older
        generation's acknowledgement arriving last must not make the newer,
        already published generation look unpublished (and be sent again).
        Unknown devices and generations newer than the current one are ignored.
        """
        with self._write() as s:
            s.execute(
                sa.update(m.DesiredStateRecord)
                .where(
                    m.DesiredStateRecord.device_id == device_id,
                    m.DesiredStateRecord.published_generation < generation,
                    # A generation that does not exist yet was not published;
                    # recording it would hide the real one from the outbox.
                    m.DesiredStateRecord.generation >= generation,
                )
                .values(published_generation=generation)
            )

    def all_desired(self) -> list[DesiredState]:
        """Every device's desired state, by device id (e.g. to republish all)."""
        with self._read() as s:
            return self._desired(s)

    def _deployment_infos(
        self, s: Session, deployments: Sequence[m.Deployment]
    ) -> list[DeploymentInfo]:
        """Build infos for deployments with one query for all their targets."""
        if not deployments:
            return []
        ids = [d.id for d in deployments]
        rows = s.execute(
            sa.select(m.DeploymentTarget, m.Bundle)
            .join(m.Bundle, m.Bundle.id == m.DeploymentTarget.bundle_id)
            .where(m.DeploymentTarget.deployment_id.in_(ids))
            .order_by(m.DeploymentTarget.device_id)
        ).all()
        versions = {
            v.id: v
            for v in s.scalars(
                sa.select(m.ModelVersion).where(
                    m.ModelVersion.id.in_({d.model_version_id for d in deployments})
                )
            )
        }
        version_of = {d.id: versions[d.model_version_id] for d in deployments}
        by_deployment: dict[str, list[DeploymentTargetInfo]] = {i: [] for i in ids}
        for target, bundle in rows:
            version = version_of[target.deployment_id]
            by_deployment[target.deployment_id].append(
                DeploymentTargetInfo(
                    device_id=target.device_id,
                    generation=target.generation,
                    model=_model_ref(version.model, version, bundle),
                    bundle_id=bundle.id,
                )
            )
        result = []
        for d in deployments:
            version = versions[d.model_version_id]
            result.append(
                DeploymentInfo(
                    id=d.id,
                    model_version_id=d.model_version_id,
                    model=version.model.name,
                    version=version.version,
                    release=version.release,
                    created_at=d.created_at,
                    status=d.status,
                    targets=tuple(by_deployment[d.id]),
                )
            )
        return result

    def get_deployment(self, deployment_id: str) -> DeploymentInfo:
        """Return a deployment with its per-device targets.

        Raises:
            NotFoundError: no such deployment.
        """
        with self._read() as s:
            row = s.get(m.Deployment, deployment_id)
            if row is None:
                raise NotFoundError(f"deployment {deployment_id!r} does not exist")
            return self._deployment_infos(s, [row])[0]

    def list_deployments(self) -> list[DeploymentInfo]:
        """List deployments, newest first."""
        with self._read() as s:
            rows = list(
                s.scalars(
                    sa.select(m.Deployment).order_by(
                        m.Deployment.created_at.desc(), m.Deployment.id
                    )
                )
            )
            return self._deployment_infos(s, rows)

    # ----------------------------------------------------------------------- ingest
    def _known_devices(self, s: Session, device_ids: set[str]) -> set[str]:
        if not device_ids:
            return set()
        return set(s.scalars(sa.select(m.Device.id).where(m.Device.id.in_(device_ids))))

    def add_events(self, events: Sequence[Event]) -> int:
        """Store a batch of events in one transaction.

        ``at`` is the agent's timestamp when it sent one (device clocks may be
        off; ordering uses insertion order instead), else the time of storing.

        Returns:
            How many were stored; events of devices that are not enrolled are
            skipped.
        """
        if not events:
            return 0
        now = m.utcnow()
        with self._write() as s:
            known = self._known_devices(s, {e.device_id for e in events})
            rows = []
            for e in events:
                if e.device_id not in known:
                    continue
                detail: dict[str, Any] = {}
                if e.model is not None:
                    detail["model"] = e.model.to_dict()
                if e.bytes_done is not None:
                    detail["bytes_done"] = e.bytes_done
                if e.bytes_total is not None:
                    detail["bytes_total"] = e.bytes_total
                if e.extra:
                    detail["extra"] = dict(e.extra)
                rows.append(
                    m.DeviceEvent(
                        device_id=e.device_id,
                        kind=e.kind.value,
                        deployment_id=e.deployment_id,
                        generation=e.generation,
                        error=None if e.error is None else e.error.to_dict(),
                        detail=detail or None,
                        at=_from_epoch(e.at, now),
                    )
                )
            s.add_all(rows)
            return len(rows)

    def add_telemetry(self, points: Sequence[Telemetry]) -> int:
        """Store a batch of telemetry windows in one transaction.

        Returns:
            How many were stored; points of devices that are not enrolled are
            skipped.
        """
        if not points:
            return 0
        now = m.utcnow()
        with self._write() as s:
            known = self._known_devices(s, {p.device_id for p in points})
            # Plain rows through one Core executemany (multi-row VALUES on
            # PostgreSQL): ORM objects cost several times more per row here.
            rows = [
                {
                    "device_id": p.device_id,
                    "at": _from_epoch(p.at, now),
                    "window_s": p.window_s,
                    "requests": p.requests,
                    "errors": p.errors,
                    "p50_ms": None if p.latency_ms is None else p.latency_ms.p50,
                    "p95_ms": None if p.latency_ms is None else p.latency_ms.p95,
                    "p99_ms": None if p.latency_ms is None else p.latency_ms.p99,
                    "model_version": None if p.model is None else p.model.version,
                    "rss_bytes": p.rss_bytes,
                    "cpu_percent": p.cpu_percent,
                }
                for p in points
                if p.device_id in known
            ]
            if rows:
                s.execute(sa.insert(cast("sa.Table", m.TelemetryRecord.__table__)), rows)
            return len(rows)

    def events_for(self, device_id: str, limit: int = 50) -> list[EventInfo]:
        """A device's most recent events, newest first."""
        with self._read() as s:
            rows = s.scalars(
                sa.select(m.DeviceEvent)
                .where(m.DeviceEvent.device_id == device_id)
                .order_by(m.DeviceEvent.id.desc())
                .limit(max(limit, 0))
            )
            return [_event_info(row) for row in rows]

    def telemetry_for(self, device_id: str, limit: int = 100) -> list[TelemetryInfo]:
        """A device's most recent telemetry windows, newest first."""
        with self._read() as s:
            rows = s.scalars(
                sa.select(m.TelemetryRecord)
                .where(m.TelemetryRecord.device_id == device_id)
                .order_by(m.TelemetryRecord.id.desc())
                .limit(max(limit, 0))
            )
            return [_telemetry_info(row) for row in rows]

    # ----------------------------------------------------------------------- summaries
    def device_summaries(self) -> list[DeviceSummary]:
        """One summary row per device, by id, computed in a single query."""
        t = m.TelemetryRecord
        totals = (
            sa.select(
                t.device_id,
                sa.func.sum(t.requests).label("requests"),
                sa.func.sum(t.errors).label("errors"),
            )
            .group_by(t.device_id)
            .subquery()
        )
        newest = (
            sa.select(t.device_id, sa.func.max(t.id).label("id"))
            .where(t.requests > 0)
            .group_by(t.device_id)
            .subquery()
        )
        latest = aliased(m.TelemetryRecord)
        stmt = (
            sa.select(
                m.Device,
                totals.c.requests,
                totals.c.errors,
                latest.p50_ms,
                m.Model.name,
                m.ModelVersion.version,
            )
            .outerjoin(totals, totals.c.device_id == m.Device.id)
            .outerjoin(newest, newest.c.device_id == m.Device.id)
            .outerjoin(latest, latest.id == newest.c.id)
            .outerjoin(m.DesiredStateRecord, m.DesiredStateRecord.device_id == m.Device.id)
            .outerjoin(m.Bundle, m.Bundle.id == m.DesiredStateRecord.bundle_id)
            .outerjoin(m.ModelVersion, m.ModelVersion.id == m.Bundle.model_version_id)
            .outerjoin(m.Model, m.Model.id == m.ModelVersion.model_id)
            .order_by(m.Device.id)
        )
        with self._read() as s:
            result = []
            for device, requests, errors, p50, desired_model, desired_version in s.execute(stmt):
                error = _error(device.last_error)
                result.append(
                    DeviceSummary(
                        device_id=device.id,
                        hardware_class=device.hardware_class,
                        profile=device.profile,
                        online=device.online,
                        state=device.state,
                        active_model=device.active_model,
                        active_version=device.active_version,
                        last_error_code=None if error is None else error.code,
                        last_error_message=None if error is None else error.message,
                        last_seen=device.last_seen,
                        # PostgreSQL sums BIGINT into NUMERIC (a Decimal).
                        inferences=int(requests or 0),
                        errors=int(errors or 0),
                        p50_ms=p50,
                        desired_model=desired_model,
                        desired_version=desired_version,
                    )
                )
            return result

    def fleet_status(self) -> FleetStatus:
        """Fleet-wide device counts, running versions, inference totals and counters."""
        d = m.Device
        with self._read() as s:
            total, online, failed = s.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.count().filter(d.online.is_(True)),
                    sa.func.count().filter(d.state == AgentState.FAILED.value),
                ).select_from(d)
            ).one()
            versions = {
                f"{name}@{version}": count
                for name, version, count in s.execute(
                    sa.select(d.active_model, d.active_version, sa.func.count())
                    .where(d.active_model.is_not(None), d.active_version.is_not(None))
                    .group_by(d.active_model, d.active_version)
                    .order_by(d.active_model, d.active_version)
                )
            }
            requests, errors = s.execute(
                sa.select(
                    sa.func.sum(m.TelemetryRecord.requests), sa.func.sum(m.TelemetryRecord.errors)
                )
            ).one()
            counters = self._counters(s)
        return FleetStatus(
            devices=total,
            online=online,
            offline=total - online,
            failed=failed,
            versions=versions,
            inferences=int(requests or 0),
            errors=int(errors or 0),
            counters=counters,
        )

    # ----------------------------------------------------------------------- counters
    def bump_counter(self, name: str, by: int = 1) -> None:
        """Add ``by`` to a named counter, creating it at zero first if needed.

        The increment is a single ``UPDATE ... SET value = value + by``, so
        concurrent bumps never lose counts.
        """
        _text(name, "counter name", 128)

        def work(s: Session) -> None:
            result = s.execute(
                sa.update(m.Counter)
                .where(m.Counter.name == name)
                .values(value=m.Counter.value + by)
            )
            if not _rowcount(result):
                s.add(m.Counter(name=name, value=by))
                s.flush()

        self._write_retrying(work)

    def set_counters(self, values: Mapping[str, int]) -> None:
        """Set named counters (totals devices report cumulatively), in one transaction."""
        for name in values:
            _text(name, "counter name", 128)

        def work(s: Session) -> None:
            for name, value in values.items():
                result = s.execute(
                    sa.update(m.Counter).where(m.Counter.name == name).values(value=value)
                )
                if not _rowcount(result):
                    s.add(m.Counter(name=name, value=value))
                    s.flush()

        if values:
            self._write_retrying(work)

    @staticmethod
    def _counters(s: Session) -> dict[str, int]:
        rows = s.execute(sa.select(m.Counter.name, m.Counter.value).order_by(m.Counter.name))
        return {name: int(value) for name, value in rows}

    def counters(self) -> dict[str, int]:
        """All counters by name."""
        with self._read() as s:
            return self._counters(s)
