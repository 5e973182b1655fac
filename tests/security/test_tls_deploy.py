"""The whole path, secure: enroll over HTTPS, then deploy, install and infer over
TLS through the production Mosquitto config (client certificates, ACL, CRL)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.daemon import Agent
from edgefleet.agent.enroll import EnrollmentSettings
from edgefleet.controller.enrollment import (
    DeviceBroker,
    EnrollmentServer,
    TokenStore,
    token_file_document,
)
from edgefleet.protocols.errors import ConfigError
from tests.e2e.harness import Harness, infer, wait_for
from tests.security.conftest import TlsBroker, issue_device_files

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


@pytest.fixture
def secure(tls_broker: TlsBroker, tmp_path: Path) -> Iterator[tuple[Harness, EnrollmentServer]]:
    harness = Harness(tmp_path, tls_broker.controller, f"sqlite:///{tmp_path / 'registry.db'}")
    server = EnrollmentServer(
        tls_broker.ca,
        TokenStore(tmp_path / "enrollment"),
        harness.repository.root_bytes,
        DeviceBroker("localhost", tls_broker.port),
        port=0,
    )
    server.start()
    try:
        yield harness, server
    finally:
        harness.close()
        server.stop()


def test_enrolled_agent_deploys_installs_and_serves_over_tls(
    secure: tuple[Harness, EnrollmentServer], tmp_path: Path
) -> None:
    harness, server = secure
    device_id = harness.enroll("tls")
    token = server.tokens.create(device_id, 600)
    token_path = tmp_path / "enrollment.json"
    token_path.write_text(
        json.dumps(token_file_document(device_id, token, server.url, server.ca.cert_pem, 0))
    )
    # No broker address, no certificate, no TUF root: all of it comes from enrollment.
    config = harness.agent_config("tls").with_overrides(
        trust_root=None, enrollment=EnrollmentSettings(token_path, timeout_s=10)
    )
    agent = harness.start_agent(config)  # Agent.__init__ enrolls
    assert agent.config.broker.tls and agent.config.broker.cert_file is not None

    harness.register("1.0.0")
    harness.deploy("1.0.0", "tls")
    harness.wait_active(agent, "1.0.0", timeout_s=60)
    result = infer(agent)
    assert result["model"]["version"] == "1.0.0"
    wait_for(lambda: harness.summary("tls").state == "idle", 20, "reported state over TLS")

    # Restart: the spent token is not needed again; the identity on disk is reused.
    agent.stop()
    harness.agents.remove(agent)
    again = harness.start_agent(config)
    harness.wait_active(again, "1.0.0", timeout_s=30)
    assert server.enrolled[device_id] == 1


def test_agent_refuses_to_start_with_a_key_others_can_read(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    harness = Harness(tmp_path, tls_broker.controller, f"sqlite:///{tmp_path / 'r.db'}")
    try:
        device_id = harness.device_id("loose")
        files = issue_device_files(tls_broker.ca, device_id, tmp_path / device_id)
        os.chmod(files["key_file"], 0o640)
        config = harness.agent_config("loose").with_overrides(broker=tls_broker.settings(**files))
        with pytest.raises(ConfigError, match=r"mode 0640.*chmod 600"):
            Agent(config)
        os.chmod(files["key_file"], stat.S_IRUSR | stat.S_IWUSR)
        agent = harness.start_agent(config)  # control: 0600 is accepted
        assert agent.link.wait_connected(10)
    finally:
        harness.close()
