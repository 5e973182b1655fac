"""The :class:`Registry` facade: the API callers had before the split, one transaction a call.

The registry was one class; it is now a facade over per-aggregate parts.
Callers must not notice: the public names are the same, each delegating
method has exactly its part's signature, and each call (an ingest batch
above all) is still one database transaction.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from edgefleet.controller.registry import Registry
from edgefleet.controller.registry.catalog import Catalog
from edgefleet.controller.registry.counters import Counters
from edgefleet.controller.registry.deployments import Deployments, Outbox
from edgefleet.controller.registry.devices import Devices
from edgefleet.controller.registry.events import Events
from edgefleet.controller.registry.fleet import FleetViews
from edgefleet.controller.registry.telemetry import TelemetryStore
from edgefleet.protocols.messages import Event, EventKind
from tests.controller.registry.builders import (
    make_bundle,
    make_report,
    make_telemetry,
    make_version,
)

# Registry's public API before the split (main at 8f378f7), plus ``database``
# and ``expire_events`` (event retention, issue 9).
PUBLIC = {
    "add_bundle",
    "add_controller_event",
    "add_events",
    "add_telemetry",
    "advance_event_acks",
    "all_desired",
    "bump_counter",
    "bundles_for",
    "close",
    "counters",
    "create_deployment",
    "database",
    "desired_for",
    "device_summaries",
    "engine",
    "enroll_device",
    "events_for",
    "expire_events",
    "fleet_status",
    "get_deployment",
    "get_device",
    "get_model_version",
    "list_deployments",
    "list_devices",
    "page_devices",
    "limit_device_counters",
    "list_model_versions",
    "mark_published",
    "published_digest",
    "record_reported",
    "register_model_version",
    "set_counters",
    "set_online",
    "telemetry_for",
    "unpublished_desired",
    "update_tags",
    "url",
}
PARTS = (Catalog, Devices, Deployments, Outbox, Events, TelemetryStore, FleetViews, Counters)


def test_facade_keeps_the_public_api() -> None:
    assert {n for n in vars(Registry) if not n.startswith("_")} == PUBLIC


def test_every_part_method_is_on_the_facade_with_the_same_signature() -> None:
    seen: set[str] = set()
    for part in PARTS:
        for name, member in vars(part).items():
            if name.startswith("_") or not callable(member):
                continue
            assert name not in seen, f"{name} is in two parts"
            seen.add(name)
            assert inspect.signature(getattr(Registry, name)) == inspect.signature(member), name
    assert seen == PUBLIC - {"close", "database", "engine", "url"}


@contextmanager
def _transactions(registry: Registry) -> Iterator[list[int]]:
    """Count transactions begun on the registry's engine (its write engine shares the events)."""
    begun: list[int] = []

    def on_begin(_conn: sa.Connection) -> None:
        begun.append(1)

    sa.event.listen(registry.engine, "begin", on_begin)
    try:
        yield begun
    finally:
        sa.event.remove(registry.engine, "begin", on_begin)


def _count(registry: Registry, call: Callable[[], object]) -> int:
    with _transactions(registry) as begun:
        call()
    return len(begun)


def test_each_call_is_one_transaction(registry: Registry) -> None:
    mv = make_version(registry)
    make_bundle(registry, mv, "generic")
    devices = [f"d{i:02d}" for i in range(20)]
    for device_id in devices:
        registry.enroll_device(device_id)
    points = [make_telemetry(d, 5, p50=1.0) for d in devices for _ in range(10)]
    events = [Event(d, EventKind.VERIFIED, generation=1) for d in devices]

    assert _count(registry, lambda: registry.add_telemetry(points)) == 1
    assert _count(registry, lambda: registry.add_events(events)) == 1
    assert _count(registry, lambda: registry.record_reported(make_report("d00"))) == 1
    assert _count(registry, lambda: registry.set_counters({"a": 1, "b": 2})) == 1
    assert _count(registry, lambda: registry.create_deployment(mv.id, devices)) == 1
    assert _count(registry, registry.unpublished_desired) == 1
    assert _count(registry, lambda: registry.mark_published("d00", 1)) == 1
    assert _count(registry, registry.device_summaries) == 1
    assert _count(registry, registry.fleet_status) == 1
