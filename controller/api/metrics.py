"""``/metrics``: the controller's Prometheus metrics, read at scrape time.

A :class:`ControllerCollector` asks the registry and the running service for
their numbers when Prometheus scrapes, so nothing is counted twice and the
values survive a restart where the registry keeps them (rejections, rollout
decisions). Labels take bounded values only - agent state, model version,
profile, rejection reason, rollout status, decision kind - never a device id:
a fleet of 10,000 devices makes the same number of series as one of ten.

Database latency is a histogram of every SQL statement the controller runs
(SQLAlchemy cursor events on the registry's engine), so it covers ingest,
rollouts and the API, not only the scrape.

=============================================  ======  ===========================
metric                                         type    labels
=============================================  ======  ===========================
edgefleet_controller_info                      gauge   version
edgefleet_fleet_devices                        gauge   online, state, version, profile
edgefleet_ingest_messages_total                counter
edgefleet_ingest_queue_messages                gauge   (ingestion lag: messages waiting)
edgefleet_ingest_newest_telemetry_age_seconds  gauge   (ingestion lag: age of the newest)
edgefleet_rejected_messages_total              counter reason
edgefleet_transfer_blocks_sent_total           counter
edgefleet_transfer_sent_bytes_total            counter
edgefleet_transfer_inflight_bytes              gauge
edgefleet_rollouts                             gauge   status
edgefleet_rollout_decisions_total              counter kind
edgefleet_database_query_duration_seconds      histo
edgefleet_metrics_collect_duration_seconds     gauge
=============================================  ======  ===========================
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import event
from sqlalchemy.engine import Engine

from edgefleet import __version__
from edgefleet.controller.registry.census import (
    decision_counts,
    device_counts,
    newest_telemetry_at,
    rollout_counts,
)
from edgefleet.controller.service import ControllerService

__all__ = ["ControllerCollector", "QueryTimer", "metrics_registry"]

_DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ControllerCollector(Collector):
    """Reads the controller's state at scrape time."""

    def __init__(self, service: ControllerService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        began = time.perf_counter()
        service = self._service
        registry = service.registry

        info = GaugeMetricFamily(
            "edgefleet_controller_info", "The controller's version.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info

        devices = GaugeMetricFamily(
            "edgefleet_fleet_devices",
            "Enrolled devices by online status, agent state, running version and profile.",
            labels=["online", "state", "version", "profile"],
        )
        for c in device_counts(registry):
            devices.add_metric(
                ["true" if c.online else "false", c.state, c.version, c.profile], c.count
            )
        yield devices

        yield CounterMetricFamily(
            "edgefleet_ingest_messages",
            "Device messages (reports, status, events, telemetry) ingested by this controller.",
            value=service.ingested,
        )
        queue: Any = getattr(service, "_ingest", None)
        yield GaugeMetricFamily(
            "edgefleet_ingest_queue_messages",
            "Messages received and waiting to be stored: the ingestion lag.",
            value=queue.qsize() if queue is not None else 0,
        )

        newest = newest_telemetry_at(registry)
        if newest is not None:
            yield GaugeMetricFamily(
                "edgefleet_ingest_newest_telemetry_age_seconds",
                "Age of the newest stored telemetry window: grows when ingest falls behind "
                "(or every device stops reporting).",
                value=max(0.0, (datetime.now(timezone.utc) - newest).total_seconds()),
            )

        rejected = CounterMetricFamily(
            "edgefleet_rejected_messages",
            "Messages refused by reason (stored counters plus those not yet flushed).",
            labels=["reason"],
        )
        for reason, n in sorted(service.rejected().items()):
            rejected.add_metric([reason], n)
        yield rejected

        transfers = service.transfers
        yield CounterMetricFamily(
            "edgefleet_transfer_blocks_sent",
            "Bundle blocks sent to devices since this controller started.",
            value=transfers.blocks_sent,
        )
        yield CounterMetricFamily(
            "edgefleet_transfer_sent_bytes",
            "Bundle bytes sent to devices since this controller started.",
            value=transfers.bytes_sent,
        )
        yield GaugeMetricFamily(
            "edgefleet_transfer_inflight_bytes",
            "Frame bytes handed to the MQTT client and not yet acknowledged by the broker.",
            value=transfers.inflight_bytes,
        )

        rollouts = GaugeMetricFamily("edgefleet_rollouts", "Rollouts by status.", labels=["status"])
        for status, n in sorted(rollout_counts(registry).items()):
            rollouts.add_metric([status], n)
        yield rollouts
        decisions = CounterMetricFamily(
            "edgefleet_rollout_decisions",
            "Rollout decisions recorded, by kind (started, wave, halted, rolled_back, ...).",
            labels=["kind"],
        )
        for kind, n in sorted(decision_counts(registry).items()):
            decisions.add_metric([kind], n)
        yield decisions

        yield GaugeMetricFamily(
            "edgefleet_metrics_collect_duration_seconds",
            "How long reading these metrics took (mostly database queries).",
            value=time.perf_counter() - began,
        )


class QueryTimer:
    """Times every SQL statement on ``engine`` into a histogram, until :meth:`close`."""

    def __init__(self, engine: Engine, histogram: Histogram) -> None:
        self._engine = engine
        self._histogram = histogram
        self._local = threading.local()
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, *_args: Any, **_kwargs: Any) -> None:
        self._local.began = time.perf_counter()

    def _after(self, *_args: Any, **_kwargs: Any) -> None:
        began = getattr(self._local, "began", None)
        if began is not None:
            self._histogram.observe(time.perf_counter() - began)
            self._local.began = None

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._before)
        event.remove(self._engine, "after_cursor_execute", self._after)


def metrics_registry(service: ControllerService) -> tuple[CollectorRegistry, QueryTimer]:
    """A Prometheus registry of its own (not the global one) with the controller's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(service))
    histogram = Histogram(
        "edgefleet_database_query_duration_seconds",
        "Duration of the controller's SQL statements.",
        buckets=_DB_BUCKETS,
        registry=registry,
    )
    return registry, QueryTimer(service.registry.engine, histogram)
