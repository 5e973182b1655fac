"""A deploy through the API reaches a real agent, on each broker, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.controller.api.server import start_api
from edgefleet.controller.config import ApiSettings
from edgefleet.controller.registry.tokens import TokenStore
from edgefleet.shared.link import BrokerSettings
from tests.controller.api.conftest import ApiClient
from tests.e2e.harness import MODEL, Harness, wait_for


@pytest.fixture
def harness(tmp_path: Path, broker: BrokerSettings) -> Iterator[Harness]:
    h = Harness(tmp_path, broker, f"sqlite:///{tmp_path / 'registry.db'}")
    yield h
    h.close()


@pytest.mark.slow
def test_deploy_through_the_api_makes_the_agent_active(harness: Harness) -> None:
    server = start_api(harness.service, ApiSettings(address="127.0.0.1:0"))
    try:
        client = ApiClient(server.url)
        operator = TokenStore(harness.registry.database).create("e2e", "operator").token
        harness.register("1.0")
        device_id = harness.enroll("edge")
        harness.registry.enroll_device(harness.device_id("idle"), tags=["other"])
        agent = harness.start_agent(harness.agent_config("edge"))
        wait_for(lambda: harness.summary("edge").online, 20, "the agent to come online")

        reply = client.post(
            "/api/v1/deployments",
            operator,
            {"model": MODEL, "version": "1.0", "devices": [device_id]},
        )
        assert reply.status == 201, reply
        assert [d["device_id"] for d in reply.body["devices"]] == [device_id]
        assert reply.body["devices"][0]["published"] is True

        harness.wait_active(agent, "1.0")
        wait_for(
            lambda: (
                client.get(f"/api/v1/devices/{device_id}", operator).body["active"]
                == {"model": MODEL, "version": "1.0", "release": 1}
            ),
            20,
            "the API to show the device running 1.0",
        )
        device = client.get(f"/api/v1/devices/{device_id}", operator).body
        assert "installed" in [e["kind"] for e in device["events"]]
        # The device not selected got nothing.
        assert harness.registry.desired_for(harness.device_id("idle")) is None
    finally:
        server.stop()
