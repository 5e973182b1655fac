"""Telemetry ingestion in worker processes (``edgefleet serve --ingest-workers N``).

:class:`IngestWorkers` runs telemetry ingestion in ``n`` processes
(``edgefleet serve --ingest-workers N``), because one process stores what
one core's worth of Python can decode and insert. Each worker is a
:class:`~edgefleet.controller.service.ControllerService` with
``ingest_only``: its own MQTT client (``<client_id>-ingest-<i>``) subscribed
to telemetry through the shared subscription ``$share/<group>/...``, and its
own registry connection. The broker hands each message to exactly one member
of the group, so no row is stored twice and none is skipped; the controller
process then does not subscribe to telemetry at all. Everything else
(reports, status, events, file requests, the outbox, rollouts, rollups)
stays in the controller process.

Shared subscriptions need a broker that has them (Mosquitto, EMQX); amqtt
(``serve --embedded-broker``) has none, so more than one worker on it is
refused (a :class:`~edgefleet.protocols.errors.ConfigError`) rather than storing every message n
times. One worker subscribes with a plain filter unless ``share_group`` is
set.

What a worker cannot see: duplicate device ids detected from overlapping
telemetry windows (``controller/presence.py``) need all of a device's windows
in one place, and a shared subscription spreads them over the workers. With
workers, that check runs per worker on its share; duplicates are still found
from status and event journals in the controller process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from edgefleet.controller.config import ControllerConfig, ServiceSettings
from edgefleet.protocols.errors import ConfigError
from edgefleet.shared.link import BrokerSettings

__all__ = ["DEFAULT_INGEST_GROUP", "IngestWorkers", "start_ingest_workers"]

log = logging.getLogger(__name__)

# The shared-subscription group of ingest workers when ``share_group`` is unset.
DEFAULT_INGEST_GROUP = "edgefleet-ingest"
_ctx = mp.get_context("spawn")


@dataclass(frozen=True)
class _WorkerSpec:
    """What a worker process needs to build its own service (picklable)."""

    index: int
    database_url: str
    repository_root: str
    broker: BrokerSettings
    settings: ServiceSettings


def _worker_main(spec: _WorkerSpec, stop: Any, ingested: Synchronized[int], ready: Any) -> None:
    """One ingest worker process: an ingest-only service until ``stop`` is set."""
    from edgefleet.controller.registry import Registry
    from edgefleet.controller.service import ControllerService
    from edgefleet.controller.trust import TrustRepository

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s ingest-%(process)d %(message)s")
    # Ctrl-C reaches the whole process group: the parent stops us through
    # ``stop`` after its own shutdown. SIGTERM (systemd stops the unit's
    # cgroup) ends the loop so the current batch is still stored.
    terminated = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    registry = Registry(spec.database_url, migrate=False)
    try:
        service = ControllerService(
            registry,
            TrustRepository.open(Path(spec.repository_root)),
            spec.broker,
            spec.settings,
            ingest_only=True,
        )
        service.start()
        ready.set()
        try:
            while not stop.wait(0.2) and not terminated.is_set():
                ingested.value = service.ingested
        finally:
            service.stop()
            ingested.value = service.ingested
    finally:
        registry.close()


class IngestWorkers:
    """``n`` telemetry ingest processes, restarted if one dies, stopped together.

    Args:
        n: how many worker processes (>= 1).
        database_url: the registry URL (every worker opens its own engine).
        repository_root: the TUF repository directory (workers only read it).
        broker: broker address and credentials, as the controller uses them.
        settings: the controller's service settings; each worker gets
            ``client_id`` ``<client_id>-ingest-<i>`` and, when ``share_group``
            is unset and ``n > 1``, the group :data:`DEFAULT_INGEST_GROUP`.
        shared_subscriptions: whether the broker has shared subscriptions.

    Raises:
        ConfigError: ``n < 1``, or ``n > 1`` without shared subscriptions.
    """

    def __init__(
        self,
        n: int,
        *,
        database_url: str,
        repository_root: Path,
        broker: BrokerSettings,
        settings: ServiceSettings,
        shared_subscriptions: bool = True,
    ) -> None:
        if n < 1:
            raise ConfigError(f"--ingest-workers must be at least 1, got {n}")
        if n > 1 and not shared_subscriptions:
            raise ConfigError(
                f"{n} ingest workers need a broker with MQTT shared subscriptions"
                " ($share/<group>/...), such as Mosquitto or EMQX; the embedded broker (amqtt)"
                " has none and would give every worker every message. Use one worker, or"
                " an external broker."
            )
        group = settings.share_group or (DEFAULT_INGEST_GROUP if n > 1 else "")
        self._specs = [
            _WorkerSpec(
                index=i,
                database_url=database_url,
                repository_root=str(repository_root),
                broker=broker,
                settings=replace(
                    settings, client_id=f"{settings.client_id}-ingest-{i}", share_group=group
                ),
            )
            for i in range(n)
        ]
        self._stop = _ctx.Event()
        self._counts: list[Synchronized[int]] = [_ctx.Value("q", 0) for _ in range(n)]
        self._ready = [_ctx.Event() for _ in range(n)]
        self._base = [0] * n  # counts of earlier (dead) processes per slot
        self._procs: list[Any] = [None] * n
        self._lock = threading.Lock()
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def n(self) -> int:
        return len(self._specs)

    def start(self) -> None:
        """Start every worker, and a thread that restarts any that exits early."""
        with self._lock:
            for i in range(self.n):
                self._spawn(i)
        self._watcher = threading.Thread(
            target=self._watch, name="controller-ingest-workers", daemon=True
        )
        self._watcher.start()

    def _spawn(self, i: int) -> None:
        proc = _ctx.Process(
            target=_worker_main,
            args=(self._specs[i], self._stop, self._counts[i], self._ready[i]),
            name=f"edgefleet-ingest-{i}",
            daemon=True,
        )
        # A child started with SIGINT ignored never gets KeyboardInterrupt,
        # not even while still importing (signals can be set from the main
        # thread only; a restart by the watcher relies on _worker_main's own).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            proc.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        self._procs[i] = proc

    def _watch(self) -> None:
        while not self._watch_stop.wait(1.0):
            with self._lock:
                for i, proc in enumerate(self._procs):
                    if proc is not None and not proc.is_alive() and not self._stop.is_set():
                        log.warning(
                            "ingest worker %d exited (code %s); starting it again", i, proc.exitcode
                        )
                        self._base[i] += self._counts[i].value
                        self._counts[i].value = 0
                        self._ready[i].clear()
                        self._spawn(i)

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until every worker has connected to the broker and subscribed; False on timeout.

        A worker takes seconds to start (a new interpreter importing the
        registry); telemetry published before it subscribes is not its.
        """
        deadline = time.monotonic() + timeout_s
        return all(ev.wait(max(0.0, deadline - time.monotonic())) for ev in self._ready)

    def ingested(self) -> list[int]:
        """Messages each worker slot has taken (live processes report every 0.2 s)."""
        return [base + count.value for base, count in zip(self._base, self._counts, strict=True)]

    def alive(self) -> int:
        """How many worker processes are running."""
        return sum(1 for p in self._procs if p is not None and p.is_alive())

    def stop(self, timeout_s: float = 15.0) -> None:
        """Ask every worker to finish its batch and exit; kill those that do not."""
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
        self._stop.set()
        with self._lock:
            for proc in self._procs:
                if proc is not None:
                    proc.join(timeout_s)
            for proc in self._procs:
                if proc is not None and proc.is_alive():
                    log.warning("ingest worker %s did not stop; terminating it", proc.name)
                    proc.terminate()
                    proc.join(5)

    def __enter__(self) -> IngestWorkers:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_ingest_workers(
    n: int, config: ControllerConfig, broker: BrokerSettings, *, embedded_broker: bool
) -> IngestWorkers | None:
    """``serve --ingest-workers N``: start ``n`` workers, or ``None`` for 0 (ingest in-process).

    Raises:
        ConfigError: ``n > 1`` on the embedded broker, which has no shared subscriptions.
    """
    if n <= 0:
        return None
    workers = IngestWorkers(
        n,
        database_url=config.registry_url,
        repository_root=config.repository_dir,
        broker=broker,
        settings=config.service,
        shared_subscriptions=not embedded_broker,
    )
    workers.start()
    return workers
