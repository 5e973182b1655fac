"""What every ``edgefleet`` command gets from the root options: config, registry, repository.

The root group stores one :class:`Context`; commands take it with
:data:`pass_ctx` and open only what they use. The return types are real, but
they are imported for the type checker only: the config, the registry
(SQLAlchemy, Alembic) and the TUF repository are loaded when a command first
asks for them, so ``edgefleet --help`` stays fast.

Only ``edgefleet init`` creates a home (:meth:`Context.create_home`). Every
other command that needs one (the SQLite registry, the TUF repository, the CA,
enrollment tokens) calls :meth:`Context.require_home`, which refuses a missing
home with :class:`HomeMissingError`: the message names the directory it looked
for, how that directory was chosen (``--home``, ``EDGEFLEET_HOME``, the config
file or the default) and ``edgefleet init``. Before this, a command run outside
the data directory silently created a fresh ``./edgefleet-data`` with new keys
and showed "0 devices".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edgefleet.protocols.errors import ConfigError

if TYPE_CHECKING:
    from edgefleet.controller.api_client import ApiClient
    from edgefleet.controller.config import ControllerConfig
    from edgefleet.controller.registry import Registry
    from edgefleet.controller.trust import TrustRepository
    from edgefleet.shared.link import BrokerSettings

__all__ = [
    "SERVED_BROKER_FILE",
    "Context",
    "HomeMissingError",
    "home_is_initialized",
    "pass_ctx",
    "record_served_broker",
]

SERVED_BROKER_FILE = "served-broker.json"
"""In the home: the broker address ``edgefleet serve`` last used (``{"host", "port"}``).

``device enroll`` without a ``--config`` writes it into ``agent.toml``, so a
one-machine fleet started with ``serve --broker-port N`` enrolls agents for
port N instead of the default 1883.
"""


def record_served_broker(home: Path, host: str, port: int) -> None:
    """Remember the broker address ``serve`` runs with (see :data:`SERVED_BROKER_FILE`)."""
    from edgefleet.shared.durable import atomic_write

    atomic_write(home / SERVED_BROKER_FILE, json.dumps({"host": host, "port": port}).encode())


class HomeMissingError(ConfigError):
    """The controller home a command needs has not been created with ``edgefleet init``."""

    code = "home_missing"


def home_is_initialized(home: Path) -> bool:
    """Whether ``home`` holds what ``edgefleet init`` creates (its TUF repository)."""
    return (home / "repository" / "metadata").is_dir()


@dataclass
class Context:
    """The root options (``--config``, ``--home``, ``--database-url``, ``--api``, ``-v``).

    Each call re-reads what it opens; commands are short-lived and the caller
    closes the registry it was handed. ``home_source`` says how ``--home`` was
    given (``"--home"``, ``"EDGEFLEET_HOME"`` or ``None``), for messages.
    """

    config_path: Path | None
    home: Path | None
    database_url: str | None
    verbose: int = 0
    home_source: str | None = None
    api_url: str | None = None
    token_file: Path | None = None

    def api(self) -> ApiClient | None:
        """The management API client when ``--api``/``EDGEFLEET_API`` is given, else ``None``.

        Without it, mutating commands only write the registry and the running
        ``edgefleet serve`` publishes; with it, they ask that controller.

        Raises:
            ConfigError: the URL is malformed or no token is available.
        """
        if not self.api_url:
            return None
        import ipaddress
        import urllib.parse

        from edgefleet.controller.api_client import ApiClient, read_token

        client = ApiClient(self.api_url, read_token(self.token_file))
        parts = urllib.parse.urlsplit(client.base_url)
        host = parts.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if parts.scheme == "http" and not loopback:
            click.echo(
                f"warning: {client.base_url} is plain HTTP: the API token crosses the network "
                "unencrypted (give the controller [api] cert_file/key_file and use https://)",
                err=True,
            )
        return client

    def config(self) -> ControllerConfig:
        """The controller config, with ``--home``/``--database-url`` applied.

        Raises:
            ConfigError: the config file is missing or invalid.
        """
        from edgefleet.controller.config import load_controller_config

        return load_controller_config(
            self.config_path, home=self.home, database_url=self.database_url
        )

    def home_origin(self) -> str:
        """How the home directory was chosen, in words an operator can act on."""
        if self.home is not None:
            return "from --home" if self.home_source == "--home" else "from EDGEFLEET_HOME"
        if self.config_path is not None:
            return f"from `home` in {self.config_path}, or the default"
        return "the default; choose another with --home or EDGEFLEET_HOME"

    def require_home(self) -> Path:
        """The controller home, which ``edgefleet init`` must have created.

        Raises:
            HomeMissingError: it does not exist (or holds no repository).
        """
        home = self.config().home
        if not home_is_initialized(home):
            raise HomeMissingError(
                f"no controller home at {home.resolve()} ({self.home_origin()}); "
                "create one with `edgefleet init`, or point --home/EDGEFLEET_HOME/--config "
                "at an existing one"
            )
        return home

    def create_home(self) -> Path:
        """Create the home directory (owner-only); only ``edgefleet init`` calls this."""
        from edgefleet.shared.durable import ensure_private_dir

        home = self.config().home
        try:
            ensure_private_dir(home)  # keys, tokens, registry: owner-only (0700)
        except OSError as exc:
            raise ConfigError(f"cannot create controller home {home}: {exc}") from exc
        return home

    def agent_broker(self) -> tuple[BrokerSettings, str]:
        """The broker address to give enrolled agents, and where it came from.

        The ``[broker]`` table of ``--config`` (with ``EDGEFLEET_BROKER_*``
        over it) when there is one; else the address ``edgefleet serve`` last
        ran with in this home; else the default (127.0.0.1:1883), said so.
        """
        import os

        cfg = self.config()
        if any(name.startswith("EDGEFLEET_BROKER_") for name in os.environ):
            return cfg.broker, "EDGEFLEET_BROKER_* environment"
        if self.config_path is not None:
            return cfg.broker, f"[broker] of {self.config_path}"
        try:
            served = json.loads((cfg.home / SERVED_BROKER_FILE).read_text())
            host, port = served["host"], served["port"]
            if isinstance(host, str) and isinstance(port, int):
                return replace(cfg.broker, host=host, port=port), "where `edgefleet serve` ran"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return cfg.broker, "the default: no --config, and `edgefleet serve` has not run here"

    def registry(self) -> Registry:
        """Open (and migrate) the registry.

        The SQLite default lives in the home, which must exist; a registry at
        ``--database-url`` needs no home.

        Raises:
            HomeMissingError: the SQLite default is used and there is no home.
        """
        from edgefleet.controller.registry import Registry

        cfg = self.config()
        if cfg.database_url is None:
            self.require_home()
        return Registry(cfg.registry_url)

    def repository(self) -> TrustRepository:
        """The TUF repository under the home.

        Raises:
            HomeMissingError: there is no home (``edgefleet init`` creates it).
        """
        from edgefleet.controller.trust import TrustRepository

        self.require_home()
        return TrustRepository.open(self.config().repository_dir)


pass_ctx = click.make_pass_decorator(Context)
