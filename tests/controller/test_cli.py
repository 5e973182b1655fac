"""The CLI through click's CliRunner, against a real broker and a real registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from edgefleet.agent.config import load_agent_config
from edgefleet.controller.cli import cli
from edgefleet.controller.demo_model import build_demo_model, demo_inputs
from edgefleet.shared.link import BrokerSettings


@pytest.fixture
def home(tmp_path: Path, embedded_broker: BrokerSettings) -> Path:
    config = tmp_path / "controller.toml"
    config.write_text(
        f'home = "state"\n[broker]\nhost = "{embedded_broker.host}"\n'
        f"port = {embedded_broker.port}\n"
    )
    return config


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


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
    assert deployed["published"] == 1

    devices = json.loads(run(home, "devices", "--json").output)
    assert devices[0]["id"] == "gw-9"
    assert devices[0]["desired_version"] == "1.0"
    table = run(home, "devices").output
    assert "gw-9" in table and "DESIRED" in table

    models = json.loads(run(home, "model", "list", "--json").output)
    assert [(m["name"], m["version"]) for m in models] == [("clf", "1.0")]
    status = json.loads(run(home, "status", "--json").output)
    assert status["devices"] == 1


def test_errors_are_one_line_not_tracebacks(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a model")
    result = run(home, "model", "register", str(bad), "--name", "x", "--version", "1")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert "Traceback" not in result.output

    result = run(home, "deploy", "nope", "1.0", "--all")
    assert result.exit_code == 1
    assert "Traceback" not in result.output

    result = run(home, "deploy", "nope", "1.0")
    assert result.exit_code == 2  # usage error: no targets given

    cfg = tmp_path / "broken.toml"
    cfg.write_text("home = [")
    result = run(cfg, "status")
    assert result.exit_code == 1
    assert "not valid TOML" in result.output


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


def test_register_with_profiles_compiles_and_stores_reports(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_demo_model())
    np.savez(tmp_path / "val.npz", **demo_inputs(150, seed=2))
    np.savez(tmp_path / "cal.npz", **demo_inputs(32, seed=3))
    result = run(
        home,
        "model",
        "register",
        str(model),
        "--name",
        "clf",
        "--version",
        "2.0",
        "--profile",
        "x86-avx2",
        "--validation",
        str(tmp_path / "val.npz"),
        "--calibration",
        str(tmp_path / "cal.npz"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    classes = {b["hardware_class"]: b for b in data["bundles"]}
    assert set(classes) == {"generic", "x86-avx2"}
    assert classes["generic"]["precision"] == "fp32"
    report = data["reports"]["x86-avx2"]
    chosen = [c for c in report["candidates"] if c.get("status") == "chosen"]
    assert len(chosen) == 1
    assert chosen[0]["precision"] == classes["x86-avx2"]["precision"]

    stored = json.loads(run(home, "model", "report", "clf", "2.0", "--json").output)
    assert stored["x86-avx2"] == report
    table = run(home, "model", "report", "clf", "2.0").output
    assert "x86-avx2" in table and "chosen" in table.lower()


def test_register_refuses_unknown_profile(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_demo_model())
    result = run(
        home,
        "model",
        "register",
        str(model),
        "--name",
        "clf",
        "--version",
        "3.0",
        "--profile",
        "no-such-profile",
    )
    assert result.exit_code == 1
    assert "no-such-profile" in result.output
    assert json.loads(run(home, "model", "list", "--json").output) == []


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
