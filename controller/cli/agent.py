"""``edgefleet agent run``: start the gateway agent from the controller's command line.

The controller never imports the agent (the layers contract in
``docs/architecture.md``): this command replaces its own process with the
agent's entry point, ``python -m edgefleet.agent.cli``, the same program as
``edgefleet-agent``. Replacing rather than spawning keeps the process id, so
SIGTERM from a service manager reaches the agent directly, and the agent's
exit status is the command's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edgefleet.controller.cli.context import Context, pass_ctx
from edgefleet.controller.cli.output import friendly_errors

__all__ = ["AGENT_MODULE", "agent_argv", "agent_group"]

AGENT_MODULE = "edgefleet.agent.cli"
"""The module ``python -m`` runs: the agent's own command line (``edgefleet-agent``)."""


def agent_argv(config_file: Path, *, verbose: int = 0) -> list[str]:
    """The command line that runs the agent with this interpreter.

    ``-vv`` on ``edgefleet`` (debug) becomes the agent's ``-v`` (debug); the
    agent logs at info level otherwise.
    """
    argv = [sys.executable, "-m", AGENT_MODULE, "--config", str(config_file)]
    if verbose >= 2:
        argv.append("-v")
    return argv


@click.group("agent")
def agent_group() -> None:
    """Run the gateway agent."""


@agent_group.command("run")
@click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@pass_ctx
def agent_run(ctx: Context, config_file: Path) -> None:
    """Run the agent daemon until SIGTERM/SIGINT."""
    argv = agent_argv(config_file, verbose=ctx.verbose)
    sys.stdout.flush()
    sys.stderr.flush()
    with friendly_errors():
        os.execv(argv[0], argv)  # noqa: S606 - our own interpreter and module, no shell
