"""The controller's TUF repository: signing keys, signed metadata and target files.

Agents trust nothing the controller sends them unless TUF metadata signed by
keys rooted in the ``root.json`` they were enrolled with vouches for it. The
agent runs python-tuf's ``ngclient`` against the files in this directory
(served over MQTT by ``controller/transfer.py``), so the layout is exactly what
``ngclient`` asks for when ``consistent_snapshot`` is on::

    keys/<role>.key                   PKCS#8 PEM Ed25519 private keys (0600, dir 0700)
    metadata/<N>.root.json            every root version: clients walk N+1, N+2, ...
    metadata/<N>.targets.json         every targets version
    metadata/<N>.snapshot.json        every snapshot version
    metadata/timestamp.json           the only unversioned file
    targets/<dir>/<sha256>.<basename> bundle bytes, named by content hash

Crash safety: every file is written atomically (temporary file in the same
directory, fsync, rename, fsync of the directory) and a publish writes targets,
then snapshot, then ``timestamp.json``. ``timestamp.json`` is therefore the
commit point: the current state is whatever its chain
(timestamp -> snapshot version -> targets version) names, so a crash part-way
leaves only unreferenced files behind, never a view that fails to verify.
Older versions are kept because a client part-way through an update may still
ask for them.

Concurrency: the CLI may publish while the service refreshes the timestamp,
so every change takes an exclusive ``flock`` on ``<root>/.lock`` and re-reads
the state from disk before bumping versions. Two writers can then never sign
two different files with the same version number.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from edgefleet.controller.ca import read_private_file
from edgefleet.controller.errors import TrustError
from edgefleet.protocols.bundle import TargetCustom
from edgefleet.shared.durable import atomic_write, ensure_dir, file_lock, fsync_dir

__all__ = ["ROLES", "Expiry", "PublishedTarget", "TrustRepository"]

ROLES = ("root", "targets", "snapshot", "timestamp")
"""The top-level TUF roles; each has one key file ``keys/<role>.key``."""

_PUBLISHED_ROLES = ("targets", "snapshot", "timestamp")
_SERVED_DIRS = ("metadata", "targets")
_ROOT_FILE = re.compile(r"^([1-9][0-9]*)\.root\.json$")
# ngclient puts target paths into URLs without quoting, and the agent maps them
# to file names: keep them to characters that are safe in both, and refuse
# segments starting with "." so "..", "." and hidden names cannot appear.
_TARGET_SEGMENT = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}$")
_MAX_TARGET_PATH = 512
_SERIALIZER = JSONSerializer(compact=False)
_T = TypeVar("_T", Root, Targets, Snapshot, Timestamp)
# Everything that loading unreadable or inconsistent metadata can raise: tuf's
# DeserializationError and UnsignedMetadataError are RepositoryErrors; the
# Metadata constructors raise ValueError/KeyError/TypeError on bad fields.
_LOAD_ERRORS = (OSError, RepositoryError, ValueError, KeyError, TypeError)


@dataclass(frozen=True)
class Expiry:
    """How long freshly signed metadata of each role stays valid.

    The timestamp is short-lived on purpose: it bounds how long an attacker
    who replays old metadata (a freeze attack) can keep agents on stale
    bundles, at the cost of re-signing it every day.
    """

    root_days: int = 365
    targets_days: int = 90
    snapshot_days: int = 7
    timestamp_days: int = 1

    def __post_init__(self) -> None:
        for role, days in self._by_role().items():
            if days < 1:
                raise TrustError(f"{role} metadata must stay valid at least 1 day, got {days}")

    def _by_role(self) -> dict[str, int]:
        return {
            "root": self.root_days,
            "targets": self.targets_days,
            "snapshot": self.snapshot_days,
            "timestamp": self.timestamp_days,
        }

    def lifetime(self, role: str) -> timedelta:
        """The validity period of newly signed ``role`` metadata."""
        return timedelta(days=self._by_role()[role])


@dataclass(frozen=True)
class PublishedTarget:
    """A target file now listed in signed targets metadata.

    ``path`` is the TUF target path the agent asks ``get_targetinfo`` for;
    ``repo_path`` is where the bytes live relative to the repository root
    (and what the agent's fetcher will request): the basename carries the
    sha256 prefix because consistent snapshots are on.
    """

    path: str
    length: int
    sha256: str
    repo_path: str


@dataclass
class _State:
    """The four current top-level metadata, as the timestamp chain names them."""

    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]


class TrustRepository:
    """A TUF repository on local disk that the controller signs and serves.

    Create one with :meth:`init`, :meth:`open` or :meth:`open_or_init`; the
    constructor is internal. The object holds only the directory, the expiry
    policy and the loaded signing keys: metadata is re-read from disk for
    every operation, so several processes can share one repository.
    """

    def __init__(
        self,
        root: Path,
        *,
        expiry: Expiry,
        signers: Mapping[str, list[Signer]],
        root_version: int = 1,
    ) -> None:
        self._root = root
        self._expiry = expiry
        self._signers = dict(signers)
        # The root version the signers were loaded for: another process may
        # rotate keys, and this object must then sign with the new ones.
        self._root_version = root_version

    @property
    def root(self) -> Path:
        """The repository directory."""
        return self._root

    # -- creating and opening -------------------------------------------------

    @classmethod
    def init(cls, root: Path, *, expiry: Expiry = Expiry()) -> TrustRepository:
        """Create a repository: new keys and version-1 metadata for every role.

        Args:
            root: Directory to create the repository in; may exist if empty of
                ``keys/`` and ``metadata/``.
            expiry: Validity periods for the metadata signed now and later.

        Raises:
            TrustError: The directory already holds a repository (or the
                remains of an interrupted init, which must be removed by hand),
                or it cannot be written.
        """
        root = Path(root)
        keys_dir = root / "keys"
        if (root / "metadata").exists():
            raise TrustError(f"{root} already holds a TUF repository")
        try:
            root.mkdir(parents=True, exist_ok=True)
            # Creating keys/ is the atomic claim on the directory: a second
            # concurrent init fails here instead of mixing two key sets.
            keys_dir.mkdir(mode=0o700)
            os.chmod(keys_dir, 0o700)
            (root / "metadata").mkdir()
            (root / "targets").mkdir(exist_ok=True)
        except FileExistsError:
            raise TrustError(
                f"{root} already holds TUF keys; open it, or remove {keys_dir} if an "
                "earlier init was interrupted"
            ) from None
        except OSError as exc:
            raise TrustError(f"cannot create a TUF repository in {root}: {exc}") from exc

        generated = {role: CryptoSigner.generate_ed25519() for role in ROLES}
        for role, signer in generated.items():
            _atomic_write(keys_dir / f"{role}.key", signer.private_bytes, mode=0o600)

        repo = cls(root, expiry=expiry, signers={r: [s] for r, s in generated.items()})
        now = _now()
        root_md = Metadata(Root(expires=now + expiry.lifetime("root"), consistent_snapshot=True))
        for role, signer in generated.items():
            root_md.signed.add_key(signer.public_key, role)
        repo._sign_and_store(root_md)
        targets_md = Metadata(Targets(expires=now + expiry.lifetime("targets")))
        targets_raw = repo._sign_and_store(targets_md)
        snapshot_md = Metadata(
            Snapshot(
                expires=now + expiry.lifetime("snapshot"),
                meta={"targets.json": _meta_file(1, targets_raw)},
            )
        )
        snapshot_raw = repo._sign_and_store(snapshot_md)
        timestamp_md = Metadata(
            Timestamp(
                expires=now + expiry.lifetime("timestamp"),
                snapshot_meta=_meta_file(1, snapshot_raw),
            )
        )
        repo._sign_and_store(timestamp_md)
        return repo

    @classmethod
    def open(cls, root: Path, *, expiry: Expiry = Expiry()) -> TrustRepository:
        """Open an existing repository and load its signing keys.

        Args:
            root: The repository directory.
            expiry: Validity periods for metadata signed from now on (the
                files do not record the policy they were signed under).

        Raises:
            KeyPermissionError: A key file is readable or writable by group or
                others.
            TrustError: The repository is missing, its metadata does not
                verify, or a key file is unreadable or not the key root names.
        """
        root = Path(root)
        if not (root / "metadata" / "timestamp.json").is_file():
            raise TrustError(f"{root} is not a TUF repository (no metadata/timestamp.json)")
        state = _load_state(root)
        signers = _load_signers(root, state.root.signed)
        return cls(root, expiry=expiry, signers=signers, root_version=state.root.signed.version)

    @classmethod
    def open_or_init(cls, root: Path, *, expiry: Expiry = Expiry()) -> TrustRepository:
        """Open the repository in ``root``, creating it first if there is none."""
        root = Path(root)
        if (root / "metadata").exists() or (root / "keys").exists():
            return cls.open(root, expiry=expiry)
        return cls.init(root, expiry=expiry)

    # -- publishing -----------------------------------------------------------

    def add_target(self, path: str, data: bytes, custom: TargetCustom) -> PublishedTarget:
        """Store ``data`` as target ``path`` and publish signed metadata for it.

        Re-adding an existing path replaces its entry (the old bytes stay on
        disk for clients still working from older metadata).

        Args:
            path: TUF target path such as ``"demo-mlp/1.0/generic-fp32.bundle"``:
                "/"-separated segments of letters, digits and ``._+-``, none
                starting with ".".
            data: The bundle bytes.
            custom: The signed facts agents check before downloading.

        Raises:
            TrustError: ``path`` is not a valid target path, or the repository
                cannot be written or signed.
        """
        _check_target_path(path)
        sha256 = hashlib.sha256(data).hexdigest()
        dirname, sep, basename = path.rpartition("/")
        repo_path = f"targets/{dirname}{sep}{sha256}.{basename}"
        file_path = self._root / repo_path
        if not (file_path.is_file() and _sha256_file(file_path) == sha256):
            _atomic_write(file_path, data, mode=0o644)
        target = TargetFile(
            length=len(data),
            hashes={"sha256": sha256},
            path=path,
            unrecognized_fields={"custom": custom.to_dict()},
        )

        def add(targets: Targets) -> None:
            targets.targets[path] = target

        with self._locked() as state:
            self._publish(state, edit=add)
        return PublishedTarget(path=path, length=len(data), sha256=sha256, repo_path=repo_path)

    def get_target(self, path: str) -> TargetFile | None:
        """The currently published entry for target ``path``, if any."""
        return _load_state(self._root).targets.signed.targets.get(path)

    def publish(self, *, expires_override: Mapping[str, datetime] | None = None) -> None:
        """Bump and re-sign targets, snapshot and timestamp.

        Args:
            expires_override: Role name -> expiry for this signing instead of
                now + the policy's lifetime. It exists so tests can publish
                already-expired metadata and watch clients refuse it.

        Raises:
            TrustError: An override names a role other than targets, snapshot
                or timestamp, or the repository cannot be written.
        """
        overrides = dict(expires_override or {})
        unknown = set(overrides) - set(_PUBLISHED_ROLES)
        if unknown:
            raise TrustError(
                f"cannot override expiry of {sorted(unknown)}; publish signs only "
                f"{', '.join(_PUBLISHED_ROLES)}"
            )
        with self._locked() as state:
            self._publish(state, expires=overrides)

    def refresh_timestamp(self, *, within: timedelta = timedelta(hours=6)) -> bool:
        """Re-sign metadata that would expire within ``within``; say whether it did.

        The service calls this periodically so agents never see expired
        metadata while nothing is being published. Usually only the timestamp
        needs a new version; if the snapshot or targets metadata would also
        expire within ``within``, a fresh timestamp could not save them, so
        all three are re-signed as by :meth:`publish`.

        Raises:
            TrustError: The repository cannot be written.
        """
        with self._locked() as state:
            deadline = _now() + within
            if min(state.targets.signed.expires, state.snapshot.signed.expires) <= deadline:
                self._publish(state)
                return True
            if state.timestamp.signed.expires > deadline:
                return False
            self._bump(state.timestamp)
            return True

    # -- keys -----------------------------------------------------------------

    @property
    def root_key_online(self) -> bool:
        """Whether the root key is in ``keys/`` (else it is kept offline)."""
        return (self._root / "keys" / "root.key").exists()

    def rotate_key(self, role: str, *, root_key: Path | None = None) -> str:
        """Replace the key of ``role`` (targets, snapshot or timestamp); return the new key id.

        A new root version names the new key and is signed with the root key;
        agents fetch it through TUF's root chain on their next refresh and
        trust only the new key from then on, so no device needs a visit.
        Targets, snapshot and timestamp are re-signed with the new keys.

        Args:
            role: The role whose key to replace.
            root_key: The root private key file, when it is kept offline.

        Raises:
            TrustError: unknown role, or the root key is offline and not given.
        """
        if role not in _PUBLISHED_ROLES:
            raise TrustError(f"can rotate {', '.join(_PUBLISHED_ROLES)} keys; not {role!r}")
        new = CryptoSigner.generate_ed25519()
        key_path = self._root / "keys" / f"{role}.key"
        with self._locked() as state:
            root_signers = self._root_signers(root_key, state.root.signed)
            _atomic_write(key_path.with_suffix(".key.next"), new.private_bytes, mode=0o600)
            root = state.root.signed
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(new.public_key, role)
            self._new_root(state, root_signers)
            os.replace(key_path.with_suffix(".key.next"), key_path)
            fsync_dir(key_path.parent)
            self._signers[role] = [new]
            self._publish(state)
        return str(new.public_key.keyid)

    def renew_root(self, *, root_key: Path | None = None) -> int:
        """Sign a new root version with a fresh expiry; return its version.

        Raises:
            TrustError: the root key is offline and not given.
        """
        with self._locked() as state:
            self._new_root(state, self._root_signers(root_key, state.root.signed))
            return state.root.signed.version

    def take_root_key_offline(self, destination: Path) -> None:
        """Move the root private key out of the repository to ``destination``.

        From then on, root changes (key rotation, renewal) need the file
        passed back explicitly; day-to-day publishing does not use it.

        Raises:
            TrustError: the key is already offline or ``destination`` exists.
        """
        source = self._root / "keys" / "root.key"
        if not source.exists():
            raise TrustError("the root key is already offline")
        if destination.exists():
            raise TrustError(f"{destination} exists; refusing to overwrite a key file")
        _atomic_write(destination, read_private_file(source), mode=0o600)
        source.unlink()
        fsync_dir(source.parent)
        self._signers["root"] = []

    def _root_signers(self, root_key: Path | None, root: Root) -> list[Signer]:
        if root_key is not None:
            signer = _load_signer(root_key)
            if signer.public_key.keyid not in root.roles["root"].keyids:
                raise TrustError(f"{root_key} is not the root key of this repository")
            return [signer]
        if not self._signers.get("root"):
            raise TrustError("the root key is offline: pass the root key file (--root-key)")
        return list(self._signers["root"])

    def _new_root(self, state: _State, signers: list[Signer]) -> None:
        """Version, expire, sign (with ``signers``) and store the next root."""
        md = state.root
        md.signed.version += 1
        md.signed.expires = _now() + self._expiry.lifetime("root")
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        raw = md.to_bytes(_SERIALIZER)
        _atomic_write(self._root / "metadata" / f"{md.signed.version}.root.json", raw, mode=0o644)
        self._root_version = md.signed.version

    # -- serving --------------------------------------------------------------

    def root_bytes(self) -> bytes:
        """The newest root metadata, byte for byte: an agent's trust anchor.

        Raises:
            TrustError: There is no root metadata.
        """
        path = _newest_root(self._root)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise TrustError(f"cannot read {path}: {exc}") from exc

    def resolve(self, rel_path: str) -> Path | None:
        """The file a client may fetch as ``rel_path``, or ``None``.

        Only regular files under ``metadata/`` and ``targets/`` are served;
        ``keys/``, hidden and temporary files, absolute paths, ``..`` and
        symlinks that lead outside the served directory are refused.
        """
        if not rel_path or "\\" in rel_path or "\x00" in rel_path:
            return None
        parts = rel_path.split("/")
        if len(parts) < 2 or parts[0] not in _SERVED_DIRS:
            return None
        if any(not part or part.startswith(".") for part in parts):
            return None
        try:
            base = (self._root / parts[0]).resolve(strict=True)
            path = self._root.joinpath(*parts).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            return None
        if not path.is_relative_to(base) or not path.is_file():
            return None
        return path

    def read_file(self, rel_path: str) -> bytes | None:
        """The bytes of ``rel_path`` (see :meth:`resolve`), or ``None``."""
        path = self.resolve(rel_path)
        if path is None:
            return None
        try:
            with path.open("rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    return None
                return fh.read()
        except OSError:
            return None

    # -- internals: the only code that changes metadata ------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[_State]:
        """Hold the repository's write lock; yield the state as on disk now."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(file_lock(self._root / ".lock"))
            except OSError as exc:
                raise TrustError(f"cannot lock {self._root}: {exc}") from exc
            state = _load_state(self._root)
            if state.root.signed.version != self._root_version:
                self._signers = _load_signers(self._root, state.root.signed)
                self._root_version = state.root.signed.version
            yield state

    def _publish(
        self,
        state: _State,
        *,
        edit: Callable[[Targets], None] | None = None,
        expires: Mapping[str, datetime] | None = None,
    ) -> None:
        """New versions of targets, snapshot and timestamp, each naming the one before."""
        expires = expires or {}
        if edit is not None:
            edit(state.targets.signed)
        targets_raw = self._bump(state.targets, expires.get("targets"))
        state.snapshot.signed.meta["targets.json"] = _meta_file(
            state.targets.signed.version, targets_raw
        )
        snapshot_raw = self._bump(state.snapshot, expires.get("snapshot"))
        state.timestamp.signed.snapshot_meta = _meta_file(
            state.snapshot.signed.version, snapshot_raw
        )
        self._bump(state.timestamp, expires.get("timestamp"))

    def _bump(self, md: Metadata[Any], expires: datetime | None = None) -> bytes:
        """Give ``md`` the next version and a fresh expiry; sign and store it."""
        role = md.signed.type
        md.signed.version += 1
        if expires is None:
            md.signed.expires = _now() + self._expiry.lifetime(role)
        else:
            md.signed.expires = expires.astimezone(timezone.utc)
        return self._sign_and_store(md)

    def _sign_and_store(self, md: Metadata[Any]) -> bytes:
        """Sign ``md`` with every key of its role, write it, return the bytes written."""
        role = md.signed.type
        md.signatures.clear()
        for signer in self._signers[role]:
            md.sign(signer, append=True)
        raw = md.to_bytes(_SERIALIZER)
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        _atomic_write(self._root / "metadata" / name, raw, mode=0o644)
        return raw


# -- loading -------------------------------------------------------------------


def _load_signers(root_dir: Path, root: Root) -> dict[str, list[Signer]]:
    """Load the private key of every role and check root lists it for that role.

    This is the one place that decides which keys sign which role: key
    rotation will extend it to several key files per role.
    """
    signers: dict[str, list[Signer]] = {}
    for role in ROLES:
        path = root_dir / "keys" / f"{role}.key"
        pending = path.with_suffix(".key.next")
        if pending.exists():
            # A rotation was interrupted after writing the new key: keep
            # whichever of the two keys the current root names.
            _finish_rotation(path, pending, root.roles[role].keyids)
        if role == "root" and not path.exists():
            signers[role] = []  # kept offline; root changes need --root-key
            continue
        pem = read_private_file(path)
        try:
            private_key = load_pem_private_key(pem, password=None)
            candidate = SSlibKey.from_crypto(private_key.public_key())
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise TrustError(f"{path} is not a usable private key: {exc}") from exc
        if candidate.keyid not in root.roles[role].keyids:
            raise TrustError(f"{path} is not a {role} key of the current root metadata")
        signers[role] = [CryptoSigner(private_key, candidate)]
    return signers


def _load_signer(path: Path) -> CryptoSigner:
    """A signer from a PEM private key file (owner-only permissions required)."""
    pem = read_private_file(path)
    try:
        private_key = load_pem_private_key(pem, password=None)
        return CryptoSigner(private_key, SSlibKey.from_crypto(private_key.public_key()))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise TrustError(f"{path} is not a usable private key: {exc}") from exc


def _finish_rotation(path: Path, pending: Path, keyids: list[str]) -> None:
    try:
        new = _load_signer(pending)
    except TrustError:
        pending.unlink(missing_ok=True)
        return
    if new.public_key.keyid in keyids:
        os.replace(pending, path)
        fsync_dir(path.parent)
    else:
        pending.unlink(missing_ok=True)


def _newest_root(root_dir: Path) -> Path:
    """The highest-numbered ``metadata/N.root.json``."""
    versions = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root_dir / "metadata"):
            match = _ROOT_FILE.match(entry.name)
            if match:
                versions.append(int(match.group(1)))
    if not versions:
        raise TrustError(f"{root_dir} has no root metadata")
    return root_dir / "metadata" / f"{max(versions)}.root.json"


