"""Settings from TOML: one reader, one rule for unknown keys.

Every configuration table edgefleet reads (the agent's and the controller's
config files, ``[broker]``, device profiles, rollout settings) follows the
same rule: a key we do not know is refused, with its name in the message,
because a typo must never fall back silently to a default. Settings are
frozen dataclasses whose fields name their units; :func:`settings_from_table`
builds one from a table and turns the ``TypeError`` of a wrong or missing
argument into the caller's error, so a user sees a config error, not a
traceback.

The caller chooses the error class (``ConfigError`` by default; the
compiler's ``ProfileError`` and the rollout's ``RolloutConfigError`` use their
own) and the words that name the table in messages.

**Types.** Before building a dataclass, each value is checked against the
field's annotation (``int``, ``float``, ``bool``, ``str``, ``Path``,
``X | None``, ``tuple[str, ...]``), so a wrong type reads
``[http] port: expected an integer 0-65535, got 'abc'`` instead of whatever
``__post_init__`` trips over. Fields named ``port`` (or ``*_port``) must be
1-65535 unless the dataclass widens the range in a ``settings_ranges``
class variable (the agent's HTTP port allows 0: any free port).

**Environment.** :func:`merge_environment` lays environment variables over a
parsed file, one per field: ``<PREFIX>_<SECTION>_<FIELD>`` for a table's
field and ``<PREFIX>_<FIELD>`` for a top-level one, upper case (the agent
uses prefix ``EDGEFLEET_AGENT``: ``EDGEFLEET_AGENT_HTTP_PORT=8471``; the
controller ``EDGEFLEET``: ``EDGEFLEET_BROKER_PORT=18830``,
``EDGEFLEET_SERVICE_INGEST_BATCH_MAX=1000``). The text is converted by the
field's type: integers and floats as Python writes them, booleans as
``true/false``, ``1/0``, ``yes/no`` or ``on/off``, tuples comma-separated,
and an empty value for an optional field means "not set". A value that does
not convert is refused with the variable's name:
``EDGEFLEET_AGENT_HTTP_PORT: expected an integer 0-65535, got 'abc'``. The
environment wins over the file; command-line flags win over both.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from edgefleet.protocols.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ErrorFactory",
    "check_field_types",
    "field_types",
    "merge_environment",
    "read_toml",
    "refuse_unknown_keys",
    "settings_from_table",
]

ErrorFactory = Callable[[str], Exception]
"""Makes the exception to raise from a message: an error class, or a function adding context."""

_T = TypeVar("_T")


def read_toml(path: Path, what: str, *, error: ErrorFactory = ConfigError) -> dict[str, Any]:
    """Read and parse a TOML file.

    Args:
        path: the file.
        what: what the file is, for messages ("agent config", "profile file").
        error: makes the exception raised on failure.

    Raises:
        Whatever ``error`` makes: the file cannot be read, is not UTF-8, or
        is not valid TOML. The message names ``what`` and ``path``.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None


def refuse_unknown_keys(
    table: Mapping[str, object],
    known: Iterable[str],
    *,
    what: str = "setting(s)",
    error: ErrorFactory = ConfigError,
) -> None:
    """Raise ``error("unknown <what>: a, b")`` when ``table`` has keys not in ``known``.

    The unknown names are sorted, so the message is stable.

    Raises:
        Whatever ``error`` makes, when a key is unknown.
    """
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise error(f"unknown {what}: {', '.join(unknown)}")


def settings_from_table(
    kind: type[_T],
    table: Mapping[str, Any],
    *,
    section: str,
    error: ErrorFactory = ConfigError,
) -> _T:
    """Build the dataclass ``kind`` from ``table``, refusing keys it has no field for.

    Args:
        kind: a dataclass whose fields are the allowed keys.
        table: the TOML table (or any mapping of field name to value).
        section: names the table in messages: ``"[broker]"`` gives
            "unknown [broker] setting(s): ..." and "invalid [broker] settings: ...".
        error: makes the exception raised.

    Raises:
        Whatever ``error`` makes: a key is unknown, or ``kind`` refused the
        values with ``TypeError`` or ``ValueError`` (a missing required field,
        a wrong type its checks caught). Errors that ``kind`` raises itself,
        such as a ``ConfigError`` from ``__post_init__``, pass through.
    """
    known = (f.name for f in dataclasses.fields(kind))  # type: ignore[arg-type]
    refuse_unknown_keys(table, known, what=f"{section} setting(s)", error=error)
    check_field_types(kind, table, section=section, error=error)
    missing = [
        f.name
        for f in dataclasses.fields(kind)  # type: ignore[arg-type]
        if f.init
        and f.name not in table
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise error(f"{section} {', '.join(missing)}: required, not given")
    try:
        return kind(**table)
    except (TypeError, ValueError) as exc:
        raise error(f"invalid {section} settings: {exc}") from None


# ---------------------------------------------------------------------------- types

_PORT_RANGE = (1, 65535)
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def field_types(kind: type[Any]) -> dict[str, Any]:
    """Resolved annotations of ``kind``'s fields; empty if they cannot be resolved."""
    try:
        hints = typing.get_type_hints(kind)
    except Exception:  # noqa: BLE001 - a forward reference we cannot resolve: check nothing
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(kind) if f.name in hints}


