"""TrustRepository against the real python-tuf client (ngclient.Updater).

The client here fetches through ``TrustRepository.read_file``, the same
function the MQTT transfer serves from, so these tests pin both the on-disk
layout and the URLs ngclient asks for.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from edgefleet.controller.errors import KeyPermissionError, TrustError
from edgefleet.controller.trust import ROLES, Expiry, PublishedTarget, TrustRepository
from edgefleet.protocols.bundle import TargetCustom, TensorSpec

BASE = "edgefleet://repo/"
TARGET = "demo-mlp/1.0/generic-fp32.bundle"
PAYLOAD = b"bundle bytes \x00\x01\x02" * 100


class RepoFetcher(FetcherInterface):
    """Serve ``edgefleet://repo/<path>`` from the repository, like the MQTT transfer."""

    def __init__(self, repo: TrustRepository, overrides: dict[str, bytes] | None = None) -> None:
        self.repo = repo
        self.overrides = overrides or {}
        self.requests: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        assert url.startswith(BASE), url
        rel = url[len(BASE) :]
        self.requests.append(rel)
        data = self.overrides.get(rel, self.repo.read_file(rel))
        if data is None:
            raise exceptions.DownloadHTTPError(f"{rel} not found", 404)
        return iter([data])


def make_updater(
    repo: TrustRepository, client_dir: Path, fetcher: RepoFetcher | None = None
) -> tuple[Updater, RepoFetcher]:
    fetcher = fetcher or RepoFetcher(repo)
    (client_dir / "metadata").mkdir(parents=True, exist_ok=True)
    updater = Updater(
        metadata_dir=str(client_dir / "metadata"),
        metadata_base_url=BASE + "metadata/",
        target_dir=str(client_dir / "targets"),
        target_base_url=BASE + "targets/",
        fetcher=fetcher,
        bootstrap=repo.root_bytes(),
    )
    return updater, fetcher


def make_custom(**extra: object) -> TargetCustom:
    return TargetCustom(
        model="demo-mlp",
        version="1.0",
        release=3,
        runtime="onnxruntime",
        precision="fp32",
        hardware_class="generic",
        inputs=(TensorSpec("features", "float32", (None, 16)),),
        outputs=(TensorSpec("probabilities", "float32", (None, 4)),),
        extra=dict(extra),
    )


def timestamp_version(repo: TrustRepository) -> int:
    raw = repo.read_file("metadata/timestamp.json")
    assert raw is not None
    version: int = json.loads(raw)["signed"]["version"]
    return version


def signed_field(repo: TrustRepository, rel: str, field: str) -> object:
    raw = repo.read_file(rel)
    assert raw is not None
    return json.loads(raw)["signed"][field]


@pytest.fixture
def repo(tmp_path: Path) -> TrustRepository:
    return TrustRepository.init(tmp_path / "repo")


@pytest.fixture
def published(repo: TrustRepository) -> PublishedTarget:
    return repo.add_target(TARGET, PAYLOAD, make_custom(notes="kept"))


# -- the happy path ------------------------------------------------------------------


def test_published_target_downloads_and_verifies(
    repo: TrustRepository, published: PublishedTarget, tmp_path: Path
) -> None:
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    assert published == PublishedTarget(
        path=TARGET,
        length=len(PAYLOAD),
        sha256=sha,
        repo_path=f"targets/demo-mlp/1.0/{sha}.generic-fp32.bundle",
    )
    updater, fetcher = make_updater(repo, tmp_path / "client")
    updater.refresh()
    info = updater.get_targetinfo(TARGET)
    assert info is not None
    custom = TargetCustom.from_dict(info.custom)
    assert custom == make_custom()
    assert custom.extra == {"notes": "kept"}
    local = updater.download_target(info)
    assert Path(local).read_bytes() == PAYLOAD
    # init wrote v1 of everything, add_target v2 of targets/snapshot/timestamp.
    # With consistent snapshots ngclient asks for versioned names, probes the
    # next root version, and prefixes the target's basename with its hash.
    assert fetcher.requests == [
        "metadata/2.root.json",
        "metadata/timestamp.json",
        "metadata/2.snapshot.json",
        "metadata/2.targets.json",
        published.repo_path,
    ]


