"""``serve --ingest-workers N``: telemetry stored by worker processes, each row exactly once.

Real Mosquitto (shared subscriptions), real worker processes, the real
database (SQLite, and PostgreSQL when configured). Every message carries its
own number in ``requests``, so a row stored twice or never is visible.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.ingest import IngestWorkers
from edgefleet.controller.registry import Registry
from edgefleet.controller.service import ControllerService
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.errors import ConfigError
from edgefleet.protocols.messages import Telemetry
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings
from tests.e2e.harness import wait_for

DEVICES = 4
PER_DEVICE = 150


def _telemetry(device_id: str, number: int, at: float) -> bytes:
    return Telemetry(
        device_id=device_id,
        window_s=1.0,
        requests=number,
        errors=0,
        latency_ms=None,
        model=None,
        rss_bytes=1,
        cpu_percent=1.0,
        at=at,
    ).encode()


@pytest.fixture
def publisher(mosquitto: BrokerSettings) -> Iterator[mqtt.Client]:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"ingest-test-pub-{secrets.token_hex(4)}",
        protocol=mqtt.MQTTv311,
    )
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


def _numbers(registry: Registry, device_id: str) -> list[int]:
    return sorted(t.requests for t in registry.telemetry_for(device_id, limit=100_000))


def test_two_workers_store_every_message_exactly_once(
    tmp_path: Path, mosquitto: BrokerSettings, database_url: str, publisher: mqtt.Client
) -> None:
    token = secrets.token_hex(3)
    group = f"ingest-{token}"  # the broker is shared by the session: a group of our own
    registry = Registry(database_url)
    devices = [f"ingest-{token}-{i}" for i in range(DEVICES)]
    warmup = f"ingest-{token}-warmup"
    for device_id in [*devices, warmup]:
        registry.enroll_device(device_id)
    repository = TrustRepository.init(tmp_path / "repository")
    settings = ServiceSettings(
        client_id=f"ingest-test-{token}", share_group=group, ingest_flush_s=0.1
    )
    # The controller process keeps everything but telemetry.
    service = ControllerService(registry, repository, mosquitto, settings, ingest_telemetry=False)
    service.start()
    workers = IngestWorkers(
        2,
        database_url=database_url,
        repository_root=repository.root,
        broker=mosquitto,
        settings=settings,
    )
    workers.start()
    try:
        # Subscriptions are live once each worker has taken a message: before
        # that, a QoS 1 message with no subscriber in the group is dropped.
        sent_warmup = 0

        def both_subscribed() -> bool:
            nonlocal sent_warmup
            sent_warmup += 1
            publisher.publish(
                str(DeviceTopic(warmup, Channel.TELEMETRY)),
                _telemetry(warmup, sent_warmup, time.time()),
                qos=1,
            )
            time.sleep(0.2)
            return all(n > 0 for n in workers.ingested())

        wait_for(both_subscribed, timeout_s=120, what="both ingest workers subscribed")
        before = workers.ingested()

        base = time.time()
        last = None
        for n in range(PER_DEVICE):
            for d, device_id in enumerate(devices):
                last = publisher.publish(
                    str(DeviceTopic(device_id, Channel.TELEMETRY)),
                    _telemetry(device_id, n, base + n * 0.001 + d * 0.0001),
                    qos=1,
                )
        assert last is not None
        last.wait_for_publish(60)

        def all_stored() -> bool:
            return sum(len(_numbers(registry, d)) for d in devices) >= DEVICES * PER_DEVICE

        wait_for(all_stored, timeout_s=180, what=f"{DEVICES * PER_DEVICE} telemetry rows")
        # A duplicate would arrive after the last original: give it time to show.
        wait_for(
            lambda: sum(workers.ingested()) - sum(before) >= DEVICES * PER_DEVICE,
            timeout_s=60,
            what="workers' counts",
        )
        time.sleep(1.0)
        for device_id in devices:
            assert _numbers(registry, device_id) == list(range(PER_DEVICE)), device_id
        after = workers.ingested()
        # The broker split the work: each worker took a share, none took all.
        taken = [a - b for a, b in zip(after, before, strict=True)]
        assert all(t > 0 for t in taken), taken
        # ... and together all of it (plus, at most, warm-up messages still in
        # flight when ``before`` was read): the controller process took none.
        assert DEVICES * PER_DEVICE <= sum(taken) <= DEVICES * PER_DEVICE + sent_warmup, taken
        assert workers.alive() == 2
    finally:
        workers.stop()
        service.stop()
        registry.close()


def test_several_workers_refused_without_shared_subscriptions(
    tmp_path: Path, embedded_broker: BrokerSettings
) -> None:
    with pytest.raises(ConfigError, match="shared subscriptions"):
        IngestWorkers(
            2,
            database_url=f"sqlite:///{tmp_path / 'registry.db'}",
            repository_root=tmp_path / "repository",
            broker=embedded_broker,
            settings=ServiceSettings(),
            shared_subscriptions=False,
        )
    with pytest.raises(ConfigError, match="at least 1"):
        IngestWorkers(
            0,
            database_url=f"sqlite:///{tmp_path / 'registry.db'}",
            repository_root=tmp_path / "repository",
            broker=embedded_broker,
            settings=ServiceSettings(),
        )
