"""What every ``edgefleet`` command gets from the root options: config, registry, repository.

The root group stores one :class:`Context`; commands take it with
:data:`pass_ctx` and open only what they use. The return types are real, but
they are imported for the type checker only: the config, the registry
(SQLAlchemy, Alembic) and the TUF repository are loaded when a command first
asks for them, so ``edgefleet --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from edgefleet.controller.config import ControllerConfig
    from edgefleet.controller.registry import Registry
    from edgefleet.controller.trust import TrustRepository

__all__ = ["Context", "pass_ctx"]


@dataclass
class Context:
    """The root options (``--config``, ``--home``, ``--database-url``, ``-v``).

    Each call re-reads what it opens; commands are short-lived and the caller
    closes the registry it was handed.
    """

    config_path: Path | None
    home: Path | None
    database_url: str | None
    verbose: int = 0

    def config(self) -> ControllerConfig:
        """The controller config, with ``--home``/``--database-url`` applied.

        Raises:
            ConfigError: the config file is missing or invalid.
        """
        from edgefleet.controller.config import load_controller_config

        return load_controller_config(
            self.config_path, home=self.home, database_url=self.database_url
        )

    def registry(self) -> Registry:
        """Open (and migrate) the registry; creates ``home`` for the SQLite default."""
        from edgefleet.controller.registry import Registry
        from edgefleet.protocols.errors import ConfigError
        from edgefleet.shared.durable import ensure_private_dir

        cfg = self.config()
        try:
            ensure_private_dir(cfg.home)  # keys, tokens, registry: owner-only (0700)
        except OSError as exc:
            raise ConfigError(f"cannot create controller home {cfg.home}: {exc}") from exc
        return Registry(cfg.registry_url)

    def repository(self) -> TrustRepository:
        """The TUF repository under ``home``, created with fresh keys on first use."""
        from edgefleet.controller.trust import TrustRepository

        return TrustRepository.open_or_init(self.config().repository_dir)


pass_ctx = click.make_pass_decorator(Context)
