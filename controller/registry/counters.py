"""Named counters: rejections by reason, agent-reported totals, rollup marks.

Counters are created on first use. A bump is one ``UPDATE ... SET value =
value + by``, so concurrent bumps never lose counts; creating a counter may
race and is retried (:meth:`Database.write_retrying`).

Per-device counters (``<family><device>.<reason>``, families in
:data:`DEVICE_COUNTER_PREFIXES`) are capped at ``max_rows_per_device`` rows
per device and family (``[service] max_counter_rows_per_device``). The
reasons are fixed sets in code today, so the cap is a second line: should a
new code path ever name a reason after something a device sends, that
device still cannot make the controller create a row per message. A bump
beyond the cap is added to the device's ``<family><device>.other`` row; a
cumulative value beyond it (:meth:`Counters.set_counters`) is dropped. Both
are counted in ``rejected.counter_cap`` and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.database import Database, require_text, rowcount

__all__ = [
    "COUNTER_CAP_REASON",
    "DEFAULT_MAX_ROWS_PER_DEVICE",
    "DEVICE_COUNTER_PREFIXES",
    "DEVICE_REJECTED_PREFIX",
    "MAX_ROWS_PER_DEVICE_LIMIT",
    "Counters",
    "bump_in",
    "check_max_rows_per_device",
    "device_rejected_name",
    "read_counters",
]

log = logging.getLogger(__name__)

# Per-device refusals: ``device_rejected.<device>.<reason>``. Only enrolled
# devices and reasons the controller names get one, so their number is
# bounded by the fleet, never by what a device sends.
DEVICE_REJECTED_PREFIX = "device_rejected."


# Families of per-device counters: ``<prefix><device>.<reason>``.
DEVICE_COUNTER_PREFIXES = ("device_rejected.", "transfer_refused.", "agent_rejected.")
# Room for every reason the code names today (at most ~12 in a family) and more.
DEFAULT_MAX_ROWS_PER_DEVICE = 32
MAX_ROWS_PER_DEVICE_LIMIT = 10_000
COUNTER_CAP_REASON = "counter_cap"
_OTHER = "other"


def check_max_rows_per_device(value: object) -> int:
    """``value`` as a per-device row cap.

    Raises:
        TypeError: not an integer.
        ValueError: not in 2..:data:`MAX_ROWS_PER_DEVICE_LIMIT` (one named
            reason plus ``other`` at least).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be an integer, got {value!r}")
    if not 2 <= value <= MAX_ROWS_PER_DEVICE_LIMIT:
        raise ValueError(f"must be 2..{MAX_ROWS_PER_DEVICE_LIMIT}, got {value}")
    return value


def _family_of(name: str) -> tuple[str, str] | None:
    """``(prefix, "<prefix><device>.")`` of a per-device counter name, else ``None``."""
    for prefix in DEVICE_COUNTER_PREFIXES:
        if name.startswith(prefix):
            device, dot, reason = name[len(prefix) :].rpartition(".")
            if dot and device and reason:
                return prefix, f"{prefix}{device}."
    return None


def _rows_like(s: Session, stem: str) -> int:
    """Counter rows whose name starts with ``stem``.

    Compared with ``substr`` rather than ``LIKE`` (case-insensitive on
    SQLite, wildcards in ids) or a range (PostgreSQL collations ignore
    punctuation). It runs only when a per-device row would be created.
    """
    count = s.execute(
        sa.select(sa.func.count())
        .select_from(m.Counter)
        .where(sa.func.substr(m.Counter.name, 1, len(stem)) == stem)
    ).scalar_one()
    return int(count)


def device_rejected_name(device_id: str, reason: str) -> str:
    """The counter of ``reason`` refusals of one device's messages."""
    return f"{DEVICE_REJECTED_PREFIX}{device_id}.{reason}"[:128]


def bump_in(s: Session, name: str, by: int = 1) -> None:
    """Add ``by`` to a counter inside the caller's write transaction.

    For counts that must commit with the rows they describe (an ingest that
    dropped rows counts them in the same transaction). A create race on
    PostgreSQL surfaces as ``IntegrityError`` and fails the caller's
    transaction, like any other write there.
    """
    result = s.execute(
        sa.update(m.Counter).where(m.Counter.name == name).values(value=m.Counter.value + by)
    )
    if not rowcount(result):
        s.add(m.Counter(name=name, value=by))
        s.flush()