def _load_state(root_dir: Path) -> _State:
    """Load the current metadata by following the chain from ``timestamp.json``.

    Each file is checked the way a client would check it (signatures by the
    root's keys, lengths and hashes named by the parent), so a corrupted or
    hand-edited repository is refused here rather than by every agent.
    """
    meta_dir = root_dir / "metadata"
    current = "root metadata"
    try:
        root_path = _newest_root(root_dir)
        current = root_path.name
        root = _parse(root_path.read_bytes(), Root)
        root.signed.verify_delegate("root", root.signed_bytes, root.signatures)

        current = "timestamp.json"
        timestamp = _parse((meta_dir / current).read_bytes(), Timestamp)

        snap_info = timestamp.signed.snapshot_meta
        current = f"{snap_info.version}.snapshot.json"
        snapshot_raw = (meta_dir / current).read_bytes()
        snap_info.verify_length_and_hashes(snapshot_raw)
        snapshot = _parse(snapshot_raw, Snapshot)

        targets_info = snapshot.signed.meta["targets.json"]
        current = f"{targets_info.version}.targets.json"
        targets_raw = (meta_dir / current).read_bytes()
        targets_info.verify_length_and_hashes(targets_raw)
        targets = _parse(targets_raw, Targets)

        for md in (timestamp, snapshot, targets):
            root.signed.verify_delegate(md.signed.type, md.signed_bytes, md.signatures)
    except _LOAD_ERRORS as exc:
        raise TrustError(f"TUF repository {root_dir}: {current} is unusable: {exc}") from exc
    return _State(root=root, targets=targets, snapshot=snapshot, timestamp=timestamp)


def _parse(raw: bytes, kind: type[_T]) -> Metadata[_T]:
    md: Metadata[_T] = Metadata.from_bytes(raw)
    if not isinstance(md.signed, kind):
        raise TypeError(f"expected {kind.type} metadata, got {md.signed.type}")
    return md


# -- small helpers ---------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _meta_file(version: int, raw: bytes) -> MetaFile:
    """A MetaFile pinning length and hash, so clients bound and check the download."""
    return MetaFile(version=version, length=len(raw), hashes={"sha256": _sha256(raw)})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_target_path(path: str) -> None:
    if len(path) > _MAX_TARGET_PATH or not all(
        _TARGET_SEGMENT.match(seg) for seg in path.split("/")
    ):
        raise TrustError(
            f"invalid target path {path!r}: use '/'-separated segments of letters, digits "
            "and '._+-' that do not start with '.'"
        )


def _atomic_write(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data`` (see :func:`~edgefleet.shared.durable.atomic_write`).

    Missing parent directories are created durably first.

    Raises:
        TrustError: The file cannot be written.
    """
    try:
        ensure_dir(path.parent)
        atomic_write(path, data, mode=mode)
    except OSError as exc:
        raise TrustError(f"cannot write {path}: {exc}") from exc
