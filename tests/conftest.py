"""Shared fixtures: real brokers and real databases, never mocks.

- ``embedded_broker``: amqtt in a thread, on a free loopback port.
- ``mosquitto``: the Mosquitto binary started by the fixture on a free port
  with a config written for the test (the system Mosquitto on 1883 is left
  alone). Missing binary: skipped locally, an error under CI (``CI=true``),
  because ``.ci/run`` installs it.
- ``broker``: parametrized over both, for end-to-end tests.
- ``database_url``: a fresh SQLite file, plus PostgreSQL when
  ``EDGEFLEET_TEST_DATABASE_URL`` is set (each test gets its own schema).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from edgefleet.controller.broker import EmbeddedBroker
from edgefleet.shared.link import BrokerSettings
from tests.support import MosquittoProcess, find_mosquitto, postgres_schema

# Property tests judge behaviour, never speed: on a loaded 2-core CI machine an
# example can take longer than hypothesis' default 200 ms deadline, which made
# tests/shared/test_memlink.py flaky. Speed is measured in bench/.
settings.register_profile("edgefleet", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("edgefleet")

POSTGRES_URL = os.environ.get("EDGEFLEET_TEST_DATABASE_URL")


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[BrokerSettings]:
    with EmbeddedBroker() as broker:
        yield BrokerSettings(host=broker.host, port=broker.port, connect_timeout_s=10)


def require_mosquitto() -> str:
    """The mosquitto binary; a skip when it is missing locally, a failure under CI."""
    binary = find_mosquitto()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed; .ci/run should have installed it")
        pytest.skip("mosquitto binary not installed")
    return binary


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerSettings]:
    binary = require_mosquitto()
    with MosquittoProcess.anonymous(binary, tmp_path_factory.mktemp("mosquitto")) as proc:
        yield proc.settings


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> BrokerSettings:
    name = "embedded_broker" if request.param == "amqtt" else "mosquitto"
    settings: BrokerSettings = request.getfixturevalue(name)
    return settings


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("EDGEFLEET_TEST_DATABASE_URL not set")
    with postgres_schema(POSTGRES_URL) as url:
        yield url
