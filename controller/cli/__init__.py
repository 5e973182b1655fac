"""The ``edgefleet`` command line.

Readable tables by default, ``--json`` for scripts. Every expected failure
(bad config, unknown model, unreachable broker, corrupt model file) ends in a
one-line ``Error: ...`` on stderr and exit status 1, never a traceback; with
``--json`` the error is a JSON object on stderr
(``{"error": {"code": ..., "message": ..., "exit_status": ...}}``). A reader
that goes away (``edgefleet devices | head -1``) ends the command quietly with
status 0.

State lives in ``--home`` (default ``./edgefleet-data``, or
``EDGEFLEET_HOME``): the TUF repository with its keys, and the SQLite
registry unless ``--database-url``/``EDGEFLEET_DATABASE_URL`` names another
database. Only ``edgefleet init`` creates it; other commands refuse a missing
home and say where they looked.

One module per command group; this module only builds the root group and
registers them, and nothing imports it back (the command modules import
:mod:`~edgefleet.controller.cli.context` and
:mod:`~edgefleet.controller.cli.output`):

========================  ===================================================
module                    commands
========================  ===================================================
``home``                  ``init``, ``serve``
``model``                 ``model register|list|report|compile|profiles``
``device``                ``device enroll|tag|events``
``fleet``                 ``devices``, ``deploy``, ``status``
``agent``                 ``agent run|package``
``token``                 ``token create|list|revoke``
``demo``                  ``demo``
``keys``                  ``keys show|rotate|offline-root|renew-root``
``security``              ``ca``, ``broker-config``, ``enroll-server``,
                          ``device token|revoke``
``rollout``               ``rollout create|start|pause|resume|abort|list|show|watch``
========================  ===================================================

Command modules are imported when their command runs (``_COMMANDS`` holds
their help summaries), and heavy libraries (SQLAlchemy, numpy, onnx,
cryptography, rich) inside the commands that use them, so ``edgefleet
--help`` imports click and this module only (``bench/cli_startup.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from edgefleet import __version__
from edgefleet.shared.logs import LOG_FORMATS, configure_logging

__all__ = ["cli", "main"]


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (CliRunner): nothing to flush
        pass


def _stdout_closed() -> bool:
    """Whether the reader of stdout went away (so an EPIPE was ours, not a socket's).

    The write end of a pipe whose readers are gone polls as an error. Where
    stdout is no real file (CliRunner) or cannot be polled, assume it was.
    """
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except (OSError, ValueError, AttributeError):
        return True
    return any(mask & (select.POLLERR | select.POLLHUP) for _fd, mask in events)


# Every top-level command: (module, attribute, its help summary, whether that is
# its short_help). The command modules (and SQLAlchemy, rich, the compiler...)
# are imported only when their command runs, so `edgefleet --help` lists them
# from here; tests/controller/cli/test_package.py checks these summaries
# against the commands' own.
_COMMANDS: dict[str, tuple[str, str, str, bool]] = {
    "agent": (
        "agent",
        "agent_group",
        "Run the gateway agent, or package it for an offline gateway.",
        False,
    ),
    "broker-config": (
        "security",
        "broker_config",
        "Write a Mosquitto TLS configuration, its ACL and certificates, and the controller's.",
        False,
    ),
    "ca": (
        "security",
        "ca",
        "The certificate authority that issues broker, controller and device certificates.",
        False,
    ),
    "demo": (
        "demo",
        "demo",
        "Run the whole path on this machine: broker, controller, N agents, deploy, infer.",
        False,
    ),
    "deploy": (
        "fleet",
        "deploy",
        "Deploy NAME VERSION: set the desired model of the target devices.",
        False,
    ),
    "device": (
        "device",
        "device_group",
        "Enroll devices, tag them, read their events; tokens and revocation.",
        False,
    ),
    "devices": (
        "fleet",
        "devices",
        "List devices with what they run and how they are doing.",
        False,
    ),
    "enroll-server": (
        "security",
        "enroll_server",
        "Run the HTTPS enrollment endpoint until Ctrl-C.",
        False,
    ),
    "init": (
        "home",
        "init",
        "Create the home: registry and TUF repository (keys, root metadata).",
        False,
    ),
    "keys": (
        "keys",
        "keys_group",
        "Rotate TUF signing keys and manage the root key.",
        False,
    ),
    "model": (
        "model",
        "model_group",
        "Compile, register, list and inspect models.",
        True,
    ),
    "rollout": (
        "rollout",
        "rollout_group",
        "Staged rollouts: canary, exponential waves, health gates, automatic rollback.",
        False,
    ),
    "serve": (
        "home",
        "serve",
        "Run the controller: publish desired state, serve transfers, ingest telemetry, the API.",
        False,
    ),
    "status": (
        "fleet",
        "status",
        "Fleet overview: devices online, version distribution, health, delivery.",
        False,
    ),
    "token": (
        "token",
        "token_group",
        "API tokens for the management API (viewer, operator, admin).",
        False,
    ),
}


def _load(name: str) -> click.Command:
    """Import the module of command ``name`` and return the command."""
    import importlib

    module_name, attribute, _summary, _short = _COMMANDS[name]
    module = importlib.import_module(f"edgefleet.controller.cli.{module_name}")
    command: click.Command = getattr(module, attribute)
    if name == "device" and isinstance(command, click.Group) and "token" not in command.commands:
        # Token enrollment and revocation are security commands, shown under `device`.
        from edgefleet.controller.cli import security

        command.add_command(security.device_token)
        command.add_command(security.device_revoke)
    return command


class _Root(click.Group):
    """The root group: lazy commands, JSON errors for ``--json``, quiet on a broken pipe."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return _load(cmd_name) if cmd_name in _COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click lists commands, from the summaries above: listing imports no command."""
        limit = formatter.width - 6 - max(len(n) for n in _COMMANDS)
        rows = []
        for name in sorted(_COMMANDS):
            _module, _attribute, summary, is_short = _COMMANDS[name]
            stub = click.Command(name, help=None if is_short else summary)
            stub.short_help = summary if is_short else None
            rows.append((name, stub.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        from edgefleet.controller.cli.output import JSON_META_KEY, show_error

        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.ClickException as exc:
            if not ctx.meta.get(JSON_META_KEY):
                raise
            show_error(exc)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            if not (isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE):
                raise
            if not _stdout_closed():  # a socket's broken pipe: a real failure
                raise click.ClickException(f"broken pipe: {exc}") from exc
            # The reader (`| head -1`) has what it wanted: not a failure.
            _quiet_stdout()
            ctx.exit(0)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar="EDGEFLEET_CONFIG",
    help="Controller config file (TOML).",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    envvar="EDGEFLEET_HOME",
    help="State directory (TUF repository, keys, SQLite). Default ./edgefleet-data; "
    "only `edgefleet init` creates it.",
)
@click.option(
    "--database-url",
    envvar="EDGEFLEET_DATABASE_URL",
    help="SQLAlchemy URL of the registry. Default: SQLite in --home.",
)
@click.option(
    "--api",
    "api_url",
    envvar="EDGEFLEET_API",
    metavar="URL",
    help="Management API of the running controller (http(s)://host:8480). Mutating "
    "commands (deploy, rollout, device tag/revoke) then go through it, with the token "
    "from EDGEFLEET_TOKEN or --token-file. Without it they only write the registry.",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="EDGEFLEET_TOKEN_FILE",
    help="File holding the API token (else EDGEFLEET_TOKEN).",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    envvar="EDGEFLEET_LOG_FORMAT",
    help="Log lines as text, or as one JSON object per line (for log collectors).",
)
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: Path | None,
    home: Path | None,
    database_url: str | None,
    api_url: str | None,
    token_file: Path | None,
    verbose: int,
    log_format: str,
) -> None:
    """edgefleet: signed, quantized models for fleets of edge devices.

    Start with `edgefleet init`: it creates the home (--home, EDGEFLEET_HOME or
    ./edgefleet-data) that every other command uses.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    configure_logging(level, log_format)
    source = ctx.get_parameter_source("home")
    home_source = (
        "--home"
        if source is ParameterSource.COMMANDLINE
        else "EDGEFLEET_HOME"
        if source is ParameterSource.ENVIRONMENT
        else None
    )
    from edgefleet.controller.cli.context import Context

    ctx.obj = Context(
        config_path,
        home,
        database_url,
        verbose,
        home_source=home_source,
        api_url=api_url or None,
        token_file=token_file,
    )


def main() -> None:
    """The ``edgefleet`` console script."""
    try:
        try:
            cli.main(prog_name="edgefleet")
        finally:
            sys.stdout.flush()  # a broken pipe shows here when the output was buffered
    except BrokenPipeError:
        _quiet_stdout()
        sys.exit(0)
