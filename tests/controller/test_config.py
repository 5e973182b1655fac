from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.config import load_agent_config
from edgefleet.controller.config import load_controller_config
from edgefleet.protocols.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_example_configs_load() -> None:
    cfg = load_controller_config(REPO / "deploy" / "controller.example.toml", environ={})
    assert cfg.broker.port == 1883
    agent = load_agent_config(REPO / "deploy" / "agent.example.toml")
    assert agent.device_id == "gw-0001"
    assert agent.transfer.block_size_bytes == 65536


def test_environment_and_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('home = "h"\ndatabase_url = "sqlite:///file.db"\n')
    cfg = load_controller_config(path, environ={"EDGEFLEET_DATABASE_URL": "sqlite:///env.db"})
    assert cfg.home == tmp_path / "h"
    assert cfg.registry_url == "sqlite:///env.db"
    flag = load_controller_config(path, database_url="sqlite:///flag.db", environ={})
    assert flag.registry_url == "sqlite:///flag.db"


def test_custom_profiles_are_added(tmp_path: Path) -> None:
    (tmp_path / "profiles.toml").write_text(
        '[profiles.pi5]\nruntime = "onnxruntime"\narch = "arm64"\n'
        'cpu_features = ["asimddp"]\nprecisions = ["fp32", "int8"]\nobjective = "latency"\n'
    )
    path = tmp_path / "c.toml"
    path.write_text('profiles = "profiles.toml"\n')
    profiles = load_controller_config(path, environ={}).device_profiles()
    assert "pi5" in profiles
    assert "x86-vnni" in profiles


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("homes = 'x'\n", "unknown setting"),
        ("[broker]\nport = 0\n", "port"),
        ("[broker]\nhots = 'x'\n", r"unknown \[broker\]"),
        ("home = [\n", "not valid TOML"),
    ],
)
def test_bad_controller_configs_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_controller_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('state_dir = "s"\n', "device_id and state_dir are required"),
        ('device_id = "a/b"\nstate_dir = "s"\n', "invalid device id"),
        ('device_id = "a"\nstate_dir = "s"\n[transfer]\nblock = 1\n', r"unknown \[transfer\]"),
        ('device_id = "a"\nstate_dir = "s"\ntelemetry_interval_s = 0\n', "positive"),
    ],
)
def test_bad_agent_configs_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "a.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_agent_config(path)


def test_the_cli_uses_its_own_certificate_or_leaves_publishing_to_serve(tmp_path: Path) -> None:
    """The broker binds client ids to certificates: the CLI must not borrow `serve`'s."""
    path = tmp_path / "c.toml"
    broker = (
        '[broker]\ntls = true\ncert_file = "/e/controller.pem"\nkey_file = "/e/controller.key"\n'
    )
    path.write_text(broker)
    assert load_controller_config(path, environ={}).cli_broker is None
    path.write_text(broker + '[cli]\ncert_file = "/e/cli.pem"\nkey_file = "/e/cli.key"\n')
    cli = load_controller_config(path, environ={}).cli_broker
    assert cli is not None
    assert (cli.cert_file, cli.key_file, cli.tls) == ("/e/cli.pem", "/e/cli.key", True)
    path.write_text('[broker]\nport = 1883\n')  # no certificates at all (development)
    assert load_controller_config(path, environ={}).cli_broker is not None
    path.write_text('[cli]\ncert_file = "/e/cli.pem"\n')
    with pytest.raises(ConfigError, match="together"):
        load_controller_config(path, environ={})


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("max_clock_skew_s = 0", "max_clock_skew_s"),
        ("max_clock_skew_s = 172800", "max_clock_skew_s"),
        ("event_retention_s = -1", "event_retention_s"),
        ("max_events_per_device = 0", "max_events_per_device"),
    ],
)
def test_storage_bounds_are_checked(tmp_path: Path, line: str, fragment: str) -> None:
    path = tmp_path / "controller.toml"
    path.write_text(f"[service]\n{line}\n")
    with pytest.raises(ConfigError, match=fragment):
        load_controller_config(path, environ={})
