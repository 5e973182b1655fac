"""Tests for install slots and the atomic active/previous switch."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from edgefleet.agent import slots as slots_module
from edgefleet.agent.slots import SlotRecord, SlotStore
from edgefleet.protocols.errors import SlotError
from edgefleet.protocols.messages import ModelRef

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


def ref(release: int) -> ModelRef:
    return ModelRef(
        name="det", version=f"1.{release}", release=release, target=f"det-{release}.tar"
    )


def install(store: SlotStore, release: int, sha: str, payload: bytes = b"model") -> SlotRecord:
    """Stage, fill and commit a slot the way the install pipeline does."""
    model = ref(release)
    name = SlotStore.slot_name(model, sha)
    staging = store.staging(name)
    (staging / "model.onnx").write_bytes(payload)
    path = store.commit(staging, name, bundle_sha256=sha)  # sealed, as install() does
    return SlotRecord(slot=name, model=model, bundle_sha256=sha, path=path)


@pytest.fixture
def store(tmp_path: Path) -> SlotStore:
    return SlotStore(tmp_path / "state")


# --------------------------------------------------------------------------- naming & staging
def test_slot_name_is_sortable_and_safe() -> None:
    assert SlotStore.slot_name(ref(42), "0123456789abcdef" * 4) == "0000000042-0123456789abcdef"
    with pytest.raises(SlotError, match="64 lowercase hex"):
        SlotStore.slot_name(ref(1), "../../etc/passwd")
    with pytest.raises(SlotError, match="64 lowercase hex"):
        SlotStore.slot_name(ref(1), "A" * 64)


def test_staging_is_fresh_and_cleans_leftovers_of_same_name(store: SlotStore) -> None:
    leftover = store.slots_dir / ".staging-0000000001-aaaaaaaaaaaaaaaa-crashed"
    leftover.mkdir()
    (leftover / "junk").write_text("x")
    other = store.slots_dir / ".staging-0000000002-bbbbbbbbbbbbbbbb-crashed"
    other.mkdir()

    first = store.staging("0000000001-aaaaaaaaaaaaaaaa")
    assert first.parent == store.slots_dir
    assert first.name.startswith(".staging-0000000001-aaaaaaaaaaaaaaaa-")
    assert list(first.iterdir()) == []
    assert not leftover.exists()
    assert other.exists()  # another slot's staging is gc's business

    second = store.staging("0000000001-aaaaaaaaaaaaaaaa")
    assert second != first
    assert first.exists()  # still in use by this process


@pytest.mark.parametrize("name", ["../evil", ".hidden", "a/b", "", "x" * 200])
def test_staging_refuses_unsafe_names(store: SlotStore, name: str) -> None:
    with pytest.raises(SlotError, match="unsafe slot name"):
        store.staging(name)


def test_commit_renames_staging_into_place(store: SlotStore) -> None:
    record = install(store, 1, SHA_A)
    assert record.path == store.slots_dir / "0000000001-aaaaaaaaaaaaaaaa"
    assert (record.path / "model.onnx").read_bytes() == b"model"
    assert [p.name for p in store.slots_dir.iterdir()] == [record.slot]


def test_commit_replaces_existing_slot_of_same_name(store: SlotStore) -> None:
    install(store, 1, SHA_A, b"damaged")
    record = install(store, 1, SHA_A, b"repaired")
    assert (record.path / "model.onnx").read_bytes() == b"repaired"
    assert [p.name for p in store.slots_dir.iterdir()] == [record.slot]  # no trash left


def test_commit_fsyncs_slots_dir(store: SlotStore, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(slots_module, "fsync_dir", synced.append)
    install(store, 1, SHA_A)
    assert synced == [store.slots_dir]


def test_commit_refuses_foreign_directories(store: SlotStore, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(SlotError, match="not a staging directory"):
        store.commit(elsewhere, "0000000001-aaaaaaaaaaaaaaaa")
    not_staging = store.slots_dir / "0000000009-aaaaaaaaaaaaaaaa"
    not_staging.mkdir()
    with pytest.raises(SlotError, match="not a staging directory"):
        store.commit(not_staging, "0000000001-aaaaaaaaaaaaaaaa")


# --------------------------------------------------------------------------- activate
def test_nothing_active_initially(store: SlotStore) -> None:
    assert store.active() is None
    assert store.previous() is None


def test_activate_keeps_previous_and_survives_restart(store: SlotStore) -> None:
    a, b = install(store, 1, SHA_A), install(store, 2, SHA_B)
    store.activate(a)
    assert store.active() == a
    assert store.previous() is None
    store.activate(b)
    assert store.active() == b
    assert store.previous() == a

    reopened = SlotStore(store.state_dir)
    assert reopened.active() == b
    assert reopened.previous() == a
    on_disk = json.loads((store.state_dir / "current.json").read_text())
    assert on_disk == {
        "active": {"slot": b.slot, "model": b.model.to_dict(), "bundle_sha256": SHA_B},
        "previous": {"slot": a.slot, "model": a.model.to_dict(), "bundle_sha256": SHA_A},
    }
    assert sorted(p.name for p in store.state_dir.iterdir()) == ["current.json", "slots"]


def test_reactivating_active_slot_keeps_previous(store: SlotStore) -> None:
    a, b = install(store, 1, SHA_A), install(store, 2, SHA_B)
    store.activate(a)
    store.activate(b)
    store.activate(b)
    assert store.active() == b
    assert store.previous() == a


def test_rollback_swaps_active_and_previous(store: SlotStore) -> None:
    a, b = install(store, 1, SHA_A), install(store, 2, SHA_B)
    store.activate(a)
    store.activate(b)
    store.activate(a)
    assert store.active() == a
    assert store.previous() == b


def test_activate_refuses_missing_slot(store: SlotStore) -> None:
    ghost = SlotRecord("0000000001-aaaaaaaaaaaaaaaa", ref(1), SHA_A, store.slots_dir / "x")
    with pytest.raises(SlotError, match="not installed"):
        store.activate(ghost)
    assert store.active() is None


def test_deactivate_moves_active_to_previous(store: SlotStore) -> None:
    a = install(store, 1, SHA_A)
    store.activate(a)
    store.deactivate()
    assert store.active() is None
    assert store.previous() == a


def test_crash_while_writing_current_keeps_old_state(
    store: SlotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = install(store, 1, SHA_A), install(store, 2, SHA_B)
    store.activate(a)
    real_replace = os.replace

    def power_cut(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == "current.json":
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError, match="power cut"):
        store.activate(b)
    monkeypatch.undo()
    reopened = SlotStore(store.state_dir)
    assert reopened.active() == a  # the old, complete state, not a torn write
    store.activate(b)  # a leftover temporary does not get in the way
    assert store.active() == b


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"active": {"slot": "../../etc", "model": {}, "bundle_sha256": "x"}}',
        b'{"active": {"slot": "0000000001-aaaaaaaaaaaaaaaa", "model": {"name": "x"},'
        b' "bundle_sha256": "' + SHA_A.encode() + b'"}}',
    ],
)
def test_corrupt_current_json_is_set_aside(
    store: SlotStore, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    current = store.state_dir / "current.json"
    current.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="edgefleet.agent.slots"):
        assert store.active() is None
    assert "corrupt" in caplog.text
    assert not current.exists()
    assert (store.state_dir / "current.json.corrupt").read_bytes() == content
    a = install(store, 1, SHA_A)
    store.activate(a)
    assert store.active() == a


# --------------------------------------------------------------------------- find & gc
def test_find_returns_installed_active_or_previous(store: SlotStore) -> None:
    a, b, c = install(store, 1, SHA_A), install(store, 2, SHA_B), install(store, 3, SHA_C)
    store.activate(a)
    store.activate(b)
    assert store.find(SHA_A) == a
    assert store.find(SHA_B) == b
    assert store.find(SHA_C) is None  # on disk, but neither active nor previous
    assert c.path.exists()
    os.rename(a.path, store.slots_dir / "moved-away")
    assert store.find(SHA_A) is None  # its directory is gone: must download again


def test_gc_removes_unused_slots_and_stale_temporaries(store: SlotStore) -> None:
    a, b, c = install(store, 1, SHA_A), install(store, 2, SHA_B), install(store, 3, SHA_C)
    store.activate(a)
    store.activate(b)
    stale = store.slots_dir / ".staging-0000000004-dddddddddddddddd-old"
    stale.mkdir()
    (stale / "half.onnx").write_bytes(b"x")
    trash = store.slots_dir / ".trash-0000000001-aaaaaaaaaaaaaaaa-old"
    trash.mkdir()
    live = store.staging("0000000005-eeeeeeeeeeeeeeee")

    removed = store.gc()

    assert removed == sorted([c.slot, stale.name, trash.name])
    assert sorted(p.name for p in store.slots_dir.iterdir()) == sorted([a.slot, b.slot, live.name])
    assert store.gc() == []


def test_gc_does_not_follow_symlinks(store: SlotStore, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("x")
    (store.slots_dir / "0000000009-ffffffffffffffff").symlink_to(precious)
    assert store.gc() == ["0000000009-ffffffffffffffff"]
    assert (precious / "keep").exists()


def test_discarded_staging_is_removed(store: SlotStore) -> None:
    staging = store.staging("0000000001-aaaaaaaaaaaaaaaa")
    store.discard(staging)
    assert not staging.exists()
