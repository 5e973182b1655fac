"""Malformed, truncated, oversized and impersonating payloads on every topic.

Both sides must log and count each rejection and keep working: the agent keeps
serving, the controller keeps ingesting, and a deployment still goes through.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from click.testing import CliRunner

from edgefleet.controller.cli import cli
from edgefleet.protocols.bounds import KNOWN_REJECTION_REASONS
from edgefleet.protocols.framing import BlockFrame
from edgefleet.protocols.messages import (
    DesiredState,
    Event,
    EventKind,
    FileRequest,
    LatencySummary,
    ModelRef,
    Telemetry,
)
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings, MqttLink
from tests.e2e.harness import Harness, infer, wait_for


def corpus(valid: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [
        b"",
        b"\x00\xff" * 10,
        valid[: len(valid) // 2],
        valid + b"garbage",
        b"[1, 2, 3]",
        b'{"v": 1}',
        b'{"v": "one", "device_id": 5}',
        json.dumps({"v": 1, "device_id": "x" * 5000}).encode(),
        b"{" * 5000,
        b" " * 300_000,
        bytes(rng.getrandbits(8) for _ in range(200)),
    ]


def test_agent_counts_and_survives_hostile_messages(harness: Harness) -> None:
    harness.register("1.0")
    device_id = harness.enroll("gw-h")
    agent = harness.start_agent(harness.agent_config("gw-h"))
    harness.deploy("1.0", "gw-h")
    harness.wait_active(agent, "1.0")

    attacker = MqttLink(harness.broker, f"attacker-{harness.token}")
    attacker.start()
    desired_topic = str(DeviceTopic(device_id, Channel.DESIRED))
    blocks_topic = str(DeviceTopic(device_id, Channel.FILE_BLOCKS))
    valid = DesiredState(device_id, 1, None).encode()
    for payload in corpus(valid, 1):
        attacker.publish(desired_topic, payload, qos=1)
    other = DesiredState("someone-else", 5, ModelRef("m", "1", 9, "m/1/x.bundle")).encode()
    attacker.publish(desired_topic, other, qos=1)
    frame = BlockFrame.data("ab" * 16, 0, 1024, 10, b"0123456789").encode()
    for payload in corpus(frame, 2):
        attacker.publish(blocks_topic, payload, qos=1, wait_s=5)

    def counted() -> bool:
        r = agent.rejections.snapshot()
        return (
            r.get("malformed_desired", 0) >= 10
            and r.get("wrong_device", 0) >= 1
            and r.get("malformed_frame", 0) >= 9
        )

    wait_for(counted, what=f"agent rejections, have {agent.rejections.snapshot()}")
    assert infer(agent)["model"]["version"] == "1.0"
    # The agent's refusals reach the controller in its telemetry.
    agent.flush_telemetry()
    name = f"agent_rejected.{device_id}.malformed_desired"
    wait_for(
        lambda: harness.registry.counters().get(name, 0) >= 10,
        what="agent rejections stored by the controller",
    )
    # The retained desired state is still the controller's, and a new deploy works.
    harness.register("2.0")
    harness.deploy("2.0", "gw-h")
    harness.wait_active(agent, "2.0")
    attacker.stop()


def test_controller_counts_and_survives_hostile_messages(harness: Harness) -> None:
    device_id = harness.enroll("gw-c")
    attacker = MqttLink(harness.broker, f"attacker-c-{harness.token}")
    attacker.start()
    request = FileRequest(device_id, "cd" * 16, "metadata/timestamp.json", 65536, ((0, 1),))
    for channel in (Channel.REPORTED, Channel.EVENTS, Channel.TELEMETRY, Channel.FILE_REQUEST):
        for payload in corpus(request.encode(), 3):
            attacker.publish(str(DeviceTopic(device_id, channel)), payload, qos=1)
    attacker.publish(str(DeviceTopic(device_id, Channel.STATUS)), b"maybe", qos=1)
    # Impersonation: a message naming another device on this device's topic.
    forged = FileRequest("gw-other", "cd" * 16, "metadata/timestamp.json", 65536, ((0, 1),))
    attacker.publish(str(DeviceTopic(device_id, Channel.FILE_REQUEST)), forged.encode(), qos=1)
    # A device that was never enrolled.
    stranger = FileRequest(
        f"stranger-{harness.token}", "cd" * 16, "metadata/timestamp.json", 65536, ((0, 1),)
    )
    attacker.publish(
        str(DeviceTopic(stranger.device_id, Channel.FILE_REQUEST)),
        stranger.encode(),
        qos=1,
        wait_s=5,
    )

    def counted() -> bool:
        r = harness.service.rejected()
        return all(
            r.get(k, 0) >= 1
            for k in (
                "malformed_reported",
                "malformed_events",
                "malformed_telemetry",
                "malformed_file_request",
                "malformed_status",
                "device_mismatch",
                "unknown_device",
            )
        )

    wait_for(counted, what=f"controller rejections, have {harness.service.rejected()}")
    # Still fully working: a real agent enrolls, installs and reports.
    harness.register("1.0")
    agent = harness.start_agent(harness.agent_config("gw-c"))
    harness.deploy("1.0", "gw-c")
    harness.wait_active(agent, "1.0")
    wait_for(lambda: harness.summary("gw-c").online, what="online")
    attacker.stop()
    # Rejections are persisted for `edgefleet status`.
    harness.service.flush_rejections()
    counters = harness.registry.fleet_status().counters
    assert counters.get("rejected.device_mismatch", 0) >= 1


def test_hostile_values_are_refused_counted_and_views_keep_working(
    tmp_path: Path, broker: BrokerSettings
) -> None:
    """Issue 9, items 5 and 6: values, clock, event size and count, counter names."""
    harness = Harness(
        tmp_path, broker, f"sqlite:///{tmp_path / 'registry.db'}", max_events_per_device=5
    )
    try:
        harness.enroll("gw-v")
        attacker = MqttLink(harness.broker, f"attacker-v-{harness.token}")
        attacker.start()
        try:
            send_hostile_values_and_check(harness, attacker, "gw-v", tmp_path / "cli")
        finally:
            attacker.stop()
    finally:
        harness.close()


def send_hostile_values_and_check(
    harness: Harness, attacker: MqttLink, name: str, cli_home: Path
) -> None:
    """Publish poisoned telemetry and events on device ``name``'s topics through ``attacker``.

    Then check each is refused or bounded, counted for the fleet and for the
    device, and that ``devices`` and ``status`` still work. ``harness`` must
    run with ``max_events_per_device=5``. Also run through the production TLS
    broker with the device's own certificate (``tests/security/test_hostile_tls.py``).
    """
    device_id = harness.device_id(name)
    telemetry_topic = str(DeviceTopic(device_id, Channel.TELEMETRY))
    events_topic = str(DeviceTopic(device_id, Channel.EVENTS))
    now = time.time()
    good = Telemetry(
        device_id, 10.0, 100, 1, LatencySummary(1.0, 2.0, 3.0), None, 1000, 5.0, {}, now
    )
    body = json.loads(good.encode())

    def send(topic: str, **changes: object) -> None:
        attacker.publish(topic, json.dumps({**body, **changes}).encode(), qos=1, wait_s=5)

    # Values that broke the views (two of these overflowed SUM), and lies.
    send(telemetry_topic, requests=2**63 - 1, errors=0)
    send(telemetry_topic, requests=2**63 - 1, errors=0)
    send(telemetry_topic, latency_ms={"p50": -1.0, "p95": 2.0, "p99": 3.0})
    send(telemetry_topic, requests=5, errors=6)
    send(telemetry_topic, window_s=-10.0)
    send(telemetry_topic, cpu_percent=-1.0)
    # A timestamp in the year 9999: a row that would never expire.
    send(telemetry_topic, at=253_370_764_800.0)
    # Invented rejection reasons: folded into "other", no counter per key.
    send(telemetry_topic, rejected={f"invented_{i}": 1 for i in range(60)})
    # One valid window still gets through.
    send(telemetry_topic, requests=7, errors=0)
    # Events: a flood beyond the per-device cap, then a 250 KB unknown field.
    event = json.loads(Event(device_id, EventKind.REJECTED, at=now).encode())
    for generation in range(1, 13):
        attacker.publish(
            events_topic,
            json.dumps({**event, "generation": generation}).encode(),
            qos=1,
            wait_s=5,
        )
    attacker.publish(
        events_topic,
        json.dumps({**event, "generation": 13, "blob": "x" * 250_000}).encode(),
        qos=1,
        wait_s=5,
    )

    def counted() -> bool:
        harness.service.flush_rejections()
        c = harness.registry.counters()
        return (
            c.get("rejected.malformed_telemetry", 0) >= 6
            and c.get("rejected.clock_skew", 0) >= 1
            and c.get("rejected.event_cap", 0) >= 8
        )

    wait_for(counted, what=f"counted refusals, have {harness.registry.counters()}")
    wait_for(
        lambda: harness.summary(name).inferences == 107,
        what=f"the valid windows stored, have {harness.summary(name)}",
    )
    counters = harness.registry.counters()
    # Counted per device too, for the operator to find the source.
    assert counters[f"device_rejected.{device_id}.malformed_telemetry"] >= 6
    assert counters[f"device_rejected.{device_id}.clock_skew"] == 1
    assert counters[f"device_rejected.{device_id}.event_cap"] == 8
    # Counter rows this device can create are bounded by the known reasons.
    # (Stored in the same ingest round as the window, but after it: wait.)
    other = f"agent_rejected.{device_id}.other"
    wait_for(lambda: other in harness.registry.counters(), what=f"{other} stored")
    counters = harness.registry.counters()
    mine = [n for n in counters if n.startswith(f"agent_rejected.{device_id}.")]
    assert mine == [f"agent_rejected.{device_id}.other"]
    assert counters[mine[0]] == 60
    assert {n.rsplit(".", 1)[-1] for n in mine} <= KNOWN_REJECTION_REASONS
    # The newest 5 events are kept; the 250 KB field was not stored whole.
    events = harness.registry.events_for(device_id, limit=100)
    assert [e.generation for e in events] == [13, 12, 11, 10, 9]
    assert events[0].detail == {"extra": {"_truncated": {"bytes": 250_011, "keys": 1}}}
    # The views work and are sane; `status` stays small.
    summary = harness.summary(name)
    assert (summary.inferences, summary.errors) == (107, 1)
    shown = CliRunner().invoke(
        cli,
        [
            "--database-url",
            harness.registry.url,
            "--home",
            str(cli_home),
            "status",
            "--json",
        ],
        catch_exceptions=False,
    )
    assert shown.exit_code == 0, shown.output
    status = json.loads(shown.output)
    assert status["inferences"] == 107
    assert status["rejected"]["clock_skew"] == 1
    assert status["agent_rejected"] == {"other": 60}
    # Per device and reason, for the operator to find the source.
    mine_shown = status["by_device"][device_id]
    assert mine_shown["rejected_by_controller"]["event_cap"] == 8
    assert mine_shown["rejected_by_controller"]["malformed_telemetry"] >= 6
    assert mine_shown["refused_by_agent"] == {"other": 60}
    assert len(shown.output) < 2000
    devices = CliRunner().invoke(
        cli,
        ["--database-url", harness.registry.url, "--home", str(cli_home), "devices"],
        catch_exceptions=False,
    )
    assert devices.exit_code == 0 and "107" in devices.output
