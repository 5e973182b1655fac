"""The ``edgefleet`` command line.

Readable tables by default, ``--json`` for scripts. Every expected failure
(bad config, unknown model, unreachable broker, corrupt model file) ends in a
one-line ``Error: ...`` on stderr and exit status 1, never a traceback.

State lives in ``--home`` (default ``./edgefleet-data``, or
``EDGEFLEET_HOME``): the TUF repository with its keys, and the SQLite
registry unless ``--database-url``/``EDGEFLEET_DATABASE_URL`` names another
database.

One module per command group; this module only builds the root group and
registers them, and nothing imports it back (the command modules import
:mod:`~edgefleet.controller.cli.context` and
:mod:`~edgefleet.controller.cli.output`):

========================  ===================================================
module                    commands
========================  ===================================================
``home``                  ``init``, ``serve``
``model``                 ``model register|list|report|compile``
``device``                ``device enroll|events``
``fleet``                 ``devices``, ``deploy``, ``status``
``agent``                 ``agent run``
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

import logging
from pathlib import Path

import click

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

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    help="State directory (TUF repository, keys, SQLite). Default ./edgefleet-data",
)
@click.option(
    "--database-url",
    envvar="EDGEFLEET_DATABASE_URL",
    help="SQLAlchemy URL of the registry. Default: SQLite in --home.",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: Path | None,
    home: Path | None,
    database_url: str | None,
    verbose: int,
) -> None:
    """edgefleet: signed, quantized models for fleets of edge devices."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(config_path, home, database_url, verbose)


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
    cli(prog_name="edgefleet")
