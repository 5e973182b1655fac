"""The controller's registry: models, bundles, devices, deployments and ingest.

One :class:`Registry` object owns the database (SQLite by default, PostgreSQL
for larger fleets), migrates it with Alembic when opened, and hands out frozen
dataclasses so that callers on any thread never share ORM state. The ORM
classes in :mod:`~edgefleet.controller.registry.models` are internal.

``Registry`` (:mod:`.store`) is a facade over one part per aggregate, all on
one :class:`~edgefleet.controller.registry.database.Database`: :mod:`.catalog`
(models, versions, bundles), :mod:`.devices`, :mod:`.deployments` (with the
desired-state outbox), :mod:`.events`, :mod:`.telemetry` (ingest, rollups,
retention), :mod:`.fleet` (read-only views) and :mod:`.counters`. Results are
in :mod:`.dto`. Rollouts build on the registry from
:mod:`edgefleet.controller.rollout`; the registry never imports them.
"""

from __future__ import annotations

from edgefleet.controller.registry.store import (
    DEFAULT_DB_FILENAME,
    GENERIC_HARDWARE_CLASS,
    BundleInfo,
    DeploymentInfo,
    DeploymentTargetInfo,
    DeviceInfo,
    DeviceSummary,
    EventInfo,
    FleetStatus,
    ModelVersionInfo,
    Registry,
    TelemetryInfo,
    sqlite_url,
)

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
