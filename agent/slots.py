"""Versioned install slots and the atomic active/previous switch.

Layout of the agent's state directory::

    <state>/slots/<slot-name>/        one unpacked bundle per slot
    <state>/slots/.staging-<name>-*/  a bundle being unpacked (never loaded)
    <state>/current.json              which slots are active and previous

``current.json`` is::

    {"active":   {"slot": ..., "model": <ModelRef dict>, "bundle_sha256": ...} | null,
     "previous": {...same...} | null}

Every step that changes what the agent would load after a restart is a single
``os.replace`` followed by an fsync of the containing directory: a staging
directory becomes a slot in one rename, and a new ``current.json`` replaces
the old one in one rename. A power cut at any point therefore leaves either
the old or the new state, never a mix, and the slot ``current.json`` names is
always complete because it was renamed into place only after its files were
fsynced (see :func:`edgefleet.agent.unpack.unpack_bundle`).

Keeping the previous slot on disk is what makes a rollback instant: the
controller asks for the old release and :meth:`SlotStore.find` finds its
bundle already unpacked, so no download is needed.

A ``current.json`` that cannot be parsed is not fatal: it is moved aside as
``current.json.corrupt`` and the agent starts with no active model, after
which the controller's desired state makes it install one again.

A :class:`SlotStore` is meant to be driven by one install pipeline at a time;
its methods are thread-safe, but :meth:`SlotStore.gc` should not run while
another process installs into the same state directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.protocols.errors import MessageError, SlotError
from edgefleet.protocols.messages import ModelRef
from edgefleet.shared.durable import atomic_write, fsync_dir

__all__ = ["CURRENT_NAME", "SlotRecord", "SlotStore"]

log = logging.getLogger(__name__)

CURRENT_NAME = "current.json"
_SLOTS = "slots"
_STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".trash-"
# Slot names come from slot_name() but are also read back from current.json,
# which we must not trust to stay inside slots/.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_name(name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise SlotError(f"unsafe slot name {name!r}")
    return name


def _remove(path: Path) -> None:
    """Delete a file, symlink or directory tree without following links."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


@dataclass(frozen=True)
class SlotRecord:
    """An installed bundle: its slot, the model it holds and the bundle's hash."""

    slot: str
    model: ModelRef
    bundle_sha256: str
    path: Path

    def to_dict(self) -> dict[str, Any]:
        """The ``current.json`` entry; ``path`` is derived from ``slot`` when read back."""
        return {
            "slot": self.slot,
            "model": self.model.to_dict(),
            "bundle_sha256": self.bundle_sha256,
        }


class _CorruptStateError(Exception):
    """current.json exists but does not hold a usable state."""


