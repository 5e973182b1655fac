"""Controller configuration: a TOML file, environment variables, CLI flags.

Precedence (highest first): CLI flags, environment (``EDGEFLEET_HOME``,
``EDGEFLEET_DATABASE_URL``, ``EDGEFLEET_PROFILES`` and
``EDGEFLEET_<TABLE>_<KEY>`` for every key of ``[broker]``, ``[service]`` and
``[cli]``, e.g. ``EDGEFLEET_BROKER_PORT=18830``; see
:func:`edgefleet.shared.settings.merge_environment`), the config file, defaults. Example
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

    [cli]                                       # the CLI's own broker identity
    cert_file = "/etc/edgefleet/cli.pem"
    key_file = "/etc/edgefleet/cli.key"

    [api]                                       # the management API of `serve`
    address = "127.0.0.1:8480"
    cert_file = "/etc/edgefleet/api.pem"        # optional: HTTPS
    key_file = "/etc/edgefleet/api.key"
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgefleet.protocols.errors import ConfigError
from edgefleet.shared.link import BrokerSettings
from edgefleet.shared.settings import (
    merge_environment,
    read_toml,
    refuse_unknown_keys,
    settings_from_table,
)

__all__ = [
    "DEFAULT_API_ADDRESS",
    "DEFAULT_HOME",
    "ApiSettings",
    "CliSettings",
    "ControllerConfig",
    "ServiceSettings",
    "load_controller_config",
]

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
    # After a (re)connect, how long to wait for the broker's retained outbox
    # marker before concluding it lost the retained desired states.
    outbox_marker_wait_s: float = 2.0
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
    # What one device can make the controller store (issue 9, "every device
    # is potentially hostile"). Telemetry and events whose `at` is further
    # than this from the controller's clock are refused (`rejected.clock_skew`):
    # a future `at` would make rows that never expire, and a device with a
    # clock this wrong cannot pass TLS certificate checks anyway.
    max_clock_skew_s: float = 600.0
    # Device events are deleted after this (on the telemetry loop), and each
    # device keeps at most this many, its oldest dropped first
    # (`rejected.event_cap`, per device `device_rejected.<id>.event_cap`).
    event_retention_s: float = 30 * 24 * 3600.0
    max_events_per_device: int = 1000
    # Rows per device in each per-device counter family (`device_rejected.`,
    # `transfer_refused.`, `agent_rejected.`); beyond it a new reason is
    # added to the device's `other` row (`rejected.counter_cap`).
    max_counter_rows_per_device: int = 32
    # `edgefleet devices`/`status` (and the API's device list) flag a desired
    # state published this long ago that its device has not reported
    # ("unacknowledged"): the deploy reached the broker but not the device.
    ack_warning_s: float = 300.0

    def __post_init__(self) -> None:
        # Only the storage bounds are checked here: a bad one would fail every
        # ingest batch, or (a skew beyond a day) let retention delete rows
        # the skew check had accepted as current.
        if not 0 < self.max_clock_skew_s <= 24 * 3600:
            raise ConfigError("[service] max_clock_skew_s must be > 0 and at most 86400 (a day)")
        warn = self.ack_warning_s
        if isinstance(warn, bool) or not isinstance(warn, int | float) or warn < 0:
            raise ConfigError(f"[service] ack_warning_s must be a number >= 0, got {warn!r}")
        if self.event_retention_s < 0:
            raise ConfigError("[service] event_retention_s must be >= 0")
        if self.max_events_per_device < 1:
            raise ConfigError("[service] max_events_per_device must be at least 1")
        cap = self.max_counter_rows_per_device
        if isinstance(cap, bool) or not isinstance(cap, int) or not 2 <= cap <= 10_000:
            raise ConfigError(
                f"[service] max_counter_rows_per_device must be an integer 2..10000, got {cap!r}"
            )


@dataclass(frozen=True)
class CliSettings:
    """The `[cli]` table: the certificate the CLI connects to the broker with.

    The broker makes a client's certificate CN its client id
    (``use_username_as_clientid``), so the CLI must not use ``serve``'s
    certificate: connecting with it would disconnect the running controller.
    ``edgefleet broker-config`` writes one (CN ``edgefleet-cli``) into ``cli/``.
    """

    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("[cli] cert_file and key_file must be given together")


DEFAULT_API_ADDRESS = "127.0.0.1:8480"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as a pair.

    Raises:
        ConfigError: no port, or a port outside 0-65535.
    """
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host:
        raise ConfigError(f"API address must be host:port, got {address!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"API address {address!r} has a non-numeric port") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"API address {address!r}: port must be 0-65535")
    return host.strip("[]"), port


@dataclass(frozen=True)
class ApiSettings:
    """The ``[api]`` table.

    ``address`` is ``host:port`` (port 0: any free port, for tests). With
    ``cert_file`` and ``key_file`` the API speaks HTTPS only.
    """

    enabled: bool = True
    address: str = DEFAULT_API_ADDRESS
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError("[api] enabled must be true or false")
        if not isinstance(self.address, str):
            raise ConfigError("[api] address must be a string host:port")
        for name in ("cert_file", "key_file"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"[api] {name} must be a path string")
        parse_address(self.address)
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("[api] cert_file and key_file must be given together")

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]

    @property
    def tls(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class ControllerConfig:
    """Where the controller keeps its state and how it reaches the broker."""

    home: Path = DEFAULT_HOME
    database_url: str | None = None
    profiles_file: Path | None = None
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    cli: CliSettings = field(default_factory=CliSettings)
    # The management API (controller/api): `[api]` address, tls, enabled.
    api: ApiSettings = field(default_factory=ApiSettings)

    @property
    def cli_broker(self) -> BrokerSettings | None:
        """How the CLI reaches the broker, or ``None`` when it must leave publishing to ``serve``.

        With a client certificate in ``[broker]`` but none in ``[cli]``, the
        CLI has no identity of its own: it records the deployment and the
        running controller's outbox publishes it within seconds.
        """
        if self.cli.cert_file is not None:
            return replace(self.broker, cert_file=self.cli.cert_file, key_file=self.cli.key_file)
        if self.broker.cert_file is not None:
            return None
        return self.broker

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
    # EDGEFLEET_<TABLE>_<KEY> (and EDGEFLEET_PROFILES) override the file
    # (shared/settings.py); EDGEFLEET_HOME/DATABASE_URL keep their handling below.
    raw = read_toml(Path(path), "controller config") if path is not None else {}
    sections = {"broker": BrokerSettings, "service": ServiceSettings, "cli": CliSettings}
    merge_environment(raw, env, "EDGEFLEET", top={"profiles": str}, sections=sections)
    if raw:
        try:
            broker = _section(raw, "broker", BrokerSettings)
            service = _section(raw, "service", ServiceSettings)
            cli = _section(raw, "cli", CliSettings)
            api = _section(raw, "api", ApiSettings)
            refuse_unknown_keys(raw, {"home", "database_url", "profiles"})
        except ConfigError as exc:
            raise ConfigError(f"{path or 'environment'}: {exc}") from None
        base = Path(path).resolve().parent if path is not None else Path.cwd()
        config = ControllerConfig(
            home=base / raw["home"] if "home" in raw else DEFAULT_HOME,
            database_url=raw.get("database_url"),
            profiles_file=base / raw["profiles"] if "profiles" in raw else None,
            broker=broker,
            service=service,
            cli=cli,
            api=api,
        )
    env_home = env.get("EDGEFLEET_HOME")
    env_url = env.get("EDGEFLEET_DATABASE_URL")
    return config.with_overrides(
        home=home or (Path(env_home) if env_home else None),
        database_url=database_url or env_url or None,
    )
