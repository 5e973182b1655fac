"""Key rotation without touching devices, and an offline root key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.controller.errors import KeyPermissionError, TrustError
from edgefleet.controller.trust import TrustRepository
from tests.e2e.harness import Harness, infer


def _keyids(repo: TrustRepository, role: str) -> list[str]:
    root = json.loads(repo.root_bytes())
    keyids: list[str] = root["signed"]["roles"][role]["keyids"]
    return keyids


def test_rotating_online_keys_mid_fleet_then_deploying_again(harness: Harness) -> None:
    harness.register("1.0")
    agents = []
    for name in ("gw-k1", "gw-k2"):
        harness.enroll(name)
        agents.append(harness.start_agent(harness.agent_config(name)))
    harness.deploy("1.0", "gw-k1", "gw-k2")
    for agent in agents:
        harness.wait_active(agent, "1.0")

    roles = ("targets", "snapshot", "timestamp")
    old = {role: _keyids(harness.repository, role) for role in roles}
    # Rotate through a second handle, as `edgefleet keys rotate` in another
    # process would: the running controller must notice and use the new keys.
    operator = TrustRepository.open(harness.repository.root)
    for role, previous in old.items():
        new_keyid = operator.rotate_key(role)
        assert _keyids(harness.repository, role) == [new_keyid]
        assert new_keyid not in previous
    # The controller process signs with the new keys too (it reloads on root change).
    harness.register("2.0")
    harness.deploy("2.0", "gw-k1", "gw-k2")
    for agent in agents:
        harness.wait_active(agent, "2.0")
        assert infer(agent)["model"]["version"] == "2.0"
    # The agents now trust the newest root (version 1 + three rotations).
    for agent in agents:
        trusted = json.loads((agent.installer.metadata_dir / "root.json").read_bytes())
        assert trusted["signed"]["version"] == 4


def test_offline_root_key(harness: Harness, tmp_path: Path) -> None:
    offline = tmp_path / "offline" / "root.key"
    offline.parent.mkdir()
    harness.repository.take_root_key_offline(offline)
    assert not harness.repository.root_key_online
    assert offline.stat().st_mode & 0o777 == 0o600
    # Day-to-day publishing needs no root key.
    harness.register("1.0")
    with pytest.raises(TrustError, match="offline"):
        harness.repository.rotate_key("timestamp")
    # A reopened repository works without it, too.
    reopened = TrustRepository.open(harness.repository.root)
    with pytest.raises(TrustError, match="not the root key"):
        reopened.rotate_key("timestamp", root_key=harness.repository.root / "keys" / "targets.key")
    reopened.rotate_key("timestamp", root_key=offline)
    assert reopened.renew_root(root_key=offline) == 3

    harness.enroll("gw-off")
    agent = harness.start_agent(harness.agent_config("gw-off"))  # enrolled with root v1
    harness.deploy("1.0", "gw-off")
    harness.wait_active(agent, "1.0")


def test_root_key_file_with_loose_permissions_is_refused(harness: Harness, tmp_path: Path) -> None:
    offline = tmp_path / "root.key"
    harness.repository.take_root_key_offline(offline)
    offline.chmod(0o644)
    with pytest.raises(KeyPermissionError):
        harness.repository.rotate_key("snapshot", root_key=offline)