class SlotStore:
    """The slots directory and ``current.json`` of one agent state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.slots_dir = state_dir / _SLOTS
        self.slots_dir.mkdir(parents=True, exist_ok=True)
        self._current = state_dir / CURRENT_NAME
        self._lock = threading.RLock()
        # Staging dirs handed out by this process and not yet committed or
        # discarded: gc() leaves them alone, everything else named
        # .staging-* is a leftover of a crashed install.
        self._live_staging: set[Path] = set()

    # ------------------------------------------------------------------ naming
    @staticmethod
    def slot_name(model: ModelRef, bundle_sha256: str) -> str:
        """Name the slot of a bundle: ``{release:010d}-{sha[:16]}``.

        Zero-padded release first, so a directory listing sorts by release;
        the hash prefix tells apart two bundles that claim the same release.

        Raises:
            SlotError: ``bundle_sha256`` is not 64 lowercase hex characters
                or the release is negative.
        """
        if not _SHA256.match(bundle_sha256):
            raise SlotError("bundle_sha256 must be 64 lowercase hex characters")
        if model.release < 0:
            raise SlotError("release must not be negative")
        return f"{model.release:010d}-{bundle_sha256[:16]}"

    def slot_path(self, name: str) -> Path:
        """Where slot ``name`` lives (whether or not it exists)."""
        return self.slots_dir / _check_name(name)

    # ------------------------------------------------------------------ installing
    def staging(self, name: str) -> Path:
        """Create a fresh, empty staging directory to unpack slot ``name`` into.

        Leftover staging directories for the same name (from an install that
        crashed) are removed first, so retries do not accumulate them.
        """
        _check_name(name)
        prefix = f"{_STAGING_PREFIX}{name}-"
        with self._lock:
            for old in self.slots_dir.glob(prefix + "*"):
                if old not in self._live_staging:
                    log.info("removing leftover staging directory %s", old.name)
                    _remove(old)
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.slots_dir))
            self._live_staging.add(path)
            return path

    def discard(self, staging: Path) -> None:
        """Delete a staging directory after a failed install."""
        with self._lock:
            self._live_staging.discard(staging)
            if staging.parent == self.slots_dir and staging.name.startswith(_STAGING_PREFIX):
                _remove(staging)

    def commit(self, staging: Path, name: str) -> Path:
        """Turn a fully unpacked staging directory into slot ``name``.

        An existing slot of the same name is moved aside and deleted first
        (re-installing the same bundle repairs a damaged slot). The rename of
        the staging directory is atomic and the slots directory is fsynced.

        Returns:
            The slot's path.

        Raises:
            SlotError: ``staging`` is not a staging directory of this store.
        """
        target = self.slot_path(name)
        with self._lock:
            if (
                staging.parent != self.slots_dir
                or not staging.name.startswith(_STAGING_PREFIX)
                or staging.is_symlink()
                or not staging.is_dir()
            ):
                raise SlotError(f"{staging} is not a staging directory of {self.slots_dir}")
            trash: Path | None = None
            if target.exists() or target.is_symlink():
                # os.replace cannot replace a non-empty directory: rename the
                # old slot aside (atomic) rather than deleting it in place, so
                # a crash never leaves a half-deleted slot under the real name.
                trash = Path(tempfile.mkdtemp(prefix=f"{_TRASH_PREFIX}{name}-", dir=self.slots_dir))
                os.replace(target, trash / "old")
            os.replace(staging, target)
            self._live_staging.discard(staging)
            fsync_dir(self.slots_dir)
            if trash is not None:
                _remove(trash)
            return target

    # ------------------------------------------------------------------ current.json
    def _record(self, entry: Any) -> SlotRecord | None:
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise _CorruptStateError("entry is not an object")
        slot, sha = entry.get("slot"), entry.get("bundle_sha256")
        if not isinstance(slot, str) or not _SAFE_NAME.match(slot):
            raise _CorruptStateError(f"bad slot name {slot!r}")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise _CorruptStateError("bad bundle_sha256")
        try:
            model = ModelRef.from_dict(entry.get("model"))  # type: ignore[arg-type]
        except MessageError as exc:
            raise _CorruptStateError(str(exc)) from exc
        return SlotRecord(slot=slot, model=model, bundle_sha256=sha, path=self.slots_dir / slot)

    def _parse(self, raw: bytes) -> tuple[SlotRecord | None, SlotRecord | None]:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _CorruptStateError(f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise _CorruptStateError("not a JSON object")
        return self._record(data.get("active")), self._record(data.get("previous"))

    def _read(self) -> tuple[SlotRecord | None, SlotRecord | None]:
        try:
            raw = self._current.read_bytes()
        except FileNotFoundError:
            return None, None
        try:
            return self._parse(raw)
        except _CorruptStateError as exc:
            problem = str(exc)
        aside = self._current.with_name(CURRENT_NAME + ".corrupt")
        log.error(
            "%s is corrupt (%s); moved to %s, starting with no active model",
            self._current,
            problem,
            aside.name,
        )
        os.replace(self._current, aside)
        fsync_dir(self.state_dir)
        return None, None

    def _write(self, active: SlotRecord | None, previous: SlotRecord | None) -> None:
        body = json.dumps(
            {
                "active": None if active is None else active.to_dict(),
                "previous": None if previous is None else previous.to_dict(),
            },
            indent=2,
            sort_keys=True,
        ).encode()
        atomic_write(self._current, body)

    def activate(self, record: SlotRecord) -> None:
        """Make ``record`` the active slot; the old active one becomes previous.

        Activating the already active slot keeps the previous one; activating
        the previous slot (a rollback) swaps the two.

        Raises:
            SlotError: the record's slot does not exist in this store.
        """
        path = self.slot_path(record.slot)
        if path.is_symlink() or not path.is_dir():
            raise SlotError(f"slot {record.slot!r} is not installed in {self.slots_dir}")
        record = SlotRecord(record.slot, record.model, record.bundle_sha256, path)
        with self._lock:
            active, previous = self._read()
            if active is not None and active.slot != record.slot:
                previous = active
            if previous is not None and previous.slot == record.slot:
                previous = None
            self._write(record, previous)
            log.info("activated slot %s (%s)", record.slot, record.model.label)

    def deactivate(self) -> None:
        """Record that no model is active (desired state "no model"); active becomes previous."""
        with self._lock:
            active, previous = self._read()
            self._write(None, active if active is not None else previous)

    def active(self) -> SlotRecord | None:
        """The slot to serve, or None (none installed, or current.json was corrupt)."""
        with self._lock:
            return self._read()[0]

    def previous(self) -> SlotRecord | None:
        """The slot that was active before the current one, kept for rollback."""
        with self._lock:
            return self._read()[1]

    def find(self, bundle_sha256: str) -> SlotRecord | None:
        """The installed active or previous slot holding this bundle, if its directory exists."""
        with self._lock:
            for record in self._read():
                if (
                    record is not None
                    and record.bundle_sha256 == bundle_sha256
                    and not record.path.is_symlink()
                    and record.path.is_dir()
                ):
                    return record
        return None

    def gc(self) -> list[str]:
        """Delete every slot that is neither active nor previous, and stale temporaries.

        Returns:
            The names of the removed directory entries, sorted.
        """
        removed: list[str] = []
        with self._lock:
            keep = {r.slot for r in self._read() if r is not None}
            for entry in sorted(self.slots_dir.iterdir()):
                if entry.name in keep or entry in self._live_staging:
                    continue
                try:
                    _remove(entry)
                except OSError as exc:
                    log.warning("cannot remove %s: %s", entry, exc)
                    continue
                removed.append(entry.name)
        if removed:
            log.info("removed %d unused slot entries: %s", len(removed), ", ".join(removed))
        return removed
