"""``edgefleet demo --json``: the contract scripts rely on."""

from __future__ import annotations

import json

from click.testing import CliRunner

from edgefleet.controller.cli import cli


def test_demo_json_contract() -> None:
    result = CliRunner().invoke(
        cli, ["demo", "--agents", "2", "--requests", "3", "--json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True
    assert len(data["devices"]) == 2
    for device in data["devices"]:
        assert {"id", "model_version", "status", "inferences", "p50_ms"} <= set(device)
        assert device["status"] == "active"
        assert device["inferences"] == 3
