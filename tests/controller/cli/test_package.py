"""The CLI package's shape: lazy, acyclic, and blind to the agent."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import edgefleet.controller.cli as cli_package
from edgefleet.controller.cli import cli

_PROBE = """
import json, sys
from edgefleet.controller.cli import cli
try:
    cli.main(["--help"], prog_name="edgefleet", standalone_mode=False)
finally:
    print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def test_help_loads_neither_the_agent_nor_heavy_libraries() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    assert "Commands:" in done.stdout
    loaded = {name.split(".")[0] for name in json.loads(done.stderr)}
    assert not loaded & {"numpy", "onnx", "onnxruntime", "sqlalchemy", "cryptography", "tuf"}
    modules = set(json.loads(done.stderr))
    assert not {m for m in modules if m == "edgefleet.agent" or m.startswith("edgefleet.agent.")}


def test_command_modules_import_helpers_never_the_package() -> None:
    package = Path(cli_package.__file__).parent
    allowed = {
        "edgefleet.controller.cli.context",
        "edgefleet.controller.cli.output",
        "edgefleet.controller.cli.follow",
    }
    for module in sorted(package.glob("*.py")):
        if module.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                names = {node.module}
            elif isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            else:
                continue
            for name in names:
                assert not name.startswith("edgefleet.agent"), (module.name, name)
                if name.startswith("edgefleet.controller.cli"):
                    assert name in allowed, (module.name, name)


def test_every_command_group_is_registered() -> None:
    result = CliRunner().invoke(cli, ["--help"], catch_exceptions=False)
    assert result.exit_code == 0
    for command in [
        "agent", "broker-config", "ca", "demo", "deploy", "device", "devices",
        "enroll-server", "init", "keys", "model", "rollout", "serve", "status",
    ]:  # fmt: skip
        assert f"\n  {command} " in result.output, command
    for group, commands in {
        "device": ["enroll", "events", "revoke", "tag", "token"],
        "model": ["compile", "list", "register", "report"],
    }.items():
        result = CliRunner().invoke(cli, [group, "--help"], catch_exceptions=False)
        assert result.exit_code == 0
        for command in commands:
            assert f"\n  {command} " in result.output, (group, command)
    # The group's summary names what its commands do (issue 10: it was out of date).
    device_help = CliRunner().invoke(cli, ["device", "--help"]).output
    assert "Enroll devices, tag them, read their events; tokens and revocation." in device_help


def test_the_help_summaries_kept_for_lazy_loading_are_the_commands_own() -> None:
    """`edgefleet --help` lists commands without importing them; the summaries must not drift."""
    import click

    from edgefleet.controller.cli import _COMMANDS, _load

    for name, (_module, _attribute, summary, is_short) in _COMMANDS.items():
        command = _load(name)
        assert command.name == name
        for limit in (30, 45, 80, 200):
            stub = click.Command(name, help=None if is_short else summary)
            stub.short_help = summary if is_short else None
            assert stub.get_short_help_str(limit) == command.get_short_help_str(limit), (
                name,
                limit,
            )


def test_help_imports_no_command_module() -> None:
    code = (
        "import sys\n"
        "from edgefleet.controller.cli import main\n"
        "sys.argv = ['edgefleet', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('edgefleet.controller.cli.')"
        " or m.split('.')[0] in ('sqlalchemy', 'rich', 'numpy', 'onnx', 'cryptography'))\n"
        "print('LOADED', loaded, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert "Commands:" in proc.stdout and "deploy" in proc.stdout
    assert "LOADED []" in proc.stderr, proc.stderr
