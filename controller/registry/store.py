"""The registry facade: one object that opens the database and composes its parts.

:class:`Registry` is how the rest of the controller touches the database. It
holds no queries of its own: each method hands over to the part that owns the
aggregate, all sharing one :class:`~edgefleet.controller.registry.database.Database`
(its engine, session factories and transaction rules):

============================  ===================================================
part                          aggregate
============================  ===================================================
:mod:`.catalog`               models, versions (release counter), bundles
:mod:`.devices`               enrollment, reported state, online status
:mod:`.deployments`           deployments, bundle choice, the desired-state outbox
:mod:`.events`                device events
:mod:`.telemetry`             telemetry windows, per-minute rollups, retention
:mod:`.fleet`                 fleet summaries and totals (read only)
:mod:`.counters`              named counters
============================  ===================================================

Every method is still one transaction, exactly as before the split; results
are the frozen dataclasses of :mod:`.dto`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine

from edgefleet.controller.registry.catalog import GENERIC_HARDWARE_CLASS, Catalog
from edgefleet.controller.registry.counters import Counters
from edgefleet.controller.registry.database import DEFAULT_DB_FILENAME, Database, sqlite_url
from edgefleet.controller.registry.deployments import Deployments, Outbox
from edgefleet.controller.registry.devices import Devices
from edgefleet.controller.registry.dto import (
    BundleInfo,
    DeploymentInfo,
    DeploymentTargetInfo,
    DeviceInfo,
    DeviceSummary,
    EventInfo,
    FleetStatus,
    ModelVersionInfo,
    TelemetryInfo,
)
from edgefleet.controller.registry.events import EventAckMark, Events
from edgefleet.controller.registry.fleet import FleetViews
from edgefleet.controller.registry.telemetry import TelemetryStore
from edgefleet.protocols.bundle import TensorSpec
from edgefleet.protocols.messages import DesiredState, Event, ReportedState, Telemetry

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
        self._database = Database(url, migrate=migrate)
        self._catalog = Catalog(self._database)
        self._devices = Devices(self._database)
        self._deployments = Deployments(self._database)
        self._outbox = Outbox(self._database)
        self._events = Events(self._database)
        self._telemetry = TelemetryStore(self._database)
        self._fleet = FleetViews(self._database)
        self._counters = Counters(self._database)

    @property
    def database(self) -> Database:
        """The shared database, for stores built on the registry (rollouts, rollups)."""
        return self._database

    @property
    def url(self) -> str:
        """The database URL with any password masked, for logs and messages."""
        return self._database.url

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for health checks and tests; not for queries."""
        return self._database.engine

    def close(self) -> None:
        """Close all pooled connections; the registry must not be used afterwards."""
        self._database.close()

    # ----------------------------------------------------------------------- catalog
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
        """See :meth:`Catalog.register_model_version <.catalog.Catalog.register_model_version>`."""
        return self._catalog.register_model_version(
            name,
            version,
            source_sha256=source_sha256,
            inputs=inputs,
            outputs=outputs,
            description=description,
        )

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
        """See :meth:`Catalog.add_bundle <.catalog.Catalog.add_bundle>`."""
        return self._catalog.add_bundle(
            model_version_id,
            hardware_class=hardware_class,
            runtime=runtime,
            precision=precision,
            target_path=target_path,
            sha256=sha256,
            length=length,
            report=report,
        )

    def get_model_version(self, name: str, version: str) -> ModelVersionInfo:
        """See :meth:`Catalog.get_model_version <.catalog.Catalog.get_model_version>`."""
        return self._catalog.get_model_version(name, version)

    def list_model_versions(self, name: str | None = None) -> list[ModelVersionInfo]:
        """See :meth:`Catalog.list_model_versions <.catalog.Catalog.list_model_versions>`."""
        return self._catalog.list_model_versions(name)

    def bundles_for(self, model_version_id: int) -> list[BundleInfo]:
        """See :meth:`Catalog.bundles_for <.catalog.Catalog.bundles_for>`."""
        return self._catalog.bundles_for(model_version_id)

    # ----------------------------------------------------------------------- devices
    def enroll_device(
        self,
        device_id: str,
        *,
        hardware_class: str = GENERIC_HARDWARE_CLASS,
        tags: Sequence[str] = (),
    ) -> DeviceInfo:
        """See :meth:`Devices.enroll_device <.devices.Devices.enroll_device>`."""
        return self._devices.enroll_device(device_id, hardware_class=hardware_class, tags=tags)

    def get_device(self, device_id: str) -> DeviceInfo | None:
        """See :meth:`Devices.get_device <.devices.Devices.get_device>`."""
        return self._devices.get_device(device_id)

    def list_devices(self) -> list[DeviceInfo]:
        """See :meth:`Devices.list_devices <.devices.Devices.list_devices>`."""
        return self._devices.list_devices()

    def page_devices(
        self,
        *,
        tag: str | None = None,
        profile: str | None = None,
        status: str | None = None,
        version: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> tuple[list[DeviceInfo], str | None]:
        """See :meth:`Devices.page_devices <.devices.Devices.page_devices>`."""
        return self._devices.page_devices(
            tag=tag, profile=profile, status=status, version=version, after=after, limit=limit
        )

    def record_reported(self, reported: ReportedState, *, profile: str | None = None) -> bool:
        """See :meth:`Devices.record_reported <.devices.Devices.record_reported>`."""
        return self._devices.record_reported(reported, profile=profile)

    def set_online(self, device_id: str, online: bool) -> bool:
        """See :meth:`Devices.set_online <.devices.Devices.set_online>`."""
        return self._devices.set_online(device_id, online)

    def update_tags(
        self, device_id: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> DeviceInfo:
        """See :meth:`Devices.update_tags <.devices.Devices.update_tags>`."""
        return self._devices.update_tags(device_id, add=add, remove=remove)

    # ----------------------------------------------------------------------- deployments
    def create_deployment(self, model_version_id: int, device_ids: Sequence[str]) -> DeploymentInfo:
        """See :meth:`.deployments.Deployments.create_deployment`."""
        return self._deployments.create_deployment(model_version_id, device_ids)

    def get_deployment(self, deployment_id: str) -> DeploymentInfo:
        """See :meth:`Deployments.get_deployment <.deployments.Deployments.get_deployment>`."""
        return self._deployments.get_deployment(deployment_id)

    def list_deployments(self) -> list[DeploymentInfo]:
        """See :meth:`Deployments.list_deployments <.deployments.Deployments.list_deployments>`."""
        return self._deployments.list_deployments()

    # ----------------------------------------------------------------------- outbox
    def desired_for(self, device_id: str) -> DesiredState | None:
        """See :meth:`Outbox.desired_for <.deployments.Outbox.desired_for>`."""
        return self._outbox.desired_for(device_id)

    def unpublished_desired(self) -> list[DesiredState]:
        """See :meth:`Outbox.unpublished_desired <.deployments.Outbox.unpublished_desired>`."""
        return self._outbox.unpublished_desired()

    def mark_published(self, device_id: str, generation: int) -> None:
        """See :meth:`Outbox.mark_published <.deployments.Outbox.mark_published>`."""
        self._outbox.mark_published(device_id, generation)

    def all_desired(self) -> list[DesiredState]:
        """See :meth:`Outbox.all_desired <.deployments.Outbox.all_desired>`."""
        return self._outbox.all_desired()

    def published_digest(self) -> str:
        """See :meth:`Outbox.published_digest <.deployments.Outbox.published_digest>`."""
        return self._outbox.published_digest()

    # ----------------------------------------------------------------------- events
    def add_events(self, events: Sequence[Event], *, max_per_device: int | None = None) -> int:
        """See :meth:`Events.add_events <.events.Events.add_events>`."""
        return self._events.add_events(events, max_per_device=max_per_device)

    def expire_events(self, older_than: datetime, *, now: datetime | None = None) -> int:
        """See :meth:`Events.expire_events <.events.Events.expire_events>`."""
        return self._events.expire_events(older_than, now=now)

    def advance_event_acks(self, journals: Collection[tuple[str, str]]) -> list[EventAckMark]:
        """See :meth:`Events.advance_event_acks <.events.Events.advance_event_acks>`."""
        return self._events.advance_event_acks(journals)

    def events_for(self, device_id: str, limit: int = 50) -> list[EventInfo]:
        """See :meth:`Events.events_for <.events.Events.events_for>`."""
        return self._events.events_for(device_id, limit)

    def add_controller_event(
        self, device_id: str, kind: str, detail: dict[str, Any] | None = None
    ) -> bool:
        """See :meth:`Events.add_controller_event <.events.Events.add_controller_event>`."""
        return self._events.add_controller_event(device_id, kind, detail)

    # ----------------------------------------------------------------------- telemetry
    def add_telemetry(self, points: Sequence[Telemetry]) -> int:
        """See :meth:`TelemetryStore.add_telemetry <.telemetry.TelemetryStore.add_telemetry>`."""
        return self._telemetry.add_telemetry(points)

    def telemetry_for(self, device_id: str, limit: int = 100) -> list[TelemetryInfo]:
        """See :meth:`TelemetryStore.telemetry_for <.telemetry.TelemetryStore.telemetry_for>`."""
        return self._telemetry.telemetry_for(device_id, limit)

    # ----------------------------------------------------------------------- fleet views
    def device_summaries(self) -> list[DeviceSummary]:
        """See :meth:`FleetViews.device_summaries <.fleet.FleetViews.device_summaries>`."""
        return self._fleet.device_summaries()

    def fleet_status(self) -> FleetStatus:
        """See :meth:`FleetViews.fleet_status <.fleet.FleetViews.fleet_status>`."""
        return self._fleet.fleet_status()

    # ----------------------------------------------------------------------- counters
    def bump_counter(self, name: str, by: int = 1) -> None:
        """See :meth:`Counters.bump_counter <.counters.Counters.bump_counter>`."""
        self._counters.bump_counter(name, by)

    def set_counters(self, values: Mapping[str, int]) -> None:
        """See :meth:`Counters.set_counters <.counters.Counters.set_counters>`."""
        self._counters.set_counters(values)

    def limit_device_counters(self, max_rows_per_device: int) -> None:
        """See :meth:`Counters.limit_device_counters <.counters.Counters.limit_device_counters>`."""
        self._counters.limit_device_counters(max_rows_per_device)

    def counters(self) -> dict[str, int]:
        """See :meth:`Counters.counters <.counters.Counters.counters>`."""
        return self._counters.counters()
