"""The attacks TUF names, through the real MQTT path, each refused with its own error.

Tampering, freeze (expired metadata), rollback and wrong hardware live in
test_deploy_path.py; here: endless data, mix-and-match, slow retrieval, and
the timestamp re-signing that keeps a healthy fleet out of freeze protection.
Every refusal must reach the controller as an event an operator can see.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from edgefleet.agent.fetcher import TransferSettings
from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.service import ControllerService
from tests.e2e.harness import Harness, infer, wait_for, wide_model


def _stored_target(harness: Harness, sha256: str):  # type: ignore[no-untyped-def]
    return next(harness.repository.root.glob(f"targets/**/{sha256}.*"))


def test_endless_data_is_refused(harness: Harness) -> None:
    harness.register("1.0")
    v2 = harness.register("2.0")
    harness.enroll("gw-e")
    agent = harness.start_agent(harness.agent_config("gw-e"))
    harness.deploy("1.0", "gw-e")
    harness.wait_active(agent, "1.0")
    # A compromised server answers with far more bytes than TUF promised.
    stored = _stored_target(harness, v2.bundles[0].sha256)
    stored.write_bytes(stored.read_bytes() + b"\0" * 5_000_000)
    harness.deploy("2.0", "gw-e")
    summary = harness.wait_error("gw-e", "endless_data")
    assert summary.active_version == "1.0"
    # No more than the promised length (plus at most one window of blocks) was kept.
    partial = agent.config.state_dir / "partial"
    kept = sum(p.stat().st_size for p in partial.rglob("data")) if partial.exists() else 0
    assert kept <= v2.bundles[0].length + 16 * 65536
    # The rejection event travels on its own (journaled, acknowledged later).
    wait_for(
        lambda: any(
            e.kind == "rejected" for e in harness.registry.events_for(harness.device_id("gw-e"))
        ),
        30,
        "the rejected event",
    )


def test_mix_and_match_metadata_is_refused(harness: Harness) -> None:
    harness.register("1.0")
    harness.enroll("gw-m")
    agent = harness.start_agent(harness.agent_config("gw-m"))
    metadata = harness.repository.root / "metadata"
    # Keep the targets metadata that lists only 1.0 ...
    old_targets = {p.name: p.read_bytes() for p in metadata.glob("*.targets.json")}
    harness.register("2.0")
    # ... and serve it under the name the new snapshot expects: a mix of versions.
    newest = max(metadata.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    oldest_name = min(old_targets, key=lambda n: int(n.split(".")[0]))
    newest.write_bytes(old_targets[oldest_name])
    harness.deploy("2.0", "gw-m")
    harness.wait_error("gw-m", "untrusted_metadata")
    assert agent.active_model is None


def test_slow_retrieval_times_out_retries_and_recovers(harness: Harness) -> None:
    harness.register("1.0")
    v2 = harness.register("2.0", wide_model(8192))
    harness.enroll("gw-slow")
    transfer = TransferSettings(block_size_bytes=1024, window_blocks=1, request_timeout_s=0.5,
                                max_attempts=2)
    agent = harness.start_agent(harness.agent_config("gw-slow", transfer=transfer))
    harness.deploy("1.0", "gw-slow")
    harness.wait_active(agent, "1.0")
    harness.deploy("2.0", "gw-slow")
    target = harness.repository.get_target(v2.bundles[0].target_path)
    assert target is not None
    path = "targets/" + target.get_prefixed_paths()[0]
    wait_for(lambda: agent.fetcher.blocks_by_path[path] > 20, what="the 2.0 download to start")
    harness.service.stop()  # the server stalls mid-transfer
    assert agent.active_model is not None and agent.active_model.version == "1.0"

    def timed_out() -> bool:
        error = agent.reported_state().last_error
        return error is not None and error.code == "transfer_timeout"

    wait_for(timed_out, what="a transfer timeout")
    assert infer(agent)["model"]["version"] == "1.0"  # still serving, no hang
    # The server comes back: the agent retries on its own and finishes.
    harness.service = ControllerService(
        harness.registry,
        harness.repository,
        harness.broker,
        ServiceSettings(
            client_id=f"e2e-controller-2-{harness.token}",
            maintenance_interval_s=0.5,
            ingest_flush_s=0.1,
        ),
    )
    harness.service.start()
    harness.wait_active(agent, "2.0", timeout_s=60)


def test_timestamp_is_resigned_before_it_expires(harness: Harness) -> None:
    harness.register("1.0")
    soon = datetime.now(timezone.utc) + timedelta(minutes=30)
    harness.repository.publish(expires_override={"timestamp": soon})
    timestamp = harness.repository.root / "metadata" / "timestamp.json"
    before = json.loads(timestamp.read_bytes())["signed"]["version"]
    # The controller re-signs timestamps that expire within its window (6 h).
    harness.service.settings = replace(harness.service.settings, refresh_metadata=True)
    wait_for(
        lambda: json.loads(timestamp.read_bytes())["signed"]["version"] > before,
        what="timestamp re-signed",
    )
    expires = json.loads(timestamp.read_bytes())["signed"]["expires"]
    assert datetime.fromisoformat(expires.replace("Z", "+00:00")) > soon
    harness.enroll("gw-ts")
    agent = harness.start_agent(harness.agent_config("gw-ts"))
    harness.deploy("1.0", "gw-ts")
    harness.wait_active(agent, "1.0")
