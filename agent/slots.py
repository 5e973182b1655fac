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

A kept slot is never trusted by its name alone. :meth:`SlotStore.commit`
seals each slot: ``seal.json`` inside it records the bundle's SHA-256 (the
hash TUF verified) and the SHA-256 of every file unpacked from it.
:meth:`SlotStore.find` and the startup restore re-hash a slot against its seal
before reusing it (:meth:`SlotStore.verify`), and a slot that no longer
matches (a truncated model, a flipped bit, a missing or extra file) is
discarded (:meth:`SlotStore.drop`), so the agent downloads the bundle again
instead of failing to load the same damaged files forever. Slots unpacked by
an agent that did not seal yet are checked against the model hash in their
manifest, which the bundle signed.

A ``current.json`` that cannot be parsed is not fatal: it is moved aside as
``current.json.corrupt`` and the agent starts with no active model, after
which the controller's desired state makes it install one again.

A :class:`SlotStore` is meant to be driven by one install pipeline at a time;
its methods are thread-safe, but :meth:`SlotStore.gc` should not run while
another process installs into the same state directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.protocols.bundle import MANIFEST_NAME, BundleManifest
from edgefleet.protocols.errors import MessageError, SlotError
from edgefleet.protocols.messages import ModelRef
from edgefleet.shared.durable import atomic_write, fsync_dir

__all__ = ["CURRENT_NAME", "SEAL_NAME", "SlotRecord", "SlotStore"]

log = logging.getLogger(__name__)

CURRENT_NAME = "current.json"
SEAL_NAME = "seal.json"
_HASH_CHUNK = 1024 * 1024
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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _slot_files(directory: Path) -> dict[str, Path]:
    """The entries of a slot directory except its seal, by name."""
    return {p.name: p for p in directory.iterdir() if p.name != SEAL_NAME}


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

    def commit(self, staging: Path, name: str, *, bundle_sha256: str | None = None) -> Path:
        """Turn a fully unpacked staging directory into slot ``name``.

        With ``bundle_sha256`` (the install pipeline always passes it) the
        slot is sealed first: ``seal.json`` records that hash and the SHA-256
        of every file in the slot, written and fsynced before the rename, so
        :meth:`verify` can tell later whether the slot still holds exactly
        what was verified. An existing slot of the same name is moved aside
        and deleted first (re-installing the same bundle repairs a damaged
        slot). The rename of the staging directory is atomic and the slots
        directory is fsynced.

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
            if bundle_sha256 is not None:
                self._seal(staging, bundle_sha256)
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

    # ------------------------------------------------------------------ integrity
    @staticmethod
    def _seal(directory: Path, bundle_sha256: str) -> None:
        if not _SHA256.match(bundle_sha256):
            raise SlotError("bundle_sha256 must be 64 lowercase hex characters")
        files: dict[str, str] = {}
        for fname, path in sorted(_slot_files(directory).items()):
            if path.is_symlink() or not path.is_file():
                raise SlotError(f"slot entry {fname!r} is not a regular file")
            files[fname] = _sha256_file(path)
        body = {"bundle_sha256": bundle_sha256, "files": files}
        atomic_write(directory / SEAL_NAME, json.dumps(body, sort_keys=True).encode())

    def verify(self, record: SlotRecord) -> str | None:
        """Re-hash a slot's files against its seal. Returns what is wrong, or None.

        A sealed slot must hold exactly the sealed files, each with its sealed
        SHA-256, and the seal must name the record's bundle. A slot without a
        seal (unpacked by an older agent) must at least hold the model file
        its manifest names, with the manifest's (signed) SHA-256. This reads
        every byte of the slot: it runs before a kept slot is reused, not on
        every request.
        """
        path = self.slots_dir / record.slot
        if path.is_symlink() or not path.is_dir():
            return "its directory is missing"
        try:
            seal_raw = (path / SEAL_NAME).read_bytes()
        except FileNotFoundError:
            return self._verify_unsealed(path)
        except OSError as exc:
            return f"its seal cannot be read: {exc.strerror}"
        try:
            seal = json.loads(seal_raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return "its seal is not JSON"
        files = seal.get("files") if isinstance(seal, dict) else None
        if not isinstance(files, dict) or not files:
            return "its seal lists no files"
        if seal.get("bundle_sha256") != record.bundle_sha256:
            return "its seal names another bundle"
        try:
            present = _slot_files(path)
            if set(present) != set(files):
                missing = sorted(set(files) - set(present))
                extra = sorted(set(present) - set(files))
                return f"its files changed (missing {missing}, unexpected {extra})"
            for fname, want in sorted(files.items()):
                entry = present[fname]
                if entry.is_symlink() or not entry.is_file():
                    return f"{fname} is not a regular file"
                if _sha256_file(entry) != want:
                    return f"{fname} does not match its recorded SHA-256"
        except OSError as exc:
            return f"it cannot be read: {exc.strerror}"
        return None

    @staticmethod
    def _verify_unsealed(path: Path) -> str | None:
        try:
            manifest = BundleManifest.decode((path / MANIFEST_NAME).read_bytes())
            model = path / manifest.model_file
            if model.is_symlink() or not model.is_file():
                return f"{manifest.model_file} is missing"
            if _sha256_file(model) != manifest.model_sha256:
                return f"{manifest.model_file} does not match its manifest's SHA-256"
        except MessageError as exc:
            return f"its manifest is unusable: {exc}"
        except OSError as exc:
            return f"it cannot be read: {exc.strerror}"
        return None

    def drop(self, record: SlotRecord) -> None:
        """Discard a slot: forget it in ``current.json``, then delete its directory.

        ``current.json`` is rewritten first, so it never names a slot that is
        (partly) deleted; the other kept slot stays where it was.
        """
        path = self.slot_path(record.slot)
        with self._lock:
            active, previous = self._read()
            if active is not None and active.slot == record.slot:
                active = None
            if previous is not None and previous.slot == record.slot:
                previous = None
            self._write(active, previous)
            if path.exists() or path.is_symlink():
                trash = Path(
                    tempfile.mkdtemp(prefix=f"{_TRASH_PREFIX}{record.slot}-", dir=self.slots_dir)
                )
                os.replace(path, trash / "old")
                fsync_dir(self.slots_dir)
                _remove(trash)
        log.warning("discarded slot %s (%s)", record.slot, record.model.label)

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

    def find(
        self, bundle_sha256: str, *, on_corrupt: Callable[[SlotRecord, str], None] | None = None
    ) -> SlotRecord | None:
        """The kept active or previous slot holding this bundle, if it is intact.

        The slot's name only says which bundle it *should* hold: its files are
        re-hashed (:meth:`verify`) first. A slot that fails is discarded
        (:meth:`drop`) and reported to ``on_corrupt(record, problem)``, and
        None is returned, so the caller downloads the bundle again.
        """
        with self._lock:
            for record in self._read():
                if record is None or record.bundle_sha256 != bundle_sha256:
                    continue
                problem = self.verify(record)
                if problem is None:
                    return record
                log.error("kept slot %s is corrupt: %s; discarding it", record.slot, problem)
                self.drop(record)
                if on_corrupt is not None:
                    on_corrupt(record, problem)
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
