"""The install pipeline: verify through TUF, unpack, load, smoke-test, switch, report.

Order matters, and each step can only make things safer:

1. **Verify.** A fresh ``tuf.ngclient.Updater`` refreshes root -> timestamp ->
   snapshot -> targets over MQTT and looks the desired target up. It runs in
   a child process that exits with the install (:mod:`edgefleet.agent.verifier`),
   so the serving agent never carries python-tuf and cryptography. Its signed
   ``custom`` field must name the model, version and release the controller
   asked for, a hardware class this device is (or ``generic``), a runtime it
   has, and a release no older than the newest this device ever ran
   (``releases.json``, the per-model high-water mark, written durably before
   every activation). A kept slot holding the same bytes is reused only after
   its files are re-hashed (a corrupt one is discarded). Otherwise the free
   space of the state directory is checked against the signed length, and
   only then is the bundle downloaded, and TUF checks its length and hashes.
2. **Unpack** into a new staging slot (never over a live one), sealed with
   the hashes of its files when it is committed.
3. **Load** the model with the bundle's runtime.
4. **Smoke test** the sample input carried in the bundle.
5. **Switch** ``current.json`` atomically (the previous slot is kept, so a
   rollback needs no download), then hand the loaded model to the server.

Any exception before step 5 leaves the previous model serving. A full disk is
an :class:`~edgefleet.protocols.errors.InsufficientSpaceError` (refused up
front from the signed length, or on ENOSPC with the partial download and
staging removed), which the reconcile loop retries, so a device recovers once
space is freed or a smaller bundle is deployed. TUF's
exceptions are translated to :mod:`edgefleet.protocols.errors`, one per attack,
so the controller sees *why* an update was refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.fetcher import MqttFetcher
from edgefleet.agent.serving import ModelHolder
from edgefleet.agent.slots import SlotRecord, SlotStore
from edgefleet.agent.unpack import smoke_test, unpack_bundle
from edgefleet.agent.verifier import Verifier, translate_tuf_error
from edgefleet.protocols.bundle import BundleManifest, TargetCustom
from edgefleet.protocols.errors import (
    AgentError,
    BundleFormatError,
    ConfigError,
    InsufficientSpaceError,
    MessageError,
    ReleaseRollbackError,
    UnknownTargetError,
    UnsupportedRuntimeError,
    UntrustedMetadataError,
    VerificationError,
    WrongHardwareError,
)
from edgefleet.protocols.messages import HardwareInfo, ModelRef
from edgefleet.shared.durable import atomic_write, is_disk_full
from edgefleet.shared.runtime import LoadedModel, get_backend

__all__ = ["InstallOutcome", "Installer", "space_needed", "translate_tuf_error"]

log = logging.getLogger(__name__)

GENERIC_CLASS = "generic"
# Filesystem blocks, directory entries, the partial download's block log, the
# slot's seal: small, but a download sized to the last byte would still fail.
_SPACE_MARGIN_BYTES = 1024 * 1024


def space_needed(length: int, resumed: int = 0, unpacked: int = 0) -> int:
    """Free bytes the state directory needs to install a bundle of signed ``length``.

    The download fills the partial file (less what a resumed download already
    holds), then TUF copies the verified bytes to ``downloads/``: two copies at
    the peak. The partial file is deleted before unpacking. A plain tar
    unpacks into a slot no larger than the copy it replaces. A compressed
    bundle (``unpacked``: its signed decompressed length) is first
    decompressed next to the download and then extracted, so that peak is the
    download plus twice ``unpacked``. A 1/64 share of the larger size and
    :data:`_SPACE_MARGIN_BYTES` cover filesystem overhead. (python-tuf also
    buffers the download in an anonymous temporary file in the *system* temp
    directory; that is not the state directory's space and is not counted.)
    """
    resumed = min(max(resumed, 0), length)
    unpacked = max(unpacked, 0)
    peak = max(2 * length - resumed, length + 2 * unpacked)
    return peak + max(length, unpacked) // 64 + _SPACE_MARGIN_BYTES



@dataclass(frozen=True)
class InstallOutcome:
    """What an install did: the slot now active and whether it was downloaded."""

    record: SlotRecord
    downloaded: bool


Notify = Callable[[str, ModelRef], None]
"""``notify(stage, model)`` with stage in ``verified``, ``downloading``."""

CorruptSlot = Callable[[SlotRecord, str], None]
"""``on_corrupt_slot(record, problem)``: a kept slot failed its re-hash and was discarded."""


class Installer:
    """Runs the install pipeline for one device's state directory."""

    def __init__(
        self,
        state_dir: Path,
        fetcher: MqttFetcher,
        slots: SlotStore,
        holder: ModelHolder,
        hardware: HardwareInfo,
        *,
        runtime_threads: int = 1,
        notify: Notify | None = None,
        on_corrupt_slot: CorruptSlot | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.metadata_dir = state_dir / "tuf" / "metadata"
        self.download_dir = state_dir / "downloads"
        self._releases_path = state_dir / "releases.json"
        self.fetcher = fetcher
        self.slots = slots
        self.holder = holder
        self.hardware = hardware
        self.runtime_threads = runtime_threads
        self._notify = notify or (lambda _stage, _model: None)
        self._on_corrupt_slot = on_corrupt_slot

    # ------------------------------------------------------------------ trust bootstrap
    def bootstrap_trust(self, trust_root: Path | None) -> None:
        """Install the enrollment root once; afterwards TUF's own chain of trust rules.

        Raises:
            ConfigError: there is no trusted root yet and none was configured.
        """
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        if (self.metadata_dir / "root.json").exists():
            return
        if trust_root is None:
            raise ConfigError(
                "no trusted TUF root: set trust_root to the root.json from enrollment"
            )
        try:
            data = trust_root.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read trust_root {trust_root}: {exc.strerror}") from None
        atomic_write(self.metadata_dir / "root.json", data)

    # ------------------------------------------------------------------ startup
    def restore(self) -> ModelRef | None:
        """Load the active slot's model at startup; fall back to the previous slot.

        Each slot is re-hashed first; a corrupt one is discarded (and reported
        to ``on_corrupt_slot``), so it can never be reused later. The model
        now serving is recorded in the release high-water mark, which heals a
        mark lost between a slot switch and its write by an older agent.

        Returns the model now serving, or None.
        """
        active = self.slots.active()
        for record in (active, self.slots.previous()):
            if record is None:
                continue
            problem = self.slots.verify(record)
            if problem is not None:
                log.error("installed slot %s is corrupt: %s; discarding it", record.slot, problem)
                self.slots.drop(record)
                self._report_corrupt(record, problem)
                continue
            try:
                manifest = self._read_manifest(record.path)
                model = self._load(record.path, manifest)
            except AgentError as exc:
                log.error("cannot load installed slot %s: %s", record.slot, exc)  # noqa: TRY400
                continue
            try:
                self._raise_release_mark(record.model)
            except OSError as exc:  # a full disk must not stop a restart from serving
                log.error("cannot record the release mark of %s: %s", record.model.label, exc)  # noqa: TRY400
            self.holder.swap(model, record.model)
            if record is not active:
                log.warning("active slot unusable; fell back to previous slot %s", record.slot)
                self.slots.activate(record)
            return record.model
        return None

    def _report_corrupt(self, record: SlotRecord, problem: str) -> None:
        if self._on_corrupt_slot is None:
            return
        try:
            self._on_corrupt_slot(record, problem)
        except Exception:  # reporting must never stop the agent from healing
            log.exception("reporting corrupt slot %s failed", record.slot)

    # ------------------------------------------------------------------ install
    def install(self, want: ModelRef) -> InstallOutcome:
        """Verify, fetch, unpack, load, smoke-test and activate ``want``.

        Raises:
            VerificationError, TransferError, InstallError: the update was
                refused; the previous model keeps serving.
        """
        # TUF runs in a child process that exits with this install (verifier.py).
        verifier = Verifier(self.fetcher, self.metadata_dir, self.download_dir)
        try:
            info = verifier.target_info(want.target)
            if info is None:
                raise UnknownTargetError(f"{want.target} is not in the signed targets metadata")
            custom = self._check_custom(want, info.custom)
            self._notify("verified", want)
            sha256 = info.hashes.get("sha256")
            if not sha256:
                raise UntrustedMetadataError(f"{want.target} has no sha256 in targets metadata")
            existing = self.slots.find(sha256, on_corrupt=self._report_corrupt)
            if existing is None:
                unpacked = custom.compression.decompressed_length if custom.compression else 0
                bundle_path = self._download(
                    verifier, want, info.prefixed_path, info.length, sha256, unpacked
                )
        finally:
            verifier.close()
        if existing is not None:
            # Same signed bytes are already unpacked in a kept slot: a rollback
            # (or a repeat) costs no download.
            record = SlotRecord(existing.slot, want, sha256, existing.path)
            manifest = self._read_manifest(existing.path)
            model = self._load(existing.path, manifest)
            smoke_test(model, existing.path, manifest)
            self._activate(record, model)
            return InstallOutcome(record, downloaded=False)

        name = self.slots.slot_name(want, sha256)
        staging = self.slots.staging(name)
        try:
            manifest = unpack_bundle(bundle_path, staging, compression=custom.compression)
            self._check_manifest(manifest, custom)
            model = self._load(staging, manifest)
            smoke_test(model, staging, manifest)
            slot_path = self.slots.commit(staging, name, bundle_sha256=sha256)
        except OSError as exc:
            self.slots.discard(staging)
            if is_disk_full(exc):
                raise self._disk_full(want, exc) from exc
            raise
        except BaseException:
            self.slots.discard(staging)
            raise
        finally:
            bundle_path.unlink(missing_ok=True)
        record = SlotRecord(name, want, sha256, slot_path)
        self._activate(record, model)
        return InstallOutcome(record, downloaded=True)

    def _download(
        self,
        verifier: Verifier,
        want: ModelRef,
        prefixed_path: str,
        length: int,
        sha256: str,
        unpacked: int = 0,
    ) -> Path:
        """Download the bundle through the verifier (TUF checks length and hashes)."""
        # ngclient puts the hash in front of the file name, not the whole path.
        repo_path = "targets/" + prefixed_path
        bundle_path = self.download_dir / f"{sha256}.bundle"
        self._ensure_space(want, repo_path, length, bundle_path, unpacked)
        self.fetcher.expect_length(repo_path, length)
        self.download_dir.mkdir(parents=True, exist_ok=True)
        self._notify("downloading", want)
        try:
            verifier.download(bundle_path)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self.fetcher.discard(repo_path)
            bundle_path.unlink(missing_ok=True)
            raise self._disk_full(want, exc) from exc
        except (VerificationError, InsufficientSpaceError):
            # Bytes we hold are provably wrong (or were dropped on a full
            # disk); never resume from them. (OversizedTransferError is a
            # VerificationError.)
            self.fetcher.discard(repo_path)
            bundle_path.unlink(missing_ok=True)
            raise
        self.fetcher.discard(repo_path)
        return bundle_path

    # ------------------------------------------------------------------ disk space
    def _free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the state directory's filesystem."""
        st = os.statvfs(self.state_dir)
        return st.f_bavail * st.f_frsize

    def _ensure_space(
        self, want: ModelRef, repo_path: str, length: int, keep: Path, unpacked: int = 0
    ) -> None:
        """Refuse a download the state directory cannot hold, before its first byte.

        When space is short, leftovers that no install can use any more go
        first: partial downloads of other targets (an earlier, abandoned
        deploy), stale files in ``downloads/``, and stale staging and trash
        directories in ``slots/``. Blocks of *this* target already on disk
        count as downloaded, so a resumed download needs less.

        Raises:
            InsufficientSpaceError: still not enough space after that.
        """
        need = space_needed(length, self.fetcher.resumable_bytes(repo_path), unpacked)
        free = self._free_bytes()
        if free >= need:
            return
        reclaimed = self.fetcher.discard_others(repo_path)
        if self.download_dir.is_dir():
            for leftover in self.download_dir.iterdir():
                if leftover != keep and not leftover.is_symlink() and leftover.is_file():
                    leftover.unlink(missing_ok=True)
                    reclaimed.append(f"downloads/{leftover.name}")
        reclaimed += self.slots.gc()
        if reclaimed:
            log.info("reclaimed disk space: removed %s", ", ".join(reclaimed))
        need = space_needed(length, self.fetcher.resumable_bytes(repo_path), unpacked)
        free = self._free_bytes()
        if free < need:
            raise InsufficientSpaceError(
                f"{want.label} is {length} bytes and needs {need} bytes free in "
                f"{self.state_dir}; only {free} are available"
            )

    def _disk_full(self, want: ModelRef, exc: BaseException) -> InsufficientSpaceError:
        return InsufficientSpaceError(
            f"the disk of {self.state_dir} filled up while installing {want.label} "
            f"({exc}); its partial files were removed"
        )

    # ------------------------------------------------------------------ checks
    def _check_custom(self, want: ModelRef, raw: object) -> TargetCustom:
        try:
            custom = TargetCustom.from_dict(raw)  # type: ignore[arg-type]
        except MessageError as exc:
            raise UntrustedMetadataError(
                f"{want.target}: bad signed custom metadata: {exc}"
            ) from exc
        if (custom.model, custom.version, custom.release) != (
            want.name,
            want.version,
            want.release,
        ):
            raise UntrustedMetadataError(
                f"{want.target} is signed as {custom.model}@{custom.version} release "
                f"{custom.release}, but {want.label} release {want.release} was requested"
            )
        # Signed CPU requirements decide where present (an operator's class
        # label cannot make arm64 code run on x86); otherwise the class must match.
        fits = custom.runs_on(self.hardware.arch, self.hardware.cpu_features)
        if fits is False:
            raise WrongHardwareError(
                f"{want.target} needs {custom.requires_arch} with "
                f"{', '.join(custom.requires_features) or 'no special features'}; this device "
                f"is {self.hardware.arch} with {', '.join(self.hardware.cpu_features) or 'none'}"
            )
        if fits is None and custom.hardware_class not in (
            self.hardware.hardware_class,
            GENERIC_CLASS,
        ):
            raise WrongHardwareError(
                f"{want.target} is built for hardware class {custom.hardware_class!r}; "
                f"this device is {self.hardware.hardware_class!r}"
            )
        if custom.runtime not in self.hardware.runtimes:
            raise UnsupportedRuntimeError(
                f"{want.target} needs runtime {custom.runtime!r}; this device has "
                f"{', '.join(self.hardware.runtimes) or 'none'}"
            )
        newest = self._releases().get(want.name, 0)
        if custom.release < newest:
            raise ReleaseRollbackError(
                f"{want.label} is release {custom.release}, older than release {newest} "
                "this device already ran; the controller must publish a new release to go back"
            )
        return custom

    @staticmethod
    def _check_manifest(manifest: BundleManifest, custom: TargetCustom) -> None:
        """The manifest inside the bundle must say what the signed custom says.

        One exception: a *re-issue* (the controller rolling devices back to an
        older bundle under a new, higher release, because agents refuse
        releases below their high-water mark) carries the original bytes, so
        its manifest names the original release. That is accepted only when
        the signed custom says so itself: ``reissue_of`` equal to the
        manifest's release, and that release lower than the signed one.
        """
        release = custom.release
        reissue_of = custom.extra.get("reissue_of")
        if (
            isinstance(reissue_of, int)
            and not isinstance(reissue_of, bool)
            and reissue_of == manifest.release
            and manifest.release < custom.release
        ):
            release = manifest.release
        signed = (
            custom.model,
            custom.version,
            release,
            custom.runtime,
            custom.precision,
            custom.hardware_class,
        )
        inside = (
            manifest.model,
            manifest.version,
            manifest.release,
            manifest.runtime,
            manifest.precision,
            manifest.hardware_class,
        )
        if signed != inside:
            raise BundleFormatError(
                f"bundle manifest {inside} disagrees with its signed metadata {signed}"
            )

    def _read_manifest(self, slot_dir: Path) -> BundleManifest:
        try:
            return BundleManifest.decode((slot_dir / "manifest.json").read_bytes())
        except (OSError, MessageError) as exc:
            raise BundleFormatError(f"slot {slot_dir.name} has no usable manifest: {exc}") from exc

    def _load(self, slot_dir: Path, manifest: BundleManifest) -> LoadedModel:
        backend = get_backend(manifest.runtime, threads=self.runtime_threads)
        return backend.load(slot_dir / manifest.model_file)

    def _activate(self, record: SlotRecord, model: LoadedModel) -> None:
        # The mark goes first: a crash after it but before the switch leaves a
        # mark at most equal to a release that was about to run (which the
        # guard still accepts), never a model running above its mark.
        try:
            self._raise_release_mark(record.model)
        except OSError as exc:
            # No switch without a durable mark: refuse (and retry) instead.
            if is_disk_full(exc):
                raise self._disk_full(record.model, exc) from exc
            raise
        self.slots.activate(record)
        self.holder.swap(model, record.model)
        removed = self.slots.gc()
        if removed:
            log.info("removed old slots: %s", ", ".join(removed))

    def _raise_release_mark(self, model: ModelRef) -> None:
        """Record ``model``'s release in ``releases.json`` if it is above the stored mark.

        Compared with what the *file* holds (not with the kept slots, which
        already count the slot being activated), so the mark really is written
        the first time a model runs, and it outlives both kept slots.
        """
        stored = self._stored_releases()
        merged = self._with_kept_slots(stored or {})
        if merged.get(model.name, 0) < model.release:
            merged[model.name] = model.release
        if stored is not None and merged == stored:
            return
        # The rollback guard trusts this file: atomic_write fsyncs the file and
        # its directory, so a power cut cannot bring back a lower mark.
        atomic_write(self._releases_path, json.dumps(merged, sort_keys=True).encode())

    def _stored_releases(self) -> dict[str, int] | None:
        """The marks ``releases.json`` holds; None when it is missing or unreadable."""
        try:
            raw = json.loads(self._releases_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("releases.json is corrupt; rebuilding it from installed slots")
            return None
        if not isinstance(raw, dict):
            log.warning("releases.json is not an object; rebuilding it from installed slots")
            return None
        return {
            k: v
            for k, v in raw.items()
            if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        }

    def _releases(self) -> dict[str, int]:
        """Highest release ever activated per model: the anti-rollback high-water mark."""
        return self._with_kept_slots(self._stored_releases() or {})

    def _with_kept_slots(self, marks: dict[str, int]) -> dict[str, int]:
        """``marks`` raised to the releases of the kept slots.

        That rebuilds a lost or corrupt ``releases.json`` as far as the disk
        still knows, and covers a slot switched to before its mark was written.
        """
        out = dict(marks)
        for record in (self.slots.active(), self.slots.previous()):
            if record is not None:
                out[record.model.name] = max(out.get(record.model.name, 0), record.model.release)
        return out
