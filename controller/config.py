"""Controller configuration: a TOML file, environment variables, CLI flags.

Precedence (highest first): CLI flags, environment (``EDGEFLEET_HOME``,
``EDGEFLEET_DATABASE_URL``), the config file, defaults. Example
(``deploy/controller.example.toml``)::

    home = "/var/lib/edgefleet"                 # TUF repository, keys, SQLite file
    database_url = "postgresql+psycopg://edgefleet@db/edgefleet"
    profiles = "profiles.toml"                  # custom device profiles (optional)

    [broker]
    host = "mqtt.example.net"
    port = 8883
    tls = true
    ca_file = "/etc/edgefleet/ca.pem"
    cert_file = "/etc/edgefleet/controller.pem"
    key_file = "/etc/edgefleet/controller.key"
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgefleet.protocols.errors import ConfigError
from edgefleet.shared.link import BrokerSettings
from edgefleet.shared.settings import read_toml, refuse_unknown_keys, settings_from_table

__all__ = ["DEFAULT_HOME", "ControllerConfig", "ServiceSettings", "load_controller_config"]

DEFAULT_HOME = Path("edgefleet-data")


@dataclass(frozen=True)
class ServiceSettings:
    """The `[service]` table: the running controller's loop timings. Units are in the field names.

    It lives beside the config (not in service.py) so that reading a config
    file never loads the MQTT service.
    """

    client_id: str = "edgefleet-controller"
    ingest_batch_max: int = 500
    ingest_flush_s: float = 0.5
    maintenance_interval_s: float = 5.0
    timestamp_refresh_within_s: float = 6 * 3600
    # Off only to reproduce a freeze (tests) or while an operator investigates.
    refresh_metadata: bool = True
    known_devices_ttl_s: float = 2.0
    max_blocks_per_request: int = 64
    # Transfer bounds (controller/transfer.py): every device is potentially
    # hostile, so what one can make the controller queue is bounded.
    transfer_max_block_size_bytes: int = 256 * 1024
    transfer_max_request_bytes: int = 4 * 1024 * 1024
    # Frame bytes handed to the MQTT client and not yet acknowledged by the broker.
    transfer_device_inflight_bytes: int = 2 * 1024 * 1024
    transfer_total_inflight_bytes: int = 32 * 1024 * 1024
    # Requests a device sends while its earlier one is still queued ("busy");
    # beyond the bucket they are refused (429) with a retry-after.
    transfer_busy_requests_per_s: float = 2.0
    transfer_busy_request_burst: float = 5.0
    transfer_retry_after_s: float = 1.0
    # Staged rollouts (controller/rollout): how often each active one is stepped.
    run_rollouts: bool = True
    rollout_interval_s: float = 2.0
    # MQTT shared-subscription group for ingestion and transfers
    # ("$share/<group>/..."), so several controllers split the work. Empty:
    # plain subscriptions (amqtt has no shared subscriptions; Mosquitto has).
    share_group: str = ""
    # Raw telemetry windows fold into per-minute aggregates this often; raw
    # windows and minutes are deleted after their retentions.
    telemetry_rollup_interval_s: float = 60.0
    telemetry_raw_retention_s: float = 24 * 3600.0
    telemetry_minute_retention_s: float = 30 * 24 * 3600.0


@dataclass(frozen=True)
class ControllerConfig:
    """Where the controller keeps its state and how it reaches the broker."""

    home: Path = DEFAULT_HOME
    database_url: str | None = None
    profiles_file: Path | None = None
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)

    @property
    def repository_dir(self) -> Path:
        return self.home / "repository"

    def device_profiles(self) -> dict[str, Any]:
        """Built-in profiles plus those of ``profiles_file`` (which win on name clashes).

        Raises:
            ProfileError: the profiles file is unreadable or invalid.
        """
        from edgefleet.controller.compiler import BUILTIN_PROFILES, load_profiles

        profiles: dict[str, Any] = dict(BUILTIN_PROFILES)
        if self.profiles_file is not None:
            profiles.update(load_profiles(self.profiles_file))
        return profiles

    @property
    def registry_url(self) -> str:
        """The SQLAlchemy URL; a SQLite file under ``home`` unless configured."""
        return self.database_url or f"sqlite:///{(self.home / 'registry.db').resolve()}"

    def with_overrides(self, **changes: Any) -> ControllerConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _section(raw: dict[str, Any], key: str, kind: type[Any]) -> Any:
    table = raw.pop(key, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{key}] must be a table")
    return settings_from_table(kind, table, section=f"[{key}]")


def load_controller_config(
    path: Path | None = None,
    *,
    home: Path | None = None,
    database_url: str | None = None,
    environ: dict[str, str] | None = None,
) -> ControllerConfig:
    """Build the effective configuration.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or has unknown keys.
    """
    env = os.environ if environ is None else environ
    config = ControllerConfig()
    if path is not None:
        raw = read_toml(Path(path), "controller config")
        try:
            broker = _section(raw, "broker", BrokerSettings)
            service = _section(raw, "service", ServiceSettings)
            refuse_unknown_keys(raw, {"home", "database_url", "profiles"})
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        base = Path(path).resolve().parent
        config = ControllerConfig(
            home=base / raw["home"] if "home" in raw else DEFAULT_HOME,
            database_url=raw.get("database_url"),
            profiles_file=base / raw["profiles"] if "profiles" in raw else None,
            broker=broker,
            service=service,
        )
    env_home = env.get("EDGEFLEET_HOME")
    env_url = env.get("EDGEFLEET_DATABASE_URL")
    return config.with_overrides(
        home=home or (Path(env_home) if env_home else None),
        database_url=database_url or env_url or None,
    )