def _optional(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None`` (or ``Optional[X]``), else ``(annotation, False)``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _int_range(kind: type[Any], name: str) -> tuple[int, int] | None:
    ranges = getattr(kind, "settings_ranges", None) or {}
    if name in ranges:
        low, high = ranges[name]
        return int(low), int(high)
    if name == "port" or name.endswith("_port"):
        return _PORT_RANGE
    return None


def _expected(annotation: Any, bounds: tuple[int, int] | None) -> str | None:
    """What a value of ``annotation`` must be, in words; ``None`` if we do not check it."""
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + (f" {bounds[0]}-{bounds[1]}" if bounds else "")
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if annotation is Path:
        return "a path string"
    if typing.get_origin(annotation) in (tuple, list):
        return "a list of strings"
    return None


def _valid(value: Any, annotation: Any, bounds: tuple[int, int] | None) -> bool:
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return ok and (bounds is None or bounds[0] <= value <= bounds[1])
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is Path:
        return isinstance(value, str | Path)
    if typing.get_origin(annotation) in (tuple, list):
        return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    return True


def check_field_types(
    kind: type[_T],
    table: Mapping[str, Any],
    *,
    section: str,
    error: ErrorFactory = ConfigError,
) -> None:
    """Refuse a value whose type does not match its field's annotation (see the module doc).

    Only plain types are checked (``int``, ``float``, ``bool``, ``str``,
    ``Path``, ``X | None`` of those, ``tuple[str, ...]``); others pass.

    Raises:
        Whatever ``error`` makes: ``"<section> <field>: expected <what>, got <value>"``.
    """
    annotations = field_types(kind)
    for name, value in table.items():
        if name not in annotations:
            continue
        annotation, optional = _optional(annotations[name])
        if value is None and optional:
            continue
        bounds = _int_range(kind, name)
        expected = _expected(annotation, bounds)
        if expected is not None and not _valid(value, annotation, bounds):
            where = f"{section} {name}" if section else name
            raise error(f"{where}: expected {expected}, got {value!r}")


def _convert(text: str, annotation: Any, bounds: tuple[int, int] | None, var: str) -> Any:
    """The value of environment variable ``var`` as ``annotation``."""
    annotation, optional = _optional(annotation)
    if optional and text == "":
        return None
    expected = _expected(annotation, bounds)
    value: Any = text
    try:
        if annotation is bool:
            low = text.strip().lower()
            if low not in _TRUE | _FALSE:
                raise ValueError(text)
            value = low in _TRUE
        elif annotation is int:
            value = int(text.strip())
        elif annotation is float:
            value = float(text.strip())
        elif typing.get_origin(annotation) in (tuple, list):
            value = [part.strip() for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{var}: expected {expected}, got {text!r}") from None
    if expected is not None and not _valid(value, annotation, bounds):
        raise ConfigError(f"{var}: expected {expected}, got {text!r}")
    return value


def merge_environment(
    raw: dict[str, Any],
    environ: Mapping[str, str],
    prefix: str,
    *,
    top: Mapping[str, Any],
    sections: Mapping[str, type[Any]],
) -> dict[str, Any]:
    """Lay ``<PREFIX>_[<SECTION>_]<FIELD>`` variables over a parsed config (see the module doc).

    Args:
        raw: the parsed file (changed in place and returned); tables are
            created for sections only the environment sets.
        environ: the environment.
        prefix: ``"EDGEFLEET"`` or ``"EDGEFLEET_AGENT"``.
        top: the top-level fields and their annotations.
        sections: each table's name and its settings dataclass.

    Raises:
        ConfigError: a variable's value does not convert; the message names it.
    """
    for name, annotation in top.items():
        var = f"{prefix}_{name}".upper()
        if var in environ:
            raw[name] = _convert(environ[var], annotation, None, var)
    for section, kind in sections.items():
        for name, annotation in field_types(kind).items():
            var = f"{prefix}_{section}_{name}".upper()
            if var not in environ:
                continue
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"[{section}] must be a table")
            table[name] = _convert(environ[var], annotation, _int_range(kind, name), var)
    return raw