def test_get_target_returns_published_entry(
    repo: TrustRepository, published: PublishedTarget
) -> None:
    entry = repo.get_target(TARGET)
    assert entry is not None
    assert entry.length == len(PAYLOAD)
    assert entry.hashes == {"sha256": published.sha256}
    assert TargetCustom.from_dict(entry.custom).release == 3
    assert repo.get_target("demo-mlp/1.0/other.bundle") is None


def test_reopened_repository_signs_for_the_same_root(repo: TrustRepository, tmp_path: Path) -> None:
    anchor = repo.root_bytes()
    reopened = TrustRepository.open(repo.root)
    reopened.add_target(TARGET, PAYLOAD, make_custom())
    assert reopened.root_bytes() == anchor
    updater, _ = make_updater(reopened, tmp_path / "client")
    info = updater.get_targetinfo(TARGET)
    assert info is not None
    assert Path(updater.download_target(info)).read_bytes() == PAYLOAD


def test_concurrent_writers_lose_no_update(repo: TrustRepository, tmp_path: Path) -> None:
    # The service refreshes the timestamp while the CLI publishes, from other
    # processes; each change must start from the state the last one left.
    others = [TrustRepository.open(repo.root) for _ in range(4)]
    paths = [f"m/{i}/generic-fp32.bundle" for i in range(8)]

    def add(i: int) -> None:
        others[i % len(others)].add_target(paths[i], PAYLOAD + bytes([i]), make_custom())

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(add, range(len(paths))))
    assert all(repo.get_target(p) is not None for p in paths)
    assert timestamp_version(repo) == 1 + len(paths)
    updater, _ = make_updater(repo, tmp_path / "client")
    for p in paths:
        assert updater.get_targetinfo(p) is not None


def test_open_or_init_creates_once_then_opens(tmp_path: Path) -> None:
    first = TrustRepository.open_or_init(tmp_path / "repo")
    second = TrustRepository.open_or_init(tmp_path / "repo")
    assert second.root_bytes() == first.root_bytes()
    assert json.loads(first.root_bytes())["signed"]["consistent_snapshot"] is True


def test_init_refuses_an_existing_repository(repo: TrustRepository) -> None:
    with pytest.raises(TrustError, match="already"):
        TrustRepository.init(repo.root)


def test_open_refuses_a_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="not a TUF repository"):
        TrustRepository.open(tmp_path)


def test_open_refuses_corrupt_metadata(repo: TrustRepository) -> None:
    (repo.root / "metadata" / "timestamp.json").write_bytes(b"{not json")
    with pytest.raises(TrustError, match=r"timestamp\.json"):
        TrustRepository.open(repo.root)


# -- what the client refuses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (lambda b: bytes([b[0] ^ 1]) + b[1:], exceptions.LengthOrHashMismatchError),
        (lambda b: b[:-1], exceptions.LengthOrHashMismatchError),
        # More bytes than the signed length: ngclient stops reading and raises
        # a *download* error, not a RepositoryError.
        (lambda b: b + b"x", exceptions.DownloadLengthMismatchError),
    ],
    ids=["flipped-byte", "truncated", "appended"],
)
def test_tampered_target_is_refused(
    repo: TrustRepository,
    published: PublishedTarget,
    tmp_path: Path,
    tamper: Callable[[bytes], bytes],
    error: type[Exception],
) -> None:
    stored = repo.root / published.repo_path
    stored.write_bytes(tamper(stored.read_bytes()))
    updater, _ = make_updater(repo, tmp_path / "client")
    info = updater.get_targetinfo(TARGET)
    assert info is not None
    destination = tmp_path / "out.bundle"
    with pytest.raises(error):
        updater.download_target(info, filepath=str(destination))
    assert not destination.exists()  # nothing unverified reaches the destination


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp"])
def test_expired_metadata_is_refused(repo: TrustRepository, tmp_path: Path, role: str) -> None:
    repo.publish(expires_override={role: datetime.now(timezone.utc) - timedelta(hours=1)})
    updater, _ = make_updater(repo, tmp_path / "client")
    with pytest.raises(exceptions.ExpiredMetadataError):
        updater.refresh()


