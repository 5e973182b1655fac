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
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from edgefleet.protocols.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["ErrorFactory", "read_toml", "refuse_unknown_keys", "settings_from_table"]

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
    try:
        return kind(**table)
    except (TypeError, ValueError) as exc:
        raise error(f"invalid {section} settings: {exc}") from None
