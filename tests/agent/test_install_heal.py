"""The agent heals from its own disk and never goes back a release: real files, no broker.

- The release high-water mark is written on every activation and outlives
  both kept slots, so ``release_rollback`` holds for any deploy sequence.
- Kept slots are sealed and re-hashed before reuse; a corrupt one is discarded.
- Free space is checked against the signed length before a download, and a
  full disk removes the partial download instead of keeping the disk full.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.fetcher import MqttFetcher, PartialFile, PartialStore
from edgefleet.agent.install import Installer, space_needed
from edgefleet.agent.reconcile import Attempt, Backoff, decide, record_failure
from edgefleet.agent.serving import ModelHolder
from edgefleet.agent.slots import SEAL_NAME, SlotRecord, SlotStore
from edgefleet.agent.unpack import unpack_bundle
from edgefleet.controller.bundle import build_bundle, default_sample, inspect_onnx
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.protocols.bundle import TargetCustom
from edgefleet.protocols.errors import (
    InsufficientSpaceError,
    ReleaseRollbackError,
    TransferError,
)
from edgefleet.protocols.messages import DesiredState, HardwareInfo, ModelRef
from tests.support.smallfs import small_filesystem

HARDWARE = HardwareInfo("x86_64", ("avx2",), ("onnxruntime",))


def ref(name: str, release: int) -> ModelRef:
    return ModelRef(name=name, version=f"{release}.0", release=release, target=f"{name}-{release}")


def custom_for(model: ModelRef, **extra: object) -> dict[str, object]:
    inputs, outputs = inspect_onnx(build_demo_model())
    custom = TargetCustom(
        model.name,
        model.version,
        model.release,
        "onnxruntime",
        "fp32",
        "generic",
        inputs,
        outputs,
        extra=dict(extra),
    )
    return custom.to_dict()


def sha_of(n: int) -> str:
    return f"{n:064x}"


def installer_for(state: Path, fetcher: MqttFetcher | None = None) -> Installer:
    slots = SlotStore(state)
    # No download happens through these installers unless a fetcher is given.
    return Installer(state, fetcher, slots, ModelHolder(), HARDWARE)  # type: ignore[arg-type]


def real_slot(slots: SlotStore, model: ModelRef, sha: str, seed: int = 0) -> SlotRecord:
    """Unpack a real bundle of the demo model into a sealed slot, as install() does."""
    onnx = build_demo_model(seed=seed)
    inputs, _ = inspect_onnx(onnx)
    bundle, _ = build_bundle(
        onnx,
        name=model.name,
        version=model.version,
        release=model.release,
        hardware_class="generic",
        precision="fp32",
        sample_inputs=default_sample(inputs),
    )
    name = SlotStore.slot_name(model, sha)
    staging = slots.staging(name)
    archive = staging.parent / f"{name}.tar"
    archive.write_bytes(bundle)
    try:
        unpack_bundle(archive, staging)
    finally:
        archive.unlink()
    path = slots.commit(staging, name, bundle_sha256=sha)
    return SlotRecord(name, model, sha, path)


# --------------------------------------------------------------------------- downgrade guard
def test_release_mark_outlives_both_kept_slots(tmp_path: Path) -> None:
    """C, release 3 of A, then B twice (A leaves the kept slots), then release 1 of A: refused.

    C first: the mark of the very first activation was the only one ever written.
    """
    state = tmp_path / "state"
    installer = installer_for(state)
    seq = [ref("c", 1), ref("a", 3), ref("b", 1), ref("b", 2)]
    for n, model in enumerate(seq):
        record = real_slot(installer.slots, model, sha_of(n + 1))
        installer._activate(record, object())  # type: ignore[arg-type]
    kept = {r.model.name for r in (installer.slots.active(), installer.slots.previous()) if r}
    assert kept == {"b"}
    assert json.loads((state / "releases.json").read_text()) == {"a": 3, "b": 2, "c": 1}

    old = ref("a", 1)
    with pytest.raises(ReleaseRollbackError, match="older than release 3"):
        installer._check_custom(old, custom_for(old))
    # The same release again, and a re-issue of release 1 above the mark, pass.
    installer._check_custom(ref("a", 3), custom_for(ref("a", 3)))
    reissue = ModelRef(name="a", version="1.0", release=4, target="a-reissue-4")
    installer._check_custom(reissue, custom_for(reissue, reissue_of=1))


def test_release_mark_survives_a_fresh_installer(tmp_path: Path) -> None:
    """The mark is on disk, not in memory: a restarted agent refuses the same downgrade."""
    state = tmp_path / "state"
    first = installer_for(state)
    for n, model in enumerate([ref("b", 1), ref("a", 5), ref("c", 1), ref("c", 2)]):
        first._activate(real_slot(first.slots, model, sha_of(n + 1)), object())  # type: ignore[arg-type]
    again = installer_for(state)
    with pytest.raises(ReleaseRollbackError):
        again._check_custom(ref("a", 4), custom_for(ref("a", 4)))


def test_lost_mark_is_rebuilt_from_the_active_slot_on_restore(tmp_path: Path) -> None:
    state = tmp_path / "state"
    installer = installer_for(state)
    installer._activate(real_slot(installer.slots, ref("a", 7), sha_of(1)), object())  # type: ignore[arg-type]
    (state / "releases.json").unlink()
    assert installer_for(state).restore() == ref("a", 7)
    assert json.loads((state / "releases.json").read_text()) == {"a": 7}


# --------------------------------------------------------------------------- corrupt slots
def test_commit_seals_the_slot(tmp_path: Path) -> None:
    slots = SlotStore(tmp_path / "state")
    record = real_slot(slots, ref("a", 1), sha_of(1))
    seal = json.loads((record.path / SEAL_NAME).read_text())
    assert seal["bundle_sha256"] == sha_of(1)
    assert sorted(seal["files"]) == ["manifest.json", "model.onnx", "sample.npz"]
    assert slots.verify(record) is None


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            lambda p: (p / "model.onnx").write_bytes((p / "model.onnx").read_bytes()[:100]),
            "model.onnx does not match",
        ),
        (lambda p: (p / "sample.npz").unlink(), "missing ['sample.npz']"),
        (lambda p: (p / "extra.bin").write_bytes(b"x"), "unexpected ['extra.bin']"),
        (lambda p: (p / SEAL_NAME).write_text("{"), "seal is not JSON"),
    ],
)
def test_find_discards_a_corrupt_kept_slot(tmp_path: Path, damage: object, problem: str) -> None:
    slots = SlotStore(tmp_path / "state")
    old = real_slot(slots, ref("a", 1), sha_of(1))
    slots.activate(old)
    new = real_slot(slots, ref("a", 2), sha_of(2), seed=1)
    slots.activate(new)
    damage(new.path)  # type: ignore[operator]
    reported: list[tuple[str, str]] = []

    found = slots.find(sha_of(2), on_corrupt=lambda r, why: reported.append((r.slot, why)))

    assert found is None
    assert len(reported) == 1 and reported[0][0] == new.slot and problem in reported[0][1]
    assert not new.path.exists()
    assert slots.active() is None
    previous = slots.previous()
    assert previous is not None and previous.slot == old.slot
    assert slots.find(sha_of(1)) == SlotRecord(old.slot, old.model, old.bundle_sha256, old.path)


def test_unsealed_slot_is_checked_against_its_manifest(tmp_path: Path) -> None:
    """Slots unpacked by an agent that did not seal yet still get their model re-hashed."""
    slots = SlotStore(tmp_path / "state")
    record = real_slot(slots, ref("a", 1), sha_of(1))
    (record.path / SEAL_NAME).unlink()
    assert slots.verify(record) is None
    model = record.path / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1])
    assert slots.verify(record) == "model.onnx does not match its manifest's SHA-256"


def test_restore_discards_a_truncated_active_slot_and_serves_the_previous(tmp_path: Path) -> None:
    state = tmp_path / "state"
    installer = installer_for(state)
    good = real_slot(installer.slots, ref("a", 1), sha_of(1))
    installer._activate(good, object())  # type: ignore[arg-type]
    bad = real_slot(installer.slots, ref("a", 2), sha_of(2), seed=1)
    installer._activate(bad, object())  # type: ignore[arg-type]
    model = bad.path / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])

    reported: list[str] = []
    restarted = Installer(
        state,
        None,  # type: ignore[arg-type]
        SlotStore(state),
        ModelHolder(),
        HARDWARE,
        on_corrupt_slot=lambda r, _why: reported.append(r.slot),
    )
    assert restarted.restore() == ref("a", 1)
    assert reported == [bad.slot]
    assert not bad.path.exists()
    # The corrupt slot is gone from current.json: installing release 2 again
    # cannot pick it up, it has to download.
    assert restarted.slots.find(sha_of(2)) is None
    active = restarted.slots.active()
    assert active is not None and active.slot == good.slot
    assert restarted.slots.previous() is None
    # The guard is untouched by the fallback: release 2 ran, so 1 stays refused.
    with pytest.raises(ReleaseRollbackError):
        restarted._check_custom(ref("a", 1), custom_for(ref("a", 1)))


# --------------------------------------------------------------------------- disk space
def test_space_needed_counts_two_copies_and_what_is_already_downloaded() -> None:
    assert space_needed(64 * 2**20) == 2 * 64 * 2**20 + 2**20 + 2**20
    assert space_needed(64 * 2**20, resumed=16 * 2**20) == space_needed(64 * 2**20) - 16 * 2**20
    assert space_needed(100, resumed=10_000) == 100 + 1 + 2**20  # a bogus resume counts once


def test_space_needed_counts_a_compressed_bundle_decompressed_and_extracted() -> None:
    mib = 2**20
    # 10 MiB on the wire, 30 MiB signed decompressed: the download, the tar
    # decompressed next to it and the extracted members are on disk at once.
    assert space_needed(10 * mib, unpacked=30 * mib) == 70 * mib + 30 * mib // 64 + mib
    # Barely compressed: the two copies of the download are still the peak.
    assert space_needed(10 * mib, unpacked=5 * mib) == space_needed(10 * mib)


@pytest.fixture
def fetcher(tmp_path: Path) -> MqttFetcher:
    # Only the partial-download store is used here: no link is needed.
    return MqttFetcher(None, "dev", PartialStore(tmp_path / "state" / "partial"))  # type: ignore[arg-type]


def _partial(fetcher: MqttFetcher, path: str, blocks: int) -> PartialFile:
    part = fetcher._store.open(path, fetcher.settings.block_size_bytes)
    part.set_total(blocks * fetcher.settings.block_size_bytes)
    for i in range(blocks):
        part.write_block(i, b"\0" * fetcher.settings.block_size_bytes)
    return part


def test_space_check_reclaims_stale_partials_then_refuses(
    tmp_path: Path, fetcher: MqttFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    installer = installer_for(tmp_path / "state", fetcher)
    stale = _partial(fetcher, "targets/old.bundle", 4)
    mine = _partial(fetcher, "targets/new.bundle", 2)
    leftover = installer.download_dir / "f00.bundle"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x" * 100)
    want = ref("a", 1)
    length = 10 * 2**20
    need = space_needed(length, resumed=2 * fetcher.settings.block_size_bytes)

    monkeypatch.setattr(Installer, "_free_bytes", lambda _self: need - 1)
    with pytest.raises(InsufficientSpaceError, match=f"needs {need} bytes free") as info:
        installer._ensure_space(want, "targets/new.bundle", length, leftover.with_name("x"))
    assert info.value.code == "insufficient_space"
    # What no install can use any more went; the resumable download stayed.
    assert not stale.directory.exists() and not leftover.exists()
    assert mine.directory.exists() and fetcher.resumable_bytes("targets/new.bundle") > 0

    monkeypatch.setattr(Installer, "_free_bytes", lambda _self: need)
    installer._ensure_space(want, "targets/new.bundle", length, leftover)


def test_enough_space_touches_nothing(
    tmp_path: Path, fetcher: MqttFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    installer = installer_for(tmp_path / "state", fetcher)
    other = _partial(fetcher, "targets/other.bundle", 1)
    monkeypatch.setattr(Installer, "_free_bytes", lambda _self: 10**12)
    installer._ensure_space(ref("a", 1), "targets/new.bundle", 2**20, tmp_path / "x")
    assert other.directory.exists()  # resumable if that deploy comes back


def test_free_bytes_is_the_state_filesystem(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", 4 * 2**20) as skip:
        if skip:
            pytest.skip(skip)
        installer = installer_for(tmp_path / "small" / "state")
        assert 3 * 2**20 < installer._free_bytes() <= 4 * 2**20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "small", 2 * 2**20) as skip:
        if skip:
            pytest.skip(skip)
        yield tmp_path / "small"


def test_a_full_disk_removes_the_partial_download(small_disk: Path) -> None:
    store = PartialStore(small_disk / "partial")
    block = 64 * 1024
    part = store.open("targets/huge.bundle", block)
    part.set_total(64 * block)  # 4 MiB, sparse, on a 2 MiB disk

    def fill() -> None:
        for i in range(64):
            part.write_block(i, b"\1" * block)

    with pytest.raises(InsufficientSpaceError, match="partial download was removed"):
        fill()
    assert not part.directory.exists()
    assert store.blocks_present("targets/huge.bundle", block) == 0
    # The disk is usable again: a small download fits.
    small = store.open("targets/small.bundle", block)
    small.set_total(4 * block)
    for i in range(4):
        small.write_block(i, b"\2" * block)
    assert small.complete


# --------------------------------------------------------------------------- recovery
def test_insufficient_space_is_retried_after_a_backoff() -> None:
    """A full disk is not a verdict on the bundle: the same intent is tried again."""
    desired = DesiredState(device_id="dev", generation=3, deployment_id="d", model=ref("a", 1))
    key = (desired.deployment_id, desired.generation, "a-1")
    attempts: dict[tuple[str | None, int, str], Attempt] = {}
    attempt = record_failure(
        attempts, key, InsufficientSpaceError("full"), now=100.0, backoff=Backoff(5.0, 300.0)
    )
    assert not attempt.permanent and attempt.retry_at == 105.0
    assert decide(desired, None, attempts, now=101.0).install is None
    assert decide(desired, None, attempts, now=105.0).install == ref("a", 1)
    # Still true for transfer failures, still permanent for the rest.
    assert not record_failure(attempts, key, TransferError("x"), 0.0, Backoff(1, 1)).permanent
    assert record_failure(attempts, key, ReleaseRollbackError("x"), 0.0, Backoff(1, 1)).permanent
