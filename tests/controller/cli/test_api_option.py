"""The root ``--api`` option: which client a command gets, and the warnings it gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.controller.cli.context import Context
from edgefleet.protocols.errors import ConfigError


def test_no_api_url_means_the_registry_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_TOKEN", "eft_x_y")
    assert Context(None, None, None).api() is None


def test_plain_http_to_another_host_warns_that_the_token_is_unencrypted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEFLEET_TOKEN", "eft_x_y")
    for url in ("http://127.0.0.1:8480", "http://localhost:8480", "https://ctl.example:8480"):
        client = Context(None, None, None, api_url=url).api()
        assert client is not None and client.base_url == url
        assert capsys.readouterr().err == "", url
    Context(None, None, None, api_url="http://192.0.2.7:8480/").api()
    err = capsys.readouterr().err
    assert "http://192.0.2.7:8480 is plain HTTP" in err and "unencrypted" in err


def test_the_token_file_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EDGEFLEET_TOKEN", "from-env")
    token = tmp_path / "token"
    token.write_text("  from-file  \nignored\n")
    client = Context(None, None, None, api_url="http://127.0.0.1:1", token_file=token).api()
    assert client is not None and client._token == "from-file"  # noqa: S105 (a test value)
    monkeypatch.delenv("EDGEFLEET_TOKEN")
    with pytest.raises(ConfigError, match="EDGEFLEET_TOKEN"):
        Context(None, None, None, api_url="http://127.0.0.1:1").api()
    with pytest.raises(ConfigError, match="cannot read"):
        Context(None, None, None, api_url="http://127.0.0.1:1", token_file=tmp_path / "no").api()
