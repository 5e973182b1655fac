"""``edgefleet-agent --config FILE``: the agent's own entry point.

The agent installs without the controller's dependencies (no click), so its
command line uses argparse. ``edgefleet agent run`` calls the same function.

Every expected failure (a bad setting, a taken HTTP port) ends in one line,
``edgefleet-agent: error: ...`` on stderr, and exit status 1.
``--log-format json`` (or ``EDGEFLEET_LOG_FORMAT=json``) writes one JSON
object per log line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from edgefleet import __version__
from edgefleet.protocols.errors import EdgefleetError
from edgefleet.shared.logs import LOG_FORMATS, configure_logging

__all__ = ["main", "run_agent"]


def run_agent(config_file: Path) -> None:
    """Load the config and run the daemon until SIGTERM/SIGINT.

    Raises:
        ConfigError: the config file is missing or invalid.
    """
    from edgefleet.agent.config import load_agent_config
    from edgefleet.agent.daemon import Agent

    config = load_agent_config(config_file)
    Agent(config).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefleet-agent", description="edgefleet gateway agent")
    parser.add_argument("--config", required=True, type=Path, help="agent config (TOML)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("EDGEFLEET_LOG_FORMAT") or "text",
        help="log lines as text or as JSON objects (default: text, or $EDGEFLEET_LOG_FORMAT)",
    )
    parser.add_argument("--version", action="version", version=f"edgefleet-agent {__version__}")
    args = parser.parse_args(argv)
    if args.log_format not in LOG_FORMATS:
        parser.error(f"EDGEFLEET_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
    level = logging.INFO if args.verbose == 0 else logging.DEBUG
    configure_logging(level, args.log_format)
    try:
        run_agent(args.config)
    except EdgefleetError as exc:
        print(f"edgefleet-agent: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
