"""Agent configuration, read from a TOML file.

Example (``deploy/agent.example.toml`` has the full, commented version)::

    device_id = "gw-0001"
    state_dir = "/var/lib/edgefleet-agent"
    trust_root = "root.json"          # TUF root given at enrollment
    telemetry_interval_s = 10

    [broker]
    host = "mqtt.example.net"
    port = 8883
    tls = true
    ca_file = "ca.pem"

    [http]
    port = 8470
    token = "..."                     # optional: inference needs Authorization: Bearer

    [enrollment]                      # optional: enroll on first start instead
    token_file = "enrollment.json"    # from `edgefleet device token`; then [broker]
                                      # host/port/TLS files and trust_root come from it

Relative paths are resolved against the directory of the config file, so an
enrollment bundle (config + root.json + certificates) can be copied anywhere.
Unknown keys are refused: a typo must not silently fall back to a default,
and a value of the wrong type is named with its table and key
(``agent.toml [http] port: expected an integer 0-65535, got 'abc'``).

Every setting can also come from the environment, which wins over the file:
``EDGEFLEET_AGENT_<FIELD>`` for top-level keys (``EDGEFLEET_AGENT_DEVICE_ID``)
and ``EDGEFLEET_AGENT_<TABLE>_<KEY>`` for tables
(``EDGEFLEET_AGENT_HTTP_PORT=8471``, ``EDGEFLEET_AGENT_BROKER_TLS=true``);
see :func:`edgefleet.shared.settings.merge_environment` for the conversions.
Paths given there are resolved like the file's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from edgefleet.agent.enroll import EnrollmentSettings
from edgefleet.agent.fetcher import TransferSettings
from edgefleet.protocols.errors import ConfigError, TopicError
from edgefleet.protocols.topics import validate_device_id
from edgefleet.shared.link import BrokerSettings
from edgefleet.shared.settings import (
    check_field_types,
    field_types,
    merge_environment,
    read_toml,
    refuse_unknown_keys,
    settings_from_table,
)

__all__ = ["AgentConfig", "HttpSettings", "load_agent_config"]


@dataclass(frozen=True)
class HttpSettings:
    """The local inference endpoint. Loopback only unless ``allow_remote``.

    ``token``: when set, ``/v1/infer`` and ``/v1/model`` need
    ``Authorization: Bearer <token>`` (``/healthz`` stays open). For gateways
    where other local users exist: without it any local process can call the
    model (and, before per-sample health, could fake a latency regression).
    ``token_file`` reads it from a file instead (first line, owner-only file
    recommended), so the secret need not sit in the config.
    """

    host: str = "127.0.0.1"
    port: int = 8470
    allow_remote: bool = False
    max_body_bytes: int = 8 * 1024 * 1024
    token: str | None = None
    token_file: Path | None = None
    # Port 0 asks the OS for any free port (tests, several agents on one machine).
    settings_ranges: ClassVar[dict[str, tuple[int, int]]] = {"port": (0, 65535)}


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent daemon needs. Units are in the field names."""

    device_id: str
    state_dir: Path
    trust_root: Path | None = None
    hardware_class: str | None = None
    telemetry_interval_s: float = 10.0
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 300.0
    runtime_threads: int = 1
    # Events not acknowledged by the controller this long after sending are
    # sent again (agent/journal.py); after a reconnect all of them are.
    event_resend_s: float = 30.0
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    enrollment: EnrollmentSettings | None = None

    def __post_init__(self) -> None:
        try:
            validate_device_id(self.device_id)
        except TopicError as exc:
            raise ConfigError(str(exc)) from None
        if self.telemetry_interval_s <= 0:
            raise ConfigError("telemetry_interval_s must be positive")
        if self.event_resend_s <= 0:
            raise ConfigError("event_resend_s must be positive")
        if not (0 <= self.http.port < 65536):
            raise ConfigError(f"http port must be 0-65535, got {self.http.port}")

    def with_overrides(self, **changes: Any) -> AgentConfig:
        return replace(self, **changes)