def test_fresh_publish_after_expiry_recovers(repo: TrustRepository, tmp_path: Path) -> None:
    repo.publish(expires_override={"timestamp": datetime.now(timezone.utc) - timedelta(hours=1)})
    repo.publish()
    updater, _ = make_updater(repo, tmp_path / "client")
    updater.refresh()  # does not raise


def test_timestamp_rollback_is_refused(repo: TrustRepository, tmp_path: Path) -> None:
    old_timestamp = repo.read_file("metadata/timestamp.json")
    assert old_timestamp is not None
    repo.publish()
    client = tmp_path / "client"
    updater, _ = make_updater(repo, client)
    updater.refresh()  # the client now trusts timestamp v2
    replay = RepoFetcher(repo, overrides={"metadata/timestamp.json": old_timestamp})
    updater, _ = make_updater(repo, client, replay)
    with pytest.raises(exceptions.BadVersionNumberError):
        updater.refresh()


def test_edited_targets_metadata_is_refused(
    repo: TrustRepository, published: PublishedTarget, tmp_path: Path
) -> None:
    path = repo.root / "metadata" / "2.targets.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["targets"][TARGET]["custom"]["hardware_class"] = "evil"
    path.write_text(json.dumps(doc))
    updater, _ = make_updater(repo, tmp_path / "client")
    # snapshot pins the targets file's hash, so the edit fails the hash check
    # before the signature is even looked at.
    with pytest.raises(exceptions.LengthOrHashMismatchError):
        updater.refresh()


def test_edited_timestamp_is_refused(repo: TrustRepository, tmp_path: Path) -> None:
    path = repo.root / "metadata" / "timestamp.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["version"] += 5
    path.write_text(json.dumps(doc))
    updater, _ = make_updater(repo, tmp_path / "client")
    with pytest.raises(exceptions.UnsignedMetadataError):
        updater.refresh()


# -- keeping metadata fresh ------------------------------------------------------------


def test_refresh_timestamp_does_nothing_far_from_expiry(repo: TrustRepository) -> None:
    before = repo.read_file("metadata/timestamp.json")
    assert repo.refresh_timestamp() is False  # expires in 1 day, window is 6 hours
    assert repo.read_file("metadata/timestamp.json") == before


def test_refresh_timestamp_resigns_near_expiry(repo: TrustRepository, tmp_path: Path) -> None:
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    repo.publish(expires_override={"timestamp": soon})
    assert timestamp_version(repo) == 2
    assert repo.refresh_timestamp() is True
    assert timestamp_version(repo) == 3
    expires = datetime.fromisoformat(
        str(signed_field(repo, "metadata/timestamp.json", "expires")).replace("Z", "+00:00")
    )
    assert expires > datetime.now(timezone.utc) + timedelta(hours=23)
    # only the timestamp was re-signed: it still names snapshot v2
    meta = signed_field(repo, "metadata/timestamp.json", "meta")
    assert meta["snapshot.json"]["version"] == 2  # type: ignore[index]
    assert repo.read_file("metadata/3.snapshot.json") is None
    assert repo.refresh_timestamp() is False  # and now it is fresh again
    updater, _ = make_updater(repo, tmp_path / "client")
    updater.refresh()


def test_refresh_timestamp_window_is_configurable(repo: TrustRepository) -> None:
    assert repo.refresh_timestamp(within=timedelta(days=2)) is True
    assert timestamp_version(repo) == 2


