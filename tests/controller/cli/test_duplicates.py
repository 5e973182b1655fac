"""Two real agents with one device id (issue 10: "no warning; the real one shows offline").

A real controller, real brokers (amqtt and Mosquitto) and two real agents
started with the same device id and different state directories. The
controller must notice (a ``duplicate_device_id`` event, shown by
``devices`` and ``status``), and when the second agent stops - leaving its
retained ``offline`` behind - the one still running must show online while
its telemetry arrives.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from click.testing import CliRunner

from edgefleet.controller.cli import cli
from edgefleet.controller.presence import DUPLICATE_EVENT_KIND
from edgefleet.shared.link import BrokerSettings
from tests.e2e.harness import Harness, wait_for


def test_two_agents_with_one_device_id_are_detected_and_shown(
    tmp_path: Path, broker: BrokerSettings
) -> None:
    h = Harness(tmp_path, broker, f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        device_id = h.enroll("dup")
        other = h.enroll("alone")
        config = h.agent_config("dup", telemetry_interval_s=0.3)
        first = h.start_agent(dataclasses.replace(config, state_dir=tmp_path / "a"))
        h.start_agent(h.agent_config("alone", telemetry_interval_s=0.3))
        wait_for(lambda: h.summary("dup").online, 20, "the first agent online")
        time.sleep(1.5)  # a single agent is not a duplicate
        assert h.summary("dup").duplicate_at is None
        second = h.start_agent(dataclasses.replace(config, state_dir=tmp_path / "b"))
        wait_for(
            lambda: h.summary("dup").duplicate_at is not None, 30, "the duplicate to be noticed"
        )
        assert h.summary("alone").duplicate_at is None
        events = [e for e in h.registry.events_for(device_id) if e.kind == DUPLICATE_EVENT_KIND]
        assert len(events) == 1 and events[0].detail is not None
        assert events[0].detail["reason"] in {"journals", "telemetry_overlap", "status_flapping"}

        # The second one stops; its "offline" stays retained on the broker.
        second.stop()
        assert first.link.connected or wait_for(lambda: first.link.connected, 20) is None
        wait_for(lambda: h.summary("dup").online, 10, "the running agent to show online")
        seen = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            seen.append(h.summary("dup").online)
            time.sleep(0.1)
        assert all(seen), seen  # online for as long as its telemetry arrives

        # What the operator sees.
        args = ["--database-url", h.registry.url, "--home", str(tmp_path / "cli")]
        runner = CliRunner()
        table = runner.invoke(cli, [*args, "devices"], catch_exceptions=False).output
        row = next(line for line in table.splitlines() if line.startswith(device_id))
        assert "yes (duplicate id?)" in row
        assert f"seem to be used by two agents at once: {device_id}" in table
        assert other not in table.split("two agents at once:")[1]
        status = json.loads(runner.invoke(cli, [*args, "status", "--json"]).output)
        assert status["duplicate_ids"] == 1
        shown = runner.invoke(cli, [*args, "device", "events", device_id]).output
        assert DUPLICATE_EVENT_KIND in shown
        assert not (tmp_path / "cli").exists()  # read-only commands on a database need no home
    finally:
        h.close()