def _table(raw: dict[str, Any], key: str, kind: type[Any], base: Path) -> Any:
    value = raw.pop(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    for path_key in ("ca_file", "cert_file", "key_file"):
        if isinstance(value.get(path_key), str):
            value[path_key] = str(base / value[path_key])
    return settings_from_table(kind, value, section=f"[{key}]")


def _http(raw: dict[str, Any], base: Path) -> HttpSettings:
    """The ``[http]`` table; ``token_file`` (relative to the config) is read into ``token``."""
    table = raw.get("http")
    token: object = table.get("token") if isinstance(table, dict) else None
    if token is not None and not isinstance(token, str):
        raise ConfigError("[http] token must be a string")
    value: HttpSettings = _table(raw, "http", HttpSettings, base)
    token_file: object = value.token_file  # still the raw TOML value here
    if token_file is None:
        if value.token is not None and not isinstance(value.token, str):
            raise ConfigError("[http] token must be a string")
        return value
    if value.token is not None:
        raise ConfigError("[http] give token or token_file, not both")
    if not isinstance(token_file, str):
        raise ConfigError("[http] token_file must be a path string")
    path = base / token_file
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"[http] token_file {path}: {exc}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"[http] token_file {path} is empty")
    return replace(value, token=token, token_file=path)


def _enrollment(raw: dict[str, Any], base: Path) -> EnrollmentSettings | None:
    """The optional ``[enrollment]`` table: enroll on first start (see agent/enroll.py)."""
    if "enrollment" not in raw:
        return None
    value: EnrollmentSettings = _table(raw, "enrollment", EnrollmentSettings, base)
    token_file: object = value.token_file  # still the raw TOML value here
    if not isinstance(token_file, str):
        raise ConfigError("[enrollment] token_file must be a path string")
    return replace(value, token_file=base / token_file)


ENV_PREFIX = "EDGEFLEET_AGENT"
"""Environment variables ``EDGEFLEET_AGENT_[<TABLE>_]<KEY>`` override the file."""

_TABLES: dict[str, type[Any]] = {
    "broker": BrokerSettings,
    "http": HttpSettings,
    "transfer": TransferSettings,
    "enrollment": EnrollmentSettings,
}


def load_agent_config(path: Path | str, *, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and validate an agent config file, with the environment's overrides.

    Raises:
        ConfigError: the file is missing, not TOML, or has unknown or invalid
            settings; or an ``EDGEFLEET_AGENT_*`` variable does not convert.
            The message names the file (or variable) and the setting.
    """
    path = Path(path)
    raw = read_toml(path, "agent config")
    base = path.resolve().parent
    top = {k: v for k, v in field_types(AgentConfig).items() if k not in _TABLES}
    try:
        merge_environment(
            raw, os.environ if environ is None else environ, ENV_PREFIX, top=top, sections=_TABLES
        )
    except ConfigError as exc:
        raise ConfigError(f"{path} (environment): {exc}") from None
    try:
        broker = _table(raw, "broker", BrokerSettings, base)
        http = _http(raw, base)
        transfer = _table(raw, "transfer", TransferSettings, base)
        enrollment = _enrollment(raw, base)
        known = set(AgentConfig.__dataclass_fields__) - set(_TABLES)
        refuse_unknown_keys(raw, known)
        check_field_types(AgentConfig, raw, section="")
        if "device_id" not in raw or "state_dir" not in raw:
            raise ConfigError("device_id and state_dir are required")
        for key in ("state_dir", "trust_root"):
            if key in raw:
                if not isinstance(raw[key], str):
                    raise ConfigError(f"{key} must be a path string")
                raw[key] = base / raw[key]
        return AgentConfig(
            broker=broker, http=http, transfer=transfer, enrollment=enrollment, **raw
        )
    except ConfigError as exc:
        message = str(exc)
        # "agent.toml [http] port: ..." reads as the place to look.
        where = f"{path} {message}" if message.startswith("[") else f"{path}: {message}"
        raise ConfigError(where) from None
    except TypeError as exc:
        raise ConfigError(f"{path}: invalid setting: {exc}") from None
