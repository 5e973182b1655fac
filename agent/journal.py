"""The agent's event journal: no event is lost while the controller is away.

Events are QoS 1 and not retained, and the controller subscribes with a
clean session, so an event published while the controller is disconnected
(a network cut, a restart, a takeover of its session) reaches nobody. We do
not rely on the broker queueing messages for an offline persistent session
(see the design notes on MQTT 3.1.1): instead the agent keeps every event it
emits until the controller acknowledges it.

- Each event gets the next number of this journal, ``seq`` (1, 2, 3, ...),
  and the journal's random ``journal`` id, both carried in the message. A
  device whose state directory is wiped starts a new journal, so its new
  ``seq`` 1 is not mistaken for a duplicate of the old one.
- The event is appended to ``events.journal`` (one JSON line, fsynced)
  *before* it is published, so a crash right after emitting loses nothing.
- The controller stores events idempotently by (device, journal, seq) and
  answers on ``events/ack`` with the highest *contiguous* ``seq`` it holds.
  :meth:`EventJournal.acknowledge` drops everything up to that number and
  rewrites the file (atomically, through :mod:`edgefleet.shared.durable`).
- :meth:`EventJournal.due` lists what to publish again: everything unacked
  after a reconnect, and entries not acknowledged within ``resend_after_s``
  while connected (the controller may have lost *its* connection while ours
  stayed up).

Bounded: at most ``max_entries`` unacknowledged events, and at most
``max_bytes`` of their payloads, are kept; when full, the oldest are dropped
and counted in :attr:`EventJournal.dropped` (a device
cut off for days keeps its newest events, not its oldest).

Dropping leaves a gap the controller's "highest contiguous ``seq``" can never
pass, so the agent would replay its whole journal for ever. A journal that
drops events therefore *rotates*: it takes a new random id and renumbers the
events it kept from 1 (rewriting ``journal``/``seq`` inside their payloads).
The controller sees a new journal and acknowledges it as usual. Rotation
writes the meta file first and the journal second; a crash between the two is
repaired at the next start, which renumbers any line whose payload names
another journal than the meta file does.

File layout in the agent's state directory::

    events.journal   one line per unacknowledged event: {"seq": n, "payload": "<JSON>"}
    events.meta      {"journal": "<hex id>", "acked": n}: survives compaction
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgefleet.shared.durable import PRIVATE_MODE, atomic_write, fsync_dir

__all__ = ["EventJournal", "JournalEntry"]

log = logging.getLogger(__name__)

JOURNAL_FILE = "events.journal"
META_FILE = "events.meta"


@dataclass
class JournalEntry:
    """One unacknowledged event: its number, its encoded message, when it was last sent."""

    seq: int
    payload: bytes
    sent_at: float = float("-inf")  # time.monotonic() of the last publish; -inf: due now


class EventJournal:
    """A durable, bounded, append-only list of events awaiting the controller's ack.

    Thread-safe: the reconcile thread appends, paho's thread acknowledges and
    replays.

    Args:
        state_dir: the agent's state directory (must exist).
        max_entries: unacknowledged events kept at most; the oldest are dropped.
        max_bytes: total payload bytes kept at most; the oldest are dropped.
        resend_after_s: an entry sent this long ago without an ack is due again.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        max_entries: int = 1000,
        max_bytes: int = 4 * 1024 * 1024,
        resend_after_s: float = 30.0,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be at least 1")
        self._path = state_dir / JOURNAL_FILE
        self._meta_path = state_dir / META_FILE
        self._max = max_entries
        self._max_bytes = max_bytes
        self.resend_after_s = resend_after_s
        self._lock = threading.Lock()
        self.dropped = 0
        self.write_errors = 0
        self.journal_id, self._acked = self._load_meta()
        self._entries: list[JournalEntry] = self._load_entries()
        self._next = max([self._acked, *(e.seq for e in self._entries)]) + 1
        if self._trim():
            self._rotate()
        elif any(_journal_of(e.payload) != self.journal_id for e in self._entries):
            # A crash between a rotation's meta write and its journal rewrite.
            self._renumber(self.journal_id, self._acked)
            self._rewrite()

    # ------------------------------------------------------------------ loading
    def _load_meta(self) -> tuple[str, int]:
        try:
            meta = json.loads(self._meta_path.read_bytes())
            journal = meta["journal"]
            acked = meta["acked"]
            if (
                isinstance(journal, str)
                and 8 <= len(journal) <= 32
                and isinstance(acked, int)
                and acked >= 0
            ):
                return journal, acked
            log.warning("%s is invalid; starting a new event journal", self._meta_path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot read %s (%s); starting a new event journal", self._meta_path, exc)
        journal = secrets.token_hex(8)
        self._write_meta(journal, 0)
        # A new journal: old lines (if any) belong to the previous one.
        if self._path.exists():
            self._path.unlink()
            fsync_dir(self._path.parent)
        return journal, 0

    def _write_meta(self, journal: str, acked: int) -> None:
        body = json.dumps({"journal": journal, "acked": acked}).encode()
        atomic_write(self._meta_path, body, mode=PRIVATE_MODE)

    def _load_entries(self) -> list[JournalEntry]:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return []
        entries: list[JournalEntry] = []
        last = self._acked
        for line in raw.splitlines():
            try:
                item = json.loads(line)
                seq = item["seq"]
                payload = item["payload"].encode()
            except (ValueError, KeyError, TypeError, AttributeError):
                # A line cut short by a crash mid-append (only the last can be).
                log.warning("skipping an unreadable line of %s", self._path)
                continue
            if isinstance(seq, int) and seq > last:
                entries.append(JournalEntry(seq, payload))
                last = seq
        return entries

    # ------------------------------------------------------------------ writing
    def append(self, encode: Callable[[str, int], bytes]) -> bytes:
        """Number an event, store it durably, and return the payload to publish.

        Args:
            encode: builds the event's payload from this journal's id and the
                event's ``seq``.

        A journal file that cannot be written (a full disk) is logged and
        counted in :attr:`write_errors`; the event is kept in memory and
        published anyway, so only a crash before the ack loses it.
        """
        with self._lock:
            seq = self._next
            self._next += 1
            payload = encode(self.journal_id, seq)
            entry = JournalEntry(seq, payload, sent_at=time.monotonic())
            self._entries.append(entry)
            if self._trim():
                log.warning(
                    "event journal full: dropped the oldest unacknowledged events "
                    "(%d so far); continuing as a new journal",
                    self.dropped,
                )
                self._rotate()
            else:
                self._append_line(_line(seq, payload))
            return entry.payload

    def _append_line(self, line: bytes) -> None:
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_MODE)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.write_errors += 1
            log.warning("cannot write the event journal %s: %s", self._path, exc)

    def _trim(self) -> bool:
        """Drop the oldest entries beyond the bounds; True when any was dropped."""
        total = sum(len(e.payload) for e in self._entries)
        dropped = 0
        while len(self._entries) > 1 and (
            len(self._entries) > self._max or total > self._max_bytes
        ):
            total -= len(self._entries.pop(0).payload)
            dropped += 1
        self.dropped += dropped
        return dropped > 0

    def _rotate(self) -> None:
        """Continue under a new journal id, the kept entries renumbered from 1 (module doc)."""
        journal = secrets.token_hex(8)
        try:
            self._write_meta(journal, 0)
        except OSError as exc:
            # Keep the old journal: its gap stalls acks, but nothing is lost.
            self.write_errors += 1
            log.warning("cannot write %s: %s", self._meta_path, exc)
            self._rewrite()
            return
        self.journal_id, self._acked = journal, 0
        self._renumber(journal, 0)
        self._rewrite()

    def _renumber(self, journal: str, after: int) -> None:
        """Number the entries ``after + 1, after + 2, ...`` of ``journal``, payloads included."""
        for offset, entry in enumerate(self._entries, start=1):
            entry.seq = after + offset
            entry.payload = _renumbered(entry.payload, journal, entry.seq)
        self._next = after + len(self._entries) + 1

    def _rewrite(self) -> None:
        lines = b"".join(_line(e.seq, e.payload) for e in self._entries)
        try:
            atomic_write(self._path, lines, mode=PRIVATE_MODE)
        except OSError as exc:
            self.write_errors += 1
            log.warning("cannot rewrite the event journal %s: %s", self._path, exc)

    def acknowledge(self, journal: str, seq: int) -> int:
        """The controller holds every event of ``journal`` up to ``seq``: forget them.

        An ack for another journal (a wiped and re-created state directory)
        or for numbers already forgotten changes nothing.

        Returns:
            How many entries were dropped.
        """
        with self._lock:
            if journal != self.journal_id or seq <= self._acked:
                return 0
            seq = min(seq, self._next - 1)  # never ack what we have not numbered
            keep = [e for e in self._entries if e.seq > seq]
            dropped = len(self._entries) - len(keep)
            self._entries = keep
            self._acked = seq
            # Meta first: were the journal rewritten first and we crashed, the
            # next start would number new events from an older ``acked``.
            try:
                self._write_meta(self.journal_id, seq)
            except OSError as exc:
                self.write_errors += 1
                log.warning("cannot write %s: %s", self._meta_path, exc)
                return dropped
            self._rewrite()
            return dropped

    # ------------------------------------------------------------------ replay
    def due(self, *, everything: bool = False, limit: int = 100) -> list[bytes]:
        """Payloads to publish (again), oldest first, marked as sent now.

        Args:
            everything: after a reconnect, every unacknowledged entry is due
                (now or, beyond ``limit``, in the next calls).
            limit: at most this many; the rest stay due for the next call.
        """
        now = time.monotonic()
        with self._lock:
            if everything:
                for entry in self._entries:
                    entry.sent_at = float("-inf")
            out: list[bytes] = []
            for entry in self._entries:
                if len(out) >= limit:
                    break
                if now - entry.sent_at >= self.resend_after_s:
                    entry.sent_at = now
                    out.append(entry.payload)
            return out

    @property
    def acked(self) -> int:
        """The highest ``seq`` the controller acknowledged."""
        with self._lock:
            return self._acked

    def pending(self) -> int:
        """How many events await an acknowledgement."""
        with self._lock:
            return len(self._entries)


def _line(seq: int, payload: bytes) -> bytes:
    """One journal line: the number and the exact payload that was (or will be) published."""
    text = json.dumps({"seq": seq, "payload": payload.decode()}, separators=(",", ":"))
    return text.encode() + b"\n"


def _journal_of(payload: bytes) -> str | None:
    """The ``journal`` an event payload names, or None when it is unreadable."""
    try:
        value = json.loads(payload).get("journal")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _renumbered(payload: bytes, journal: str, seq: int) -> bytes:
    """``payload`` (an event's JSON object) with its ``journal`` and ``seq`` replaced."""
    try:
        message = json.loads(payload)
    except ValueError:
        return payload  # not ours to fix: the controller rejects it and counts it
    if not isinstance(message, dict):
        return payload
    message["journal"], message["seq"] = journal, seq
    return json.dumps(message, separators=(",", ":")).encode()
