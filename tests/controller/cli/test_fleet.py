"""One operator's path: model register, device enroll, deploy, devices, status."""

from __future__ import annotations

import json
from pathlib import Path

from edgefleet.agent.config import load_agent_config
from edgefleet.controller.demo_model import build_demo_model
from tests.controller.cli.runner import run


def test_register_enroll_deploy_and_list(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_demo_model())
    result = run(
        home, "model", "register", str(model), "--name", "clf", "--version", "1.0", "--json"
    )
    assert result.exit_code == 0, result.output
    registered = json.loads(result.output)
    assert registered["release"] == 1
    assert registered["bundles"][0]["target"] == "clf/1.0/generic-fp32.bundle"

    result = run(
        home,
        "device",
        "enroll",
        "gw-9",
        "--out",
        str(tmp_path / "gw-9"),
        "--state-dir",
        str(tmp_path / "gw-9-state"),
    )
    assert result.exit_code == 0, result.output
    agent_config = load_agent_config(tmp_path / "gw-9" / "agent.toml")
    assert agent_config.device_id == "gw-9"
    assert agent_config.trust_root is not None and agent_config.trust_root.exists()

    result = run(home, "deploy", "clf", "1.0", "--all", "--json")
    assert result.exit_code == 0, result.output
    deployed = json.loads(result.output)
    assert deployed["devices"] == ["gw-9"]
    # Without --api the CLI only records; the running `serve` publishes.
    assert deployed["via"] == "registry" and deployed["recorded"] == 1
    assert deployed["published"] == 0 and deployed["unpublished"] == ["gw-9"]

    devices = json.loads(run(home, "devices", "--json").output)
    assert devices[0]["id"] == "gw-9"
    assert devices[0]["desired_version"] == "1.0"
    table = run(home, "devices").output
    assert "gw-9" in table and "DESIRED" in table

    models = json.loads(run(home, "model", "list", "--json").output)
    assert [(m["name"], m["version"]) for m in models] == [("clf", "1.0")]
    status = json.loads(run(home, "status", "--json").output)
    assert status["devices"] == 1
