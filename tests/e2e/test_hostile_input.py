"""Malformed, truncated, oversized and impersonating payloads on every topic.

Both sides must log and count each rejection and keep working: the agent keeps
serving, the controller keeps ingesting, and a deployment still goes through.
"""

from __future__ import annotations

import json
import random

from edgefleet.protocols.framing import BlockFrame
from edgefleet.protocols.messages import DesiredState, FileRequest, ModelRef
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import MqttLink
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