def test_refresh_timestamp_also_renews_an_expiring_snapshot(
    repo: TrustRepository, tmp_path: Path
) -> None:
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    repo.publish(expires_override={"snapshot": soon})
    assert repo.refresh_timestamp() is True
    meta = signed_field(repo, "metadata/timestamp.json", "meta")
    assert meta["snapshot.json"]["version"] == 3  # type: ignore[index]
    updater, _ = make_updater(repo, tmp_path / "client")
    updater.refresh()


def test_publish_refuses_overriding_root_expiry(repo: TrustRepository) -> None:
    with pytest.raises(TrustError, match="root"):
        repo.publish(expires_override={"root": datetime.now(timezone.utc)})


def test_expiry_policy_is_applied(tmp_path: Path) -> None:
    repo = TrustRepository.init(tmp_path / "repo", expiry=Expiry(targets_days=30))
    expires = datetime.fromisoformat(
        str(signed_field(repo, "metadata/1.targets.json", "expires")).replace("Z", "+00:00")
    )
    delta = expires - datetime.now(timezone.utc)
    assert timedelta(days=29) < delta <= timedelta(days=30)


# -- keys ---------------------------------------------------------------------------


def test_key_files_are_private(repo: TrustRepository) -> None:
    keys = repo.root / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert sorted(p.name for p in keys.iterdir()) == sorted(f"{r}.key" for r in ROLES)
    for path in keys.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_open_refuses_a_key_others_can_access(repo: TrustRepository, mode: int) -> None:
    os.chmod(repo.root / "keys" / "targets.key", mode)
    with pytest.raises(KeyPermissionError, match=r"targets\.key"):
        TrustRepository.open(repo.root)


def test_open_refuses_a_key_root_does_not_list(repo: TrustRepository, tmp_path: Path) -> None:
    other = TrustRepository.init(tmp_path / "other")
    (repo.root / "keys" / "snapshot.key").write_bytes(
        (other.root / "keys" / "snapshot.key").read_bytes()
    )
    with pytest.raises(TrustError, match="snapshot"):
        TrustRepository.open(repo.root)


# -- serving files ------------------------------------------------------------------


def test_read_file_serves_metadata_and_targets(
    repo: TrustRepository, published: PublishedTarget
) -> None:
    assert repo.read_file(published.repo_path) == PAYLOAD
    assert repo.read_file("metadata/1.root.json") == repo.root_bytes()
    assert repo.read_file("metadata/timestamp.json") is not None
    assert repo.read_file("metadata/9.root.json") is None


@pytest.mark.parametrize(
    "rel",
    [
        "../secret",
        "metadata/../../secret",
        "targets/../keys/root.key",
        "keys/root.key",
        "keys/../metadata/timestamp.json",
        "/etc/passwd",
        "metadata",
        "metadata/",
        "",
        "metadata/./timestamp.json",
        "metadata\\timestamp.json",
        "targets/escape",
        "targets/inside-link",
    ],
)
def test_read_file_refuses_paths_outside_the_served_tree(
    repo: TrustRepository, tmp_path: Path, rel: str
) -> None:
    (tmp_path / "secret").write_bytes(b"secret")
    (repo.root / "targets" / "escape").symlink_to(tmp_path / "secret")
    (repo.root / "targets" / "inside-link").symlink_to(repo.root / "keys" / "root.key")
    assert repo.read_file(rel) is None
    assert repo.resolve(rel) is None


def test_read_file_refuses_absolute_path_into_the_repository(repo: TrustRepository) -> None:
    absolute = str(repo.root / "metadata" / "timestamp.json")
    assert repo.read_file(absolute) is None


@pytest.mark.parametrize(
    "path", ["../evil.bundle", "/abs/x.bundle", "a//b.bundle", ".hidden/x", "a/", "a b/c", ""]
)
def test_add_target_refuses_unsafe_paths(repo: TrustRepository, path: str) -> None:
    with pytest.raises(TrustError, match="invalid target path"):
        repo.add_target(path, PAYLOAD, make_custom())
