"""The walking skeleton end to end: register, sign, deploy over MQTT, install, serve, report."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from click.testing import CliRunner

from edgefleet.agent.fetcher import PartialStore, TransferSettings
from edgefleet.controller.cli import cli
from edgefleet.controller.demo import run_demo
from edgefleet.controller.demo_model import CLASSES
from edgefleet.protocols.messages import DesiredState
from edgefleet.protocols.topics import Channel, DeviceTopic
from tests.e2e.harness import Harness, infer, wait_for, wide_model


def test_deploy_install_serve_and_report(harness: Harness) -> None:
    registered = harness.register("1.0")
    # The demo model's bundle compresses by more than 5%: what travels is xz,
    # with its decompressed size signed (the agent below unpacks it).
    target = harness.repository.get_target(registered.bundles[0].target_path)
    assert target is not None
    compression = target.unrecognized_fields.get("custom", {}).get("compression")
    assert compression is not None and compression["codec"] == "lzma", target.to_dict()
    assert compression["decompressed_length"] > target.length
    harness.enroll("gw-a")
    agent = harness.start_agent(harness.agent_config("gw-a"))
    harness.deploy("1.0", "gw-a")
    harness.wait_active(agent, "1.0")
    result = infer(agent)
    assert result["model"]["version"] == "1.0"
    assert len(result["outputs"]["probabilities"][0]) == CLASSES
    wait_for(lambda: harness.summary("gw-a").inferences >= 1, what="telemetry stored")
    summary = harness.summary("gw-a")
    assert summary.active_version == "1.0"
    assert summary.online
    assert summary.p50_ms is not None
    kinds = [e.kind for e in harness.registry.events_for(harness.device_id("gw-a"))]
    assert {"verified", "download_started", "installed"} <= set(kinds)


def test_demo_runs_on_the_given_broker(harness: Harness) -> None:
    result = run_demo(3, requests_per_agent=5, broker=harness.broker, workdir=harness.tmp / "demo")
    assert result.ok, result.to_dict()
    assert [d.inferences for d in result.devices] == [5, 5, 5]


def test_offline_device_catches_up_and_repeats_change_nothing(harness: Harness) -> None:
    harness.register("1.0")
    harness.enroll("gw-late")
    harness.deploy("1.0", "gw-late")  # the device is not running yet
    agent = harness.start_agent(harness.agent_config("gw-late"))
    wait_for(lambda: agent.installs == 1, what="the install to finish")
    # Re-publish the same retained desired state: nothing is installed again.
    desired = harness.registry.desired_for(harness.device_id("gw-late"))
    assert desired is not None
    topic = str(DeviceTopic(desired.device_id, Channel.DESIRED))
    for _ in range(3):
        harness.service.link.publish(topic, desired.encode(), qos=1, retain=True, wait_s=5)
    harness.deploy("1.0", "gw-late")  # a new generation of the same model
    wait_for(lambda: harness.summary("gw-late").active_version == "1.0")
    assert agent.installs == 1


def test_last_will_marks_a_crashed_agent_offline(harness: Harness) -> None:
    harness.enroll("gw-lwt")
    agent = harness.start_agent(harness.agent_config("gw-lwt"))
    wait_for(lambda: harness.summary("gw-lwt").online, what="online")
    agent.stop(clean=False)
    wait_for(lambda: not harness.summary("gw-lwt").online, timeout_s=60, what="offline via LWT")


def test_tampered_bundle_is_refused_and_old_model_keeps_serving(harness: Harness) -> None:
    harness.register("1.0")
    v2 = harness.register("2.0", wide_model(256))
    harness.enroll("gw-t")
    agent = harness.start_agent(harness.agent_config("gw-t"))
    harness.deploy("1.0", "gw-t")
    harness.wait_active(agent, "1.0")
    # Flip one byte of the stored 2.0 bundle after it was signed.
    stored = next(harness.repository.root.glob(f"targets/**/{v2.bundles[0].sha256}.*"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    harness.deploy("2.0", "gw-t")
    summary = harness.wait_error("gw-t", "tampered")
    assert summary.active_version == "1.0"
    assert infer(agent)["model"]["version"] == "1.0"
    kinds = [e.kind for e in harness.registry.events_for(harness.device_id("gw-t"))]
    assert "rejected" in kinds
    # An operator sees the refusal and its reason.
    shown = CliRunner().invoke(
        cli,
        [
            "--database-url",
            harness.registry.url,
            "--home",
            str(harness.tmp / "cli"),
            "device",
            "events",
            harness.device_id("gw-t"),
            "--json",
        ],
        catch_exceptions=False,
    )
    assert shown.exit_code == 0, shown.output
    refused = [e for e in json.loads(shown.output) if e["kind"] == "rejected"]
    assert refused[0]["code"] == "tampered"


def test_expired_metadata_is_refused(harness: Harness) -> None:
    harness.register("1.0")
    harness.enroll("gw-x")
    agent = harness.start_agent(harness.agent_config("gw-x"))
    # A controller that stopped re-signing (or an attacker replaying old
    # metadata) leaves agents with expired metadata: a freeze.
    harness.service.settings = replace(harness.service.settings, refresh_metadata=False)
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    harness.repository.publish(expires_override={"timestamp": past})
    harness.deploy("1.0", "gw-x")
    harness.wait_error("gw-x", "expired_metadata")
    assert agent.active_model is None


def test_release_rollback_is_refused(harness: Harness) -> None:
    harness.register("1.0")
    harness.register("2.0")
    harness.enroll("gw-r")
    agent = harness.start_agent(harness.agent_config("gw-r"))
    harness.deploy("2.0", "gw-r")
    harness.wait_active(agent, "2.0")
    harness.deploy("1.0", "gw-r")  # release 1 < release 2 already run
    summary = harness.wait_error("gw-r", "release_rollback")
    assert summary.active_version == "2.0"


def test_bundle_for_another_hardware_class_is_refused(harness: Harness) -> None:
    registered = harness.register("1.0", hardware_classes=("arm64-dotprod",))
    device_id = harness.enroll("gw-hw")
    harness.start_agent(harness.agent_config("gw-hw"))
    # The registry would never send it; a compromised broker or controller might.
    ref = harness.registry.list_model_versions()[0]
    from edgefleet.protocols.messages import ModelRef

    forged = DesiredState(
        device_id,
        99,
        ModelRef(ref.name, ref.version, ref.release, registered.bundles[0].target_path),
        "forged",
    )
    harness.service.link.publish(
        str(DeviceTopic(device_id, Channel.DESIRED)), forged.encode(), qos=1, retain=True, wait_s=5
    )
    harness.wait_error("gw-hw", "wrong_hardware")


def test_smoke_test_failure_keeps_previous_model(harness: Harness) -> None:
    harness.register("1.0")
    harness.register_broken("2.0")
    harness.enroll("gw-s")
    agent = harness.start_agent(harness.agent_config("gw-s"))
    harness.deploy("1.0", "gw-s")
    harness.wait_active(agent, "1.0")
    harness.deploy("2.0", "gw-s")
    summary = harness.wait_error("gw-s", "smoke_test_failed")
    assert summary.active_version == "1.0"
    assert infer(agent)["model"]["version"] == "1.0"
    assert agent.slots.previous() is None or agent.slots.previous().model.version != "2.0"


def test_interrupted_transfer_resumes_after_agent_restart(harness: Harness) -> None:
    harness.register("1.0")
    v2 = harness.register("2.0", wide_model(4096))
    harness.enroll("gw-resume")
    transfer = TransferSettings(block_size_bytes=1024, window_blocks=2, request_timeout_s=2.0)
    config = harness.agent_config("gw-resume", transfer=transfer)
    first = harness.start_agent(config)
    harness.deploy("1.0", "gw-resume")
    harness.wait_active(first, "1.0")
    harness.deploy("2.0", "gw-resume")
    target_path = (
        "targets/"
        + harness.repository.get_target(v2.bundles[0].target_path).get_prefixed_paths()[0]
    )
    wait_for(lambda: first.fetcher.blocks_by_path[target_path] >= 40, what="part of the download")
    first.stop(clean=False)  # a crash in the middle of the install
    total_blocks = -(-v2.bundles[0].length // 1024)
    kept = PartialStore(config.state_dir / "partial").blocks_present(target_path, 1024)
    assert 40 <= kept < total_blocks - 10, "the first run must not have finished"

    second = harness.start_agent(config)
    assert second.active_model is not None and second.active_model.version == "1.0"
    harness.wait_active(second, "2.0", timeout_s=60)
    # Only the missing blocks travel again.
    assert second.fetcher.blocks_by_path[target_path] == total_blocks - kept
    assert infer(second)["model"]["version"] == "2.0"
    assert second.slots.previous() is not None
    assert second.slots.previous().model.version == "1.0"


def test_registry_backends_carry_the_path(harness_db: Harness) -> None:
    harness_db.register("1.0")
    harness_db.enroll("gw-db")
    agent = harness_db.start_agent(harness_db.agent_config("gw-db"))
    harness_db.deploy("1.0", "gw-db")
    harness_db.wait_active(agent, "1.0")
    infer(agent)
    wait_for(lambda: harness_db.summary("gw-db").inferences >= 1, what="telemetry stored")


def test_agent_never_imports_the_controller() -> None:
    code = (
        "import sys\n"
        "import edgefleet.agent.daemon, edgefleet.agent.cli, edgefleet.agent.install\n"
        "bad = sorted(m for m in sys.modules if m.startswith('edgefleet.controller'))\n"
        "heavy = [m for m in ('sqlalchemy', 'click', 'alembic', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
