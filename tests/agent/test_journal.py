"""The agent's event journal: numbered, durable, bounded, forgotten only when acknowledged."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

from edgefleet.agent.journal import JOURNAL_FILE, META_FILE, EventJournal
from edgefleet.protocols.messages import Event, EventKind


def _encode(kind: EventKind = EventKind.INSTALLED) -> Callable[[str, int], bytes]:
    def encode(journal: str, seq: int) -> bytes:
        return Event("gw-1", kind, journal=journal, seq=seq).encode()

    return encode


def _seqs(payloads: list[bytes]) -> list[int | None]:
    return [Event.decode(p).seq for p in payloads]


def test_events_are_numbered_and_survive_a_restart(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path)
    first = Event.decode(journal.append(_encode()))
    second = Event.decode(journal.append(_encode(EventKind.INSTALL_FAILED)))
    assert (first.seq, second.seq) == (1, 2)
    assert first.journal == second.journal == journal.journal_id

    again = EventJournal(tmp_path)  # a crash: only the files remain
    assert again.journal_id == journal.journal_id
    assert again.pending() == 2
    assert _seqs(again.due(everything=True)) == [1, 2]
    assert Event.decode(again.append(_encode())).seq == 3
    for name in (JOURNAL_FILE, META_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_an_ack_forgets_up_to_its_number_and_numbering_continues(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path)
    for _ in range(4):
        journal.append(_encode())
    assert journal.acknowledge("0" * 16, 4) == 0  # another journal's ack changes nothing
    assert journal.acknowledge(journal.journal_id, 2) == 2
    assert journal.acknowledge(journal.journal_id, 1) == 0  # stale
    assert _seqs(journal.due(everything=True)) == [3, 4]

    reopened = EventJournal(tmp_path)
    assert reopened.acked == 2
    assert reopened.pending() == 2
    assert reopened.acknowledge(reopened.journal_id, 4) == 2
    assert reopened.pending() == 0
    # Everything acknowledged and the file compacted: numbers still go on.
    assert Event.decode(EventJournal(tmp_path).append(_encode())).seq == 5


def test_resend_waits_for_the_interval_unless_everything_is_due(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path, resend_after_s=3600)
    journal.append(_encode())
    assert journal.due() == []  # just sent
    assert _seqs(journal.due(everything=True)) == [1]  # a reconnect
    assert journal.due() == []
    fast = EventJournal(tmp_path, resend_after_s=0.0)
    assert _seqs(fast.due()) == [1]


def test_everything_beyond_the_limit_stays_due(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path, resend_after_s=3600)
    for _ in range(5):
        journal.append(_encode())
    assert _seqs(journal.due(everything=True, limit=2)) == [1, 2]
    assert _seqs(journal.due(limit=2)) == [3, 4]
    assert _seqs(journal.due(limit=2)) == [5]
    assert journal.due() == []


def test_the_journal_is_bounded_and_counts_what_it_drops(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path, max_entries=3)
    first = journal.journal_id
    kinds = [EventKind.INSTALLED, EventKind.REJECTED, EventKind.INSTALL_FAILED]
    returned = [journal.append(_encode(kind)) for kind in [*kinds, *kinds[:2]]]
    assert journal.dropped == 2
    # The newest three are kept; having dropped events, the journal continues
    # under a new id, numbered from 1, so the controller's contiguous ack can
    # reach them (the old numbers 1 and 2 will never arrive).
    assert journal.journal_id != first
    due = [Event.decode(p) for p in journal.due(everything=True)]
    assert [(e.kind, e.journal, e.seq) for e in due] == [
        (EventKind.INSTALL_FAILED, journal.journal_id, 1),
        (EventKind.INSTALLED, journal.journal_id, 2),
        (EventKind.REJECTED, journal.journal_id, 3),
    ]
    # What append returned for the event that caused the rotation is its new numbering.
    assert Event.decode(returned[-1]).seq == 3
    assert Event.decode(returned[-1]).journal == journal.journal_id
    assert len((tmp_path / JOURNAL_FILE).read_bytes().splitlines()) == 3
    # ... and it all survives a restart; new events continue the new numbering.
    again = EventJournal(tmp_path, max_entries=3)
    assert again.journal_id == journal.journal_id
    assert _seqs(again.due(everything=True)) == [1, 2, 3]
    assert journal.acknowledge(journal.journal_id, 3) == 3
    assert Event.decode(journal.append(_encode())).seq == 4


def test_a_crash_mid_rotation_is_repaired_at_start(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path, max_entries=10)
    for _ in range(3):
        journal.append(_encode())
    # A rotation that wrote its new meta file but died before the journal.
    (tmp_path / META_FILE).write_text(json.dumps({"journal": "ab" * 8, "acked": 0}))
    again = EventJournal(tmp_path, max_entries=10)
    due = [Event.decode(p) for p in again.due(everything=True)]
    assert [(e.journal, e.seq) for e in due] == [("ab" * 8, 1), ("ab" * 8, 2), ("ab" * 8, 3)]
    assert again.acknowledge("ab" * 8, 3) == 3
    assert again.pending() == 0


def test_the_journal_is_bounded_in_bytes(tmp_path: Path) -> None:
    size = len(_encode()("0" * 16, 1))
    journal = EventJournal(tmp_path, max_bytes=2 * size + 10)
    for _ in range(4):
        journal.append(_encode())
    assert journal.pending() == 2
    assert journal.dropped == 2
    assert _seqs(journal.due(everything=True)) == [1, 2]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path)
    journal.append(_encode())
    with (tmp_path / JOURNAL_FILE).open("ab") as fh:
        fh.write(b'{"seq": 2, "payl')  # power cut mid-append
    again = EventJournal(tmp_path)
    assert _seqs(again.due(everything=True)) == [1]
    assert Event.decode(again.append(_encode())).seq == 2


def test_a_corrupt_meta_file_starts_a_new_journal(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path)
    journal.append(_encode())
    (tmp_path / META_FILE).write_text("{not json")
    fresh = EventJournal(tmp_path)
    assert fresh.journal_id != journal.journal_id
    assert fresh.pending() == 0  # the old lines belonged to the old journal
    assert json.loads((tmp_path / META_FILE).read_text())["acked"] == 0
    assert Event.decode(fresh.append(_encode())).seq == 1
