"""Typed field readers shared by the message and bundle parsers.

Each reader takes a parsed JSON object and a key, checks the value's type
(refusing ``bool`` where a number is expected, since ``bool`` is an ``int`` in
Python) and raises :class:`MessageError` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum
from typing import Any

from edgefleet.protocols.errors import MessageError, TopicError
from edgefleet.protocols.topics import validate_device_id

JSONDict = dict[str, Any]


def get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool) -> Any:
    """Return ``d[key]`` if it has type ``kind``; ``None`` if optional and absent."""
    value = d.get(key)
    if value is None:
        if optional:
            return None
        raise MessageError(f"missing field {key!r}")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise MessageError(f"field {key!r} must be {_kind_name(kinds)}, got bool")
    if not isinstance(value, kinds):
        raise MessageError(f"field {key!r} must be {_kind_name(kinds)}, got {type(value).__name__}")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def text(d: Mapping[str, Any], key: str, *, optional: bool = False, max_len: int = 1024) -> Any:
    value = get(d, key, str, optional=optional)
    if value is not None and len(value) > max_len:
        raise MessageError(f"field {key!r} is longer than {max_len} characters")
    return value


def integer(
    d: Mapping[str, Any],
    key: str,
    *,
    optional: bool = False,
    minimum: int = 0,
    maximum: int = 2**63 - 1,
) -> Any:
    value = get(d, key, int, optional=optional)
    if value is not None and value < minimum:
        raise MessageError(f"field {key!r} must be >= {minimum}, got {value}")
    if value is not None and value > maximum:
        raise MessageError(f"field {key!r} is too large (at most {maximum})")
    return value


def number(
    d: Mapping[str, Any],
    key: str,
    *,
    optional: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A finite float, within ``[minimum, maximum]`` when those are given."""
    value = get(d, key, (int, float), optional=optional)
    if value is None:
        return None
    try:
        result = float(value)
    except OverflowError:
        raise MessageError(f"field {key!r} is too large") from None
    if not math.isfinite(result):
        raise MessageError(f"field {key!r} must be a finite number")
    if minimum is not None and result < minimum:
        raise MessageError(f"field {key!r} must be >= {minimum:g}, got {result:g}")
    if maximum is not None and result > maximum:
        raise MessageError(f"field {key!r} must be <= {maximum:g}, got {result:g}")
    return result


def obj(d: Mapping[str, Any], key: str, *, optional: bool = False) -> Any:
    return get(d, key, dict, optional=optional)


def text_list(d: Mapping[str, Any], key: str, *, max_items: int = 256) -> list[str]:
    value = get(d, key, list, optional=True)
    if value is None:
        return []
    if len(value) > max_items or not all(isinstance(v, str) and len(v) <= 256 for v in value):
        raise MessageError(f"field {key!r} must be a list of at most {max_items} short strings")
    return list(value)


def member(d: Mapping[str, Any], key: str, enum: type[Enum], *, optional: bool = False) -> Any:
    raw = text(d, key, optional=optional)
    if raw is None:
        return None
    try:
        return enum(raw)
    except ValueError:
        allowed = ", ".join(str(e.value) for e in enum)
        raise MessageError(f"field {key!r} must be one of {allowed}; got {raw!r}") from None


def device_id(d: Mapping[str, Any]) -> str:
    raw = text(d, "device_id", max_len=64)
    try:
        return validate_device_id(raw)
    except TopicError as exc:
        raise MessageError(str(exc)) from None


def extra(d: Mapping[str, Any], known: set[str]) -> JSONDict:
    """The fields a parser did not recognise, kept for a lossless round trip."""
    return {k: v for k, v in d.items() if k not in known and k != "v"}
