"""Agent and controller settings: clear type errors, environment overrides, taken ports.

Real files, the real loaders and, for the taken HTTP port and JSON logs, the
real ``edgefleet-agent`` in its own process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.config import _TABLES, AgentConfig, load_agent_config
from edgefleet.controller.config import (
    CliSettings,
    ServiceSettings,
    load_controller_config,
)
from edgefleet.protocols.errors import ConfigError
from edgefleet.shared.link import BrokerSettings
from edgefleet.shared.settings import field_types
from tests.controller.cli.runner import run_in_home

AGENT = [sys.executable, "-m", "edgefleet.agent"]
BASE = 'device_id = "gw-1"\nstate_dir = "state"\n'


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[http]\nport = "abc"\n', "[http] port: expected an integer 0-65535, got 'abc'"),
        ("[http]\nport = 70000\n", "[http] port: expected an integer 0-65535, got 70000"),
        ('[broker]\nport = "1883"\n', "[broker] port: expected an integer 1-65535, got '1883'"),
        ("[broker]\ntls = 1\n", "[broker] tls: expected true or false, got 1"),
        ('telemetry_interval_s = "10"\n', ": telemetry_interval_s: expected a number, got '10'"),
        ("[transfer]\nmax_attempts = 2.5\n", "[transfer] max_attempts: expected an integer"),
    ],
)
def test_bad_agent_settings_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, BASE + text)
    with pytest.raises(ConfigError) as caught:
        load_agent_config(path, environ={})
    assert str(caught.value).startswith(str(path))
    assert message in str(caught.value)
    assert "not supported between" not in str(caught.value)


def test_the_agent_process_reports_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + '[http]\nport = "abc"\n')
    proc = subprocess.run(
        [*AGENT, "--config", str(path)],
        capture_output=True, text=True, timeout=60, env=_env(), check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"edgefleet-agent: error: {path} [http] port: expected an integer 0-65535, got 'abc'"
    )


def _sample(annotation: Any, name: str) -> tuple[str, Any] | None:
    """An environment text for a field of this type and the value it must become."""
    optional = typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType)
    if optional:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return "yes", True
    if annotation is int:
        return ("4242", 4242) if "port" in name else ("7", 7)
    if annotation is float:
        return "2.5", 2.5
    if annotation is str:
        return "from-env", "from-env"
    if annotation is Path:
        return "env-path", "env-path"
    return None


def test_every_agent_setting_can_come_from_the_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE)
    checked = 0
    sections: dict[str | None, type[Any]] = {None: AgentConfig, **_TABLES}
    for section, kind in sections.items():
        for name, annotation in field_types(kind).items():
            if section is None and name in _TABLES:
                continue
            sample = _sample(annotation, name)
            assert sample is not None, f"{section}.{name}: no environment conversion"
            text, want = sample
            var = "_".join(p for p in ("EDGEFLEET_AGENT", section, name) if p).upper()
            environ = {var: text}
            if section == "http" and name == "token_file":
                (tmp_path / "env-path").write_text("secret\n")
            if section == "http" and name == "token":
                want = "from-env"
            if name == "device_id":
                text = want = "gw-env"
                environ = {var: text}
            if section == "enrollment" and name != "token_file":  # needs its token file
                environ["EDGEFLEET_AGENT_ENROLLMENT_TOKEN_FILE"] = "token.json"  # noqa: S105
            if name in ("cert_file", "key_file"):  # must be given together
                environ = {
                    f"EDGEFLEET_AGENT_{section}_{n}".upper(): text
                    for n in ("cert_file", "key_file")
                }
            try:
                config = load_agent_config(path, environ=environ)
            except ConfigError as exc:  # a value its own checks refuse (e.g. a path's content)
                pytest.fail(f"{var}={text}: {exc}")
            value = getattr(config if section is None else getattr(config, section), name)
            if isinstance(value, Path):
                assert value == tmp_path / str(want) or value.name == str(want), (var, value)
            elif name.endswith("_file"):  # resolved against the config's directory, like the file's
                assert value == str(tmp_path / str(want)), (var, value)
            else:
                assert value == want, (var, value)
            checked += 1
    assert checked >= 30


@pytest.mark.parametrize(
    ("var", "text", "message"),
    [
        ("EDGEFLEET_AGENT_HTTP_PORT", "abc", "expected an integer 0-65535, got 'abc'"),
        ("EDGEFLEET_AGENT_BROKER_PORT", "0", "expected an integer 1-65535, got '0'"),
        ("EDGEFLEET_AGENT_BROKER_TLS", "maybe", "expected true or false, got 'maybe'"),
        ("EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S", "fast", "expected a number, got 'fast'"),
    ],
)
def test_bad_environment_values_name_the_variable(
    tmp_path: Path, var: str, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=f"{var}: {message}"):
        load_agent_config(_write(tmp_path, BASE), environ={var: text})


def test_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "[http]\nport = 8470\n[broker]\nhost = 'a'\n")
    config = load_agent_config(
        path, environ={"EDGEFLEET_AGENT_HTTP_PORT": "8471", "EDGEFLEET_AGENT_BROKER_HOST": "b"}
    )
    assert (config.http.port, config.broker.host) == (8471, "b")
    assert load_agent_config(path, environ={}).http.port == 8470


def test_every_controller_setting_can_come_from_the_environment(tmp_path: Path) -> None:
    sections: dict[str, type[Any]] = {
        "broker": BrokerSettings,
        "service": ServiceSettings,
        "cli": CliSettings,
    }
    checked = 0
    for section, kind in sections.items():
        for name, annotation in field_types(kind).items():
            sample = _sample(annotation, name)
            assert sample is not None, f"{section}.{name}: no environment conversion"
            text, want = sample
            if name in ("max_clock_skew_s",):
                text, want = "60", 60.0
            var = f"EDGEFLEET_{section}_{name}".upper()
            environ = {var: text}
            if name in ("cert_file", "key_file"):  # must be given together
                environ = {f"EDGEFLEET_{section}_CERT_FILE".upper(): text,
                           f"EDGEFLEET_{section}_KEY_FILE".upper(): text}  # fmt: skip
            config = load_controller_config(None, environ=environ)
            assert getattr(getattr(config, section), name) == want, var
            checked += 1
    assert checked >= 30
    config = load_controller_config(None, environ={"EDGEFLEET_PROFILES": "p.toml"})
    assert config.profiles_file == Path.cwd() / "p.toml"
    with pytest.raises(ConfigError, match="EDGEFLEET_SERVICE_RUN_ROLLOUTS: expected true or false"):
        load_controller_config(None, environ={"EDGEFLEET_SERVICE_RUN_ROLLOUTS": "perhaps"})


def _agent_files(tmp_path: Path, http_port: int) -> Path:
    home = tmp_path / "home"
    assert run_in_home(home, "init").exit_code == 0
    out = tmp_path / "gw"
    result = run_in_home(
        home, "device", "enroll", "gw-1", "--out", str(out), "--state-dir", str(tmp_path / "s"),
        "--broker-port", "9", "--agent-http-port", str(http_port),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out / "agent.toml"


def test_a_taken_http_port_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _agent_files(tmp_path, port)
        proc = subprocess.run(
            [*AGENT, "--config", str(config)],
            capture_output=True, text=True, timeout=60, env=_env(), check=False,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (
        f"edgefleet-agent: error: cannot serve inference on 127.0.0.1:{port}: port {port} is "
        "already in use" in proc.stderr
    )


def test_agent_logs_as_json_lines(tmp_path: Path) -> None:
    config = _agent_files(tmp_path, 0)
    proc = subprocess.Popen(
        [*AGENT, "--config", str(config), "--log-format", "json"],
        stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 60
        records = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "the agent exited"
            records.append(json.loads(line))  # every line is one JSON object
            if "listening" in records[-1]["message"]:
                break
        assert records[-1]["logger"] == "edgefleet.agent.serving"
        assert records[-1]["level"] == "INFO" and records[-1]["at"].endswith("Z")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
