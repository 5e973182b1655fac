"""Output helpers: tables, and expected failures as one ``Error: ...`` line, never a traceback."""

from __future__ import annotations

import ast
import errno
import re
from pathlib import Path

import click
import pytest

from edgefleet.controller.cli.output import friendly_errors, render_table
from edgefleet.protocols.errors import ConfigError, EdgefleetError
from tests.controller.cli.runner import run


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


def test_error_lines_carry_the_stable_code(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text("home = [")
    result = run(cfg, "status")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert result.output.rstrip().endswith(f"[{ConfigError.code}]")
    assert "Traceback" not in result.output


def test_friendly_errors_turn_our_errors_into_one_line_with_the_code() -> None:
    class _NoCodeError(EdgefleetError):
        code = ""

    with pytest.raises(click.ClickException) as caught, friendly_errors():
        raise ConfigError("home must be a string")
    assert caught.value.message == "home must be a string [config]"
    assert isinstance(caught.value.__cause__, ConfigError)
    with pytest.raises(click.ClickException) as caught, friendly_errors():
        raise _NoCodeError("plain")
    assert caught.value.message == "plain"
    with pytest.raises(click.ClickException) as caught, friendly_errors():
        raise EdgefleetError("generic")
    assert caught.value.message == "generic"


def test_friendly_errors_name_the_file_an_os_error_is_about(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(click.ClickException) as caught, friendly_errors():
        missing.read_bytes()
    assert caught.value.message == f"No such file or directory: {missing}"
    with pytest.raises(click.ClickException) as caught, friendly_errors():
        raise OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b")
    assert caught.value.message == "Invalid cross-device link: a -> b"
    with pytest.raises(click.ClickException) as caught, friendly_errors():
        raise ConnectionRefusedError("broker refused")
    assert caught.value.message == "broker refused"


def test_friendly_errors_let_bugs_keep_their_traceback() -> None:
    # A bare ValueError is a bug (every refusal is an EdgefleetError), not a message.
    with pytest.raises(ValueError, match="bug"), friendly_errors():
        raise ValueError("bug")


def test_render_table_aligns_columns_and_shows_none_as_dash() -> None:
    table = render_table(["name", "p50 ms"], [["a", 1.5], ["longer", None]])
    assert table.splitlines() == [
        "NAME    P50 MS",
        "a       1.5",
        "longer  -",
    ]


def test_tables_on_a_terminal_are_drawn_by_rich_and_plain_when_piped() -> None:
    rows = [["gw-1", "yes", "a,b"], ["gw-2", None, None]]
    plain = render_table(["device", "online", "tags"], rows, styled=False)
    assert plain.splitlines() == [
        "DEVICE  ONLINE  TAGS",
        "gw-1    yes     a,b",
        "gw-2    -       -",
    ]
    styled = render_table(["device", "online", "tags"], rows, styled=True)
    assert "\x1b[" in styled and "─" in styled  # rich's bold header and rule
    text = re.sub(r"\x1b\[[0-9;]*m", "", styled)
    assert [line.split() for line in text.splitlines() if "─" not in line] == [
        ["DEVICE", "ONLINE", "TAGS"],
        ["gw-1", "yes", "a,b"],
        ["gw-2", "-", "-"],
    ]


def test_the_agent_never_imports_rich() -> None:
    """rich is in the controller extra only: the agent stays lean."""
    agent = Path(__file__).resolve().parents[3] / "agent"
    for module in sorted(agent.rglob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "rich" or n.startswith("rich.") for n in names), module
