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

Heavy libraries (SQLAlchemy, numpy, onnx, cryptography) are imported inside
the commands that use them, so ``edgefleet --help`` stays fast.
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
from edgefleet.controller.cli import (
    agent,
    demo,
    device,
    fleet,
    home,
    keys,
    model,
    rollout,
    security,
    token,
)
from edgefleet.controller.cli.context import Context
from edgefleet.controller.cli.output import JSON_META_KEY, show_error
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


class _Root(click.Group):
    """The root group: JSON errors for ``--json`` commands, quiet on a broken pipe."""

    def invoke(self, ctx: click.Context) -> Any:
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
    ctx.obj = Context(
        config_path,
        home,
        database_url,
        verbose,
        home_source=home_source,
        api_url=api_url or None,
        token_file=token_file,
    )


for _command in (
    home.init,
    home.serve,
    model.model_group,
    device.device_group,
    fleet.devices,
    fleet.deploy,
    fleet.status,
    agent.agent_group,
    demo.demo,
    keys.keys_group,
    security.ca,
    security.broker_config,
    security.enroll_server,
    rollout.rollout_group,
    token.token_group,
):
    cli.add_command(_command)
device.device_group.add_command(security.device_token)
device.device_group.add_command(security.device_revoke)
del _command


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