def read_counters(s: Session) -> dict[str, int]:
    """All counters by name, read inside ``s`` (fleet views read them with other totals)."""
    rows = s.execute(sa.select(m.Counter.name, m.Counter.value).order_by(m.Counter.name))
    return {name: int(value) for name, value in rows}


class Counters:
    """Named monotonic counters, on a shared :class:`Database`.

    Args:
        database: the registry's database.
        max_rows_per_device: at most this many rows per device in each
            per-device family (see the module docstring).

    Raises:
        TypeError, ValueError: ``max_rows_per_device`` is not an integer in range.
    """

    def __init__(
        self, database: Database, max_rows_per_device: int = DEFAULT_MAX_ROWS_PER_DEVICE
    ) -> None:
        self._db = database
        self._max_rows = check_max_rows_per_device(max_rows_per_device)

    @property
    def max_rows_per_device(self) -> int:
        return self._max_rows

    @max_rows_per_device.setter
    def max_rows_per_device(self, value: int) -> None:
        self._max_rows = check_max_rows_per_device(value)

    def limit_device_counters(self, max_rows_per_device: int) -> None:
        """Cap per-device counter rows (``[service] max_counter_rows_per_device``).

        Raises:
            TypeError, ValueError: not an integer in range.
        """
        self.max_rows_per_device = max_rows_per_device

    def _over_cap(self, s: Session, name: str) -> str | None:
        """The stem ``<prefix><device>.`` if creating ``name`` would pass the cap.

        The ``other`` row is the overflow itself: room is always kept for it,
        so a device has at most ``max_rows_per_device - 1`` named rows plus it.
        """
        family = _family_of(name)
        if family is None:
            return None
        _prefix, stem = family
        if name == (stem + _OTHER)[:128]:
            return None
        return stem if _rows_like(s, stem) >= self._max_rows - 1 else None

    def _bump_capped(self, s: Session, name: str, by: int) -> None:
        result = s.execute(
            sa.update(m.Counter).where(m.Counter.name == name).values(value=m.Counter.value + by)
        )
        if rowcount(result):
            return
        stem = self._over_cap(s, name)
        if stem is not None:
            log.warning("counter %s not created: %s has %d rows (cap)", name, stem, self._max_rows)
            bump_in(s, f"rejected.{COUNTER_CAP_REASON}")
            bump_in(s, (stem + _OTHER)[:128], by)
            return
        s.add(m.Counter(name=name, value=by))
        s.flush()

    def bump_counter(self, name: str, by: int = 1) -> None:
        """Add ``by`` to a named counter, creating it at zero first if needed.

        The increment is a single ``UPDATE ... SET value = value + by``, so
        concurrent bumps never lose counts.

        Beyond the per-device row cap, a new per-device name is added to
        that device's ``other`` row of the family instead.
        """
        require_text(name, "counter name", 128)
        self._db.write_retrying(lambda s: self._bump_capped(s, name, by))

    def set_counters(self, values: Mapping[str, int]) -> None:
        """Set named counters (totals devices report cumulatively), in one transaction.

        A new per-device name beyond the row cap is not created (a cumulative
        total cannot be added to ``other``); it is counted in
        ``rejected.counter_cap``.
        """
        for name in values:
            require_text(name, "counter name", 128)

        def work(s: Session) -> None:
            for name, value in values.items():
                result = s.execute(
                    sa.update(m.Counter).where(m.Counter.name == name).values(value=value)
                )
                if rowcount(result):
                    continue
                stem = self._over_cap(s, name)
                if stem is not None:
                    log.warning("counter %s not created: %s has its cap of rows", name, stem)
                    bump_in(s, f"rejected.{COUNTER_CAP_REASON}")
                    continue
                s.add(m.Counter(name=name, value=value))
                s.flush()

        if values:
            self._db.write_retrying(work)

    def counters(self) -> dict[str, int]:
        """All counters by name."""
        with self._db.read() as s:
            return read_counters(s)
