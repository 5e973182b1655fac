"""The ``[http] token`` / ``token_file`` settings of the agent config."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.config import load_agent_config
from edgefleet.protocols.errors import ConfigError

BASE = 'device_id = "gw-1"\nstate_dir = "state"\n'


def write(tmp_path: Path, http: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(BASE + "[http]\n" + http)
    return path


def test_no_token_by_default(tmp_path: Path) -> None:
    assert load_agent_config(write(tmp_path, "port = 0\n")).http.token is None


def test_inline_token(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, 'token = "abc123"\n'))
    assert config.http.token == "abc123"  # noqa: S105 - a test value


def test_token_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "http.token").write_text("from-a-file\n")
    config = load_agent_config(write(tmp_path, 'token_file = "http.token"\n'))
    assert config.http.token == "from-a-file"  # noqa: S105 - a test value
    assert config.http.token_file == tmp_path / "http.token"


@pytest.mark.parametrize(
    ("http", "message"),
    [
        ('token = "a"\ntoken_file = "t"\n', "not both"),
        ('token_file = "missing"\n', "missing"),
        ("token = 5\n", "token must be a string"),
        ('token_file = "empty"\n', "is empty"),
    ],
)
def test_bad_token_settings_are_named(tmp_path: Path, http: str, message: str) -> None:
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=message):
        load_agent_config(write(tmp_path, http))
