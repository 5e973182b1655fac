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
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.controller.broker import EmbeddedBroker, free_port
from edgefleet.shared.link import BrokerSettings

POSTGRES_URL = os.environ.get("EDGEFLEET_TEST_DATABASE_URL")


def _wait_port(host: str, port: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[BrokerSettings]:
    with EmbeddedBroker() as broker:
        yield BrokerSettings(host=broker.host, port=broker.port, connect_timeout_s=10)


class MosquittoProcess:
    """A Mosquitto we own: started on a free port from a config we write."""

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("mosquitto is not installed; .ci/run should have installed it")
            pytest.skip("mosquitto binary not installed")
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\n"
            f"log_dest file {workdir / 'mosquitto.log'}\n{extra_config}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if not _wait_port("127.0.0.1", self.port):
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {(self.workdir / 'mosquitto.log')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    @property
    def settings(self) -> BrokerSettings:
        return BrokerSettings(host="127.0.0.1", port=self.port, connect_timeout_s=10)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerSettings]:
    proc = MosquittoProcess(tmp_path_factory.mktemp("mosquitto"))
    proc.start()
    try:
        yield proc.settings
    finally:
        proc.stop()


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> BrokerSettings:
    name = "embedded_broker" if request.param == "amqtt" else "mosquitto"
    settings: BrokerSettings = request.getfixturevalue(name)
    return settings


def _postgres_schema_url(base: str) -> Iterator[str]:
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("EDGEFLEET_TEST_DATABASE_URL not set")
    yield from _postgres_schema_url(POSTGRES_URL)
