"""``edgefleet keys ...``: rotation, the offline root key and root renewal, with real files."""

from __future__ import annotations

import json
from pathlib import Path

from tests.controller.cli.runner import run


def test_keys_rotate_offline_root_and_renew(home: Path, tmp_path: Path) -> None:
    assert run(home, "init").exit_code == 0
    shown = json.loads(run(home, "keys", "show", "--json").output)
    assert shown["root_version"] == 1
    assert shown["root_key_online"] is True
    old = {r["role"]: r["keyids"] for r in shown["roles"]}

    rotated = json.loads(run(home, "keys", "rotate", "targets", "--json").output)
    assert rotated["keyid"] not in old["targets"]

    offline = tmp_path / "root.key"
    assert run(home, "keys", "offline-root", "--out", str(offline)).exit_code == 0
    refused = run(home, "keys", "rotate", "snapshot")
    assert refused.exit_code == 1
    assert "offline" in refused.output
    assert run(home, "keys", "rotate", "snapshot", "--root-key", str(offline)).exit_code == 0
    renewed = run(home, "keys", "renew-root", "--root-key", str(offline))
    assert renewed.exit_code == 0, renewed.output
    assert "version 4" in renewed.output
    shown = json.loads(run(home, "keys", "show", "--json").output)
    assert shown["root_key_online"] is False
