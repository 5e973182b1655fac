"""Run ``edgefleet`` in-process through click's CliRunner, as an operator would type it."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from edgefleet.controller.cli import cli


def run(config: Path, *args: str) -> Result:
    """``edgefleet --config CONFIG ARGS...``; exceptions other than exits propagate."""
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


def run_in_home(home: Path, *args: str) -> Result:
    """``edgefleet --home HOME ARGS...`` (no config file)."""
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
