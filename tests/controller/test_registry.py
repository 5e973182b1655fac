"""Tests of the registry against real databases: SQLite always, PostgreSQL on request.

Set ``EDGEFLEET_TEST_DATABASE_URL`` (e.g.
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) to also run every
database test on PostgreSQL. The shared ``database_url`` fixture gives each
PostgreSQL test its own schema through the connection's ``search_path``, so
tests neither see each other's rows nor need the registry to know about schemas.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from edgefleet.controller.errors import (
    DuplicateError,
    NoMatchingBundleError,
    NotFoundError,
    RegistryError,
)
from edgefleet.controller.registry import BundleInfo, ModelVersionInfo, Registry, sqlite_url
from edgefleet.controller.registry.migrations import HEAD
from edgefleet.controller.registry.models import Base
from edgefleet.protocols.bundle import TensorSpec
from edgefleet.protocols.errors import TopicError
from edgefleet.protocols.messages import (
    AgentState,
    ErrorInfo,
    Event,
    EventKind,
    HardwareInfo,
    LatencySummary,
    ModelRef,
    ReportedState,
    Telemetry,
)

SHA = "ab" * 32
INPUTS = (TensorSpec("x", "float32", (None, 4)),)
OUTPUTS = (TensorSpec("y", "float32", (None, 2)),)


# --------------------------------------------------------------------------- fixtures
# ``database_url`` (tests/conftest.py): a fresh SQLite file, and a throwaway
# PostgreSQL schema when EDGEFLEET_TEST_DATABASE_URL is set.
@pytest.fixture
def registry(database_url: str) -> Iterator[Registry]:
    reg = Registry(database_url)
    try:
        yield reg
    finally:
        reg.close()


def _version(reg: Registry, name: str = "clf", version: str = "1.0") -> ModelVersionInfo:
    return reg.register_model_version(
        name, version, source_sha256=SHA, inputs=INPUTS, outputs=OUTPUTS
    )


def _bundle(
    reg: Registry, mv: ModelVersionInfo, hardware_class: str, runtime: str = "onnxruntime"
) -> BundleInfo:
    return reg.add_bundle(
        mv.id,
        hardware_class=hardware_class,
        runtime=runtime,
        precision="int8",
        target_path=f"{mv.name}/{mv.version}/{hardware_class}-{runtime}.tar",
        sha256=SHA,
        length=1234,
    )


def _report(
    device_id: str,
    *,
    state: AgentState = AgentState.IDLE,
    active: ModelRef | None = None,
    error: ErrorInfo | None = None,
    hardware_class: str = "generic",
) -> ReportedState:
    return ReportedState(
        device_id=device_id,
        state=state,
        active=active,
        hardware=HardwareInfo(
            arch="aarch64",
            cpu_features=("neon",),
            runtimes=("onnxruntime",),
            hardware_class=hardware_class,
        ),
        last_error=error,
        extra={"future_field": 7},
    )


def _telemetry(
    device_id: str, requests: int, *, p50: float | None, errors: int = 0, version: str = "1.0"
) -> Telemetry:
    return Telemetry(
        device_id=device_id,
        window_s=10.0,
        requests=requests,
        errors=errors,
        latency_ms=None if p50 is None else LatencySummary(p50, p50 * 2, p50 * 3),
        model=ModelRef("clf", version, 1, "clf/t.tar"),
        rss_bytes=10_000_000,
        cpu_percent=12.5,
    )


# --------------------------------------------------------------------------- schema
def test_migrated_schema_matches_models(registry: Registry) -> None:
    with registry.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == HEAD


def test_schema_comparison_detects_a_drifted_model(registry: Registry) -> None:
    # Guards the test above: a comparison that reports nothing proves nothing
    # unless it does report a column the migrations never created.
    drifted = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["devices"].append_column(sa.Column("nickname", sa.String(32)))
    with registry.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), drifted)
    assert [d[0] for d in diffs] == ["add_column"]


def test_reopening_keeps_data_and_migrates_idempotently(database_url: str) -> None:
    first = Registry(database_url)
    try:
        _version(first)
    finally:
        first.close()
    second = Registry(database_url)
    try:
        assert [v.label for v in second.list_model_versions()] == ["clf@1.0"]
    finally:
        second.close()


def _pragma(reg: Registry, name: str) -> Any:
    """Read a per-connection PRAGMA the way the registry's own connections see it."""
    with reg.engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


def test_sqlite_file_gets_parent_dirs_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "registry.db"
    reg = Registry(f"sqlite:///{path}")
    try:
        assert path.is_file()
        assert _pragma(reg, "journal_mode") == "wal"
        assert _pragma(reg, "foreign_keys") == 1
        assert _pragma(reg, "busy_timeout") >= 1000
    finally:
        reg.close()
    # WAL is a property of the file, so another client sees it too.
    plain = sqlite3.connect(path)
    try:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        plain.close()


def test_sqlite_enforces_foreign_keys(tmp_path: Path) -> None:
    reg = Registry(sqlite_url(tmp_path / "fk.db"))
    try:
        with pytest.raises(sa.exc.IntegrityError), reg.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO telemetry (device_id, at, window_s, requests, errors,"
                " rss_bytes, cpu_percent) VALUES ('ghost', '2026-01-01', 1, 1, 0, 1, 1)"
            )
    finally:
        reg.close()


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(RegistryError, match="in memory"):
        Registry("sqlite://")


def test_unreachable_database_names_url_without_password() -> None:
    url = "postgresql+psycopg://edge:s3cret-pw@127.0.0.1:1/registry?connect_timeout=2"
    with pytest.raises(RegistryError) as info:
        Registry(url)
    message = str(info.value)
    assert "127.0.0.1:1/registry" in message
    assert "s3cret-pw" not in message
    assert "cannot open registry database" in message


def test_file_that_is_not_a_database_is_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not a SQLite database, just some text " * 100)
    with pytest.raises(RegistryError, match="cannot open registry database"):
        Registry(sqlite_url(path))


def test_concurrent_enrollments_of_one_id_yield_one_device(registry: Registry) -> None:
    outcomes: list[str] = []

    def enroll() -> None:
        try:
            registry.enroll_device("gw-1")
            outcomes.append("enrolled")
        except DuplicateError:
            outcomes.append("duplicate")

    threads = [threading.Thread(target=enroll) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["duplicate"] * 5 + ["enrolled"]


def test_sqlite_path_under_a_file_is_a_registry_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RegistryError):
        Registry(sqlite_url(blocker / "sub" / "registry.db"))


# --------------------------------------------------------------------------- models
def test_release_counter_increases_per_model(registry: Registry) -> None:
    v1 = _version(registry, "clf", "1.0")
    v2 = _version(registry, "clf", "2.0")
    v15 = _version(registry, "clf", "1.5")  # a lower version string still gets a higher release
    other = _version(registry, "det", "1.0")
    assert (v1.release, v2.release, v15.release, other.release) == (1, 2, 3, 1)
    assert [v.version for v in registry.list_model_versions("clf")] == ["1.5", "2.0", "1.0"]
    assert len(registry.list_model_versions()) == 4
    got = registry.get_model_version("clf", "2.0")
    assert got == v2
    assert got.inputs == INPUTS
    assert got.outputs == OUTPUTS
    assert got.created_at.tzinfo is not None
    assert got.created_at.utcoffset() == timedelta(0)


def test_concurrent_registrations_get_distinct_releases(registry: Registry) -> None:
    errors: list[BaseException] = []

    def register(i: int) -> None:
        try:
            _version(registry, "race", f"{i}.0")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    releases = sorted(v.release for v in registry.list_model_versions("race"))
    assert releases == list(range(1, 9))


def test_duplicates_are_refused(registry: Registry) -> None:
    mv = _version(registry)
    with pytest.raises(DuplicateError, match=r"clf@1\.0"):
        _version(registry)
    _bundle(registry, mv, "generic")
    with pytest.raises(DuplicateError, match="target path"):
        _bundle(registry, mv, "generic")
    registry.enroll_device("gw-1")
    with pytest.raises(DuplicateError, match="gw-1"):
        registry.enroll_device("gw-1")
    # A refused duplicate must not have consumed a release number.
    assert _version(registry, "clf", "2.0").release == 2


def test_missing_things_raise_not_found(registry: Registry) -> None:
    with pytest.raises(NotFoundError):
        registry.get_model_version("nope", "1")
    with pytest.raises(NotFoundError):
        registry.add_bundle(
            999,
            hardware_class="generic",
            runtime="onnxruntime",
            precision="fp32",
            target_path="x.tar",
            sha256=SHA,
            length=1,
        )
    with pytest.raises(NotFoundError):
        registry.get_deployment("0" * 32)
    assert registry.get_device("nope") is None


def test_bundles_for_lists_report_json(registry: Registry) -> None:
    mv = _version(registry)
    report = {"accuracy": {"top1": 0.91}, "steps": ["quantize", "check"]}
    registry.add_bundle(
        mv.id,
        hardware_class="rpi4",
        runtime="onnxruntime",
        precision="int8",
        target_path="clf/1.0/rpi4.tar",
        sha256=SHA,
        length=42,
        report=report,
    )
    _bundle(registry, mv, "generic")
    bundles = registry.bundles_for(mv.id)
    assert [(b.hardware_class, b.report) for b in bundles] == [("rpi4", report), ("generic", None)]


# --------------------------------------------------------------------------- devices
def test_enroll_validates_device_id(registry: Registry) -> None:
    with pytest.raises(TopicError):
        registry.enroll_device("bad/id")
    device = registry.enroll_device("gw-1", hardware_class="rpi4", tags=("lab", "eu"))
    assert device.tags == ("lab", "eu")
    assert device.hardware_class == "rpi4"
    assert device.online is False
    assert device.enrolled_at.tzinfo is not None
    assert [d.id for d in registry.list_devices()] == ["gw-1"]


def test_record_reported_for_unknown_device_writes_nothing(registry: Registry) -> None:
    assert registry.record_reported(_report("ghost")) is False
    assert registry.get_device("ghost") is None
    assert registry.list_devices() == []


def test_record_reported_updates_device(registry: Registry) -> None:
    registry.enroll_device("gw-1", hardware_class="rpi4")
    active = ModelRef("clf", "1.0", 3, "clf/1.0/rpi4.tar")
    error = ErrorInfo("smoke_mismatch", "outputs differ")
    assert registry.record_reported(
        _report("gw-1", state=AgentState.FAILED, active=active, error=error, hardware_class="rpi4")
    )
    device = registry.get_device("gw-1")
    assert device is not None
    assert (device.state, device.arch, device.cpu_features, device.runtimes) == (
        "failed",
        "aarch64",
        ("neon",),
        ("onnxruntime",),
    )
    assert (device.active_model, device.active_version, device.active_release) == ("clf", "1.0", 3)
    assert device.last_error == error
    assert device.last_seen is not None
    assert device.reported is not None
    assert device.reported["future_field"] == 7
    assert device.reported["active"]["target"] == "clf/1.0/rpi4.tar"
    assert device.online is False  # only the status channel says online

    # A clean report clears the error and the active model.
    assert registry.record_reported(_report("gw-1"))
    device = registry.get_device("gw-1")
    assert device is not None
    assert device.last_error is None
    assert device.active_version is None


def test_late_older_report_does_not_overwrite_a_newer_one(registry: Registry) -> None:
    registry.enroll_device("gw-1")
    active = ModelRef("clf", "1.0", 3, "clf/1.0/generic.tar")
    newer = replace(_report("gw-1", active=active), updated_at=200.0)
    older = replace(_report("gw-1", state=AgentState.INSTALLING), updated_at=100.0)
    assert registry.record_reported(newer)
    # Shared subscriptions let two controllers store one device's reports out of order.
    assert registry.record_reported(older)
    device = registry.get_device("gw-1")
    assert device is not None
    assert device.state == "idle"
    assert device.active_version == "1.0"
    assert registry.record_reported(replace(older, updated_at=300.0))
    device = registry.get_device("gw-1")
    assert device is not None
    assert device.state == "installing"


def test_set_online(registry: Registry) -> None:
    assert registry.set_online("ghost", True) is False
    registry.enroll_device("gw-1")
    assert registry.set_online("gw-1", True) is True
    device = registry.get_device("gw-1")
    assert device is not None
    assert device.online is True
    assert device.last_seen is not None
    assert registry.set_online("gw-1", False) is True
    device = registry.get_device("gw-1")
    assert device is not None
    assert device.online is False


# --------------------------------------------------------------------------- deployments
def test_deployment_picks_hardware_class_bundle_then_generic(registry: Registry) -> None:
    mv = _version(registry)
    rpi = _bundle(registry, mv, "rpi4")
    generic = _bundle(registry, mv, "generic")
    registry.enroll_device("pi-1", hardware_class="rpi4")
    registry.enroll_device("jet-1", hardware_class="jetson")

    deployment = registry.create_deployment(mv.id, ["pi-1", "jet-1"])

    targets = {t.device_id: t for t in deployment.targets}
    assert targets["pi-1"].model == ModelRef("clf", "1.0", 1, rpi.target_path)
    assert targets["jet-1"].model == ModelRef("clf", "1.0", 1, generic.target_path)
    assert (targets["pi-1"].bundle_id, targets["jet-1"].bundle_id) == (rpi.id, generic.id)
    assert (deployment.model, deployment.version, deployment.release) == ("clf", "1.0", 1)
    desired = registry.desired_for("jet-1")
    assert desired is not None
    assert desired.model is not None
    assert desired.model.target == generic.target_path
    assert desired.deployment_id == deployment.id
    assert registry.get_deployment(deployment.id) == deployment


def test_deployment_prefers_a_runtime_the_device_has(registry: Registry) -> None:
    mv = _version(registry)
    _bundle(registry, mv, "rpi4", runtime="tflite")
    onnx = _bundle(registry, mv, "rpi4", runtime="onnxruntime")
    registry.enroll_device("pi-1", hardware_class="rpi4")
    registry.record_reported(_report("pi-1", hardware_class="rpi4"))  # reports onnxruntime
    deployment = registry.create_deployment(mv.id, ["pi-1"])
    assert deployment.targets[0].bundle_id == onnx.id


def test_no_matching_bundle_names_devices_and_changes_nothing(registry: Registry) -> None:
    mv = _version(registry)
    _bundle(registry, mv, "rpi4")
    registry.enroll_device("pi-1", hardware_class="rpi4")
    registry.enroll_device("jet-1", hardware_class="jetson")
    with pytest.raises(NoMatchingBundleError, match=r"jet-1 \(jetson\)") as info:
        registry.create_deployment(mv.id, ["pi-1", "jet-1"])
    assert "pi-1" not in str(info.value)
    # All or nothing: the device that did match got no desired state either.
    assert registry.desired_for("pi-1") is None
    assert registry.list_deployments() == []


def test_deployment_to_unknown_device_or_version(registry: Registry) -> None:
    mv = _version(registry)
    _bundle(registry, mv, "generic")
    registry.enroll_device("gw-1")
    with pytest.raises(NotFoundError, match="ghost"):
        registry.create_deployment(mv.id, ["gw-1", "ghost"])
    with pytest.raises(NotFoundError):
        registry.create_deployment(mv.id + 100, ["gw-1"])
    with pytest.raises(RegistryError):
        registry.create_deployment(mv.id, [])
    assert registry.desired_for("gw-1") is None


def test_generation_increments_per_deployment(registry: Registry) -> None:
    v1 = _version(registry, "clf", "1.0")
    v2 = _version(registry, "clf", "2.0")
    _bundle(registry, v1, "generic")
    _bundle(registry, v2, "generic")
    registry.enroll_device("a")
    registry.enroll_device("b")

    first = registry.create_deployment(v1.id, ["a", "b"])
    second = registry.create_deployment(v2.id, ["a", "a"])  # duplicates collapse

    assert {t.device_id: t.generation for t in first.targets} == {"a": 1, "b": 1}
    assert [(t.device_id, t.generation) for t in second.targets] == [("a", 2)]
    desired_a = registry.desired_for("a")
    desired_b = registry.desired_for("b")
    assert desired_a is not None
    assert desired_b is not None
    assert (desired_a.generation, desired_a.deployment_id) == (2, second.id)
    assert desired_a.model is not None
    assert (desired_a.model.version, desired_a.model.release) == ("2.0", 2)
    assert (desired_b.generation, desired_b.deployment_id) == (1, first.id)
    assert [d.id for d in registry.list_deployments()] == [second.id, first.id]
    assert [d.device_id for d in registry.all_desired()] == ["a", "b"]


def test_unpublished_and_mark_published(registry: Registry) -> None:
    mv = _version(registry)
    _bundle(registry, mv, "generic")
    registry.enroll_device("a")
    registry.enroll_device("b")
    registry.create_deployment(mv.id, ["a", "b"])
    assert [(d.device_id, d.generation) for d in registry.unpublished_desired()] == [
        ("a", 1),
        ("b", 1),
    ]

    registry.mark_published("a", 1)
    assert [d.device_id for d in registry.unpublished_desired()] == ["b"]

    registry.create_deployment(mv.id, ["a"])  # generation 2, not yet published
    registry.mark_published("a", 1)  # a late acknowledgement of the old one
    assert [(d.device_id, d.generation) for d in registry.unpublished_desired()] == [
        ("a", 2),
        ("b", 1),
    ]
    registry.mark_published("a", 2)
    registry.mark_published("a", 1)  # must not lower the mark again
    registry.mark_published("ghost", 5)  # unknown devices are ignored
    assert [d.device_id for d in registry.unpublished_desired()] == ["b"]

    registry.mark_published("b", 7)  # a generation that does not exist yet is ignored
    registry.create_deployment(mv.id, ["b"])
    assert [(d.device_id, d.generation) for d in registry.unpublished_desired()] == [("b", 2)]


# --------------------------------------------------------------------------- ingest
def test_events_are_batched_and_skip_unknown_devices(registry: Registry) -> None:
    registry.enroll_device("gw-1")
    model = ModelRef("clf", "1.0", 1, "clf/t.tar")
    events = [
        Event("gw-1", EventKind.DOWNLOAD_STARTED, generation=1, deployment_id="d1", at=1.7e9),
        Event("ghost", EventKind.INSTALLED, generation=1),
        Event(
            "gw-1",
            EventKind.INSTALL_FAILED,
            generation=1,
            model=model,
            error=ErrorInfo("smoke_mismatch", "bad outputs"),
            bytes_done=10,
            bytes_total=20,
        ),
    ]
    assert registry.add_events(events) == 2
    assert registry.add_events([]) == 0
    stored = registry.events_for("gw-1")
    assert [e.kind for e in stored] == ["install_failed", "download_started"]
    assert stored[0].error == ErrorInfo("smoke_mismatch", "bad outputs")
    assert stored[0].detail == {"model": model.to_dict(), "bytes_done": 10, "bytes_total": 20}
    assert stored[1].detail is None
    assert stored[1].deployment_id == "d1"
    assert stored[1].at.timestamp() == pytest.approx(1.7e9)
    assert stored[1].at.tzinfo == timezone.utc
    assert [e.kind for e in registry.events_for("gw-1", limit=1)] == ["install_failed"]
    assert registry.events_for("ghost") == []


def test_telemetry_summaries(registry: Registry) -> None:
    mv = _version(registry)
    _bundle(registry, mv, "generic")
    registry.enroll_device("a")
    registry.enroll_device("b")
    registry.enroll_device("c")
    registry.create_deployment(mv.id, ["a"])
    registry.record_reported(
        _report("a", active=ModelRef("clf", "1.0", 1, "clf/t.tar"), hardware_class="generic")
    )
    registry.record_reported(
        _report("b", state=AgentState.FAILED, error=ErrorInfo("no_space", "disk full"))
    )
    registry.set_online("a", True)

    stored = registry.add_telemetry(
        [
            _telemetry("a", 100, p50=4.0, errors=1),
            _telemetry("a", 50, p50=6.5, errors=2),
            _telemetry("a", 0, p50=None),  # idle window: no latency
            _telemetry("b", 7, p50=1.0),
            _telemetry("ghost", 1000, p50=1.0),
        ]
    )
    assert stored == 4

    summaries = {s.device_id: s for s in registry.device_summaries()}
    assert list(summaries) == ["a", "b", "c"]
    a, b, c = summaries["a"], summaries["b"], summaries["c"]
    assert (a.inferences, a.errors, a.p50_ms) == (150, 3, 6.5)
    assert (a.active_model, a.active_version) == ("clf", "1.0")
    assert (a.desired_model, a.desired_version) == ("clf", "1.0")
    assert a.online is True
    assert (b.inferences, b.p50_ms, b.state) == (7, 1.0, "failed")
    assert (b.last_error_code, b.last_error_message) == ("no_space", "disk full")
    assert (b.desired_version, b.active_version) == (None, None)
    assert (c.inferences, c.errors, c.p50_ms, c.last_seen) == (0, 0, None, None)

    newest = registry.telemetry_for("a")
    assert [t.requests for t in newest] == [0, 50, 100]
    assert newest[0].p50_ms is None
    assert (newest[1].p95_ms, newest[1].p99_ms, newest[1].model_version) == (13.0, 19.5, "1.0")
    assert len(registry.telemetry_for("a", limit=2)) == 2

    status = registry.fleet_status()
    assert (
        status.devices,
        status.online,
        status.offline,
        status.failed,
    ) == (3, 1, 2, 1)
    assert status.versions == {"clf@1.0": 1}
    assert (status.inferences, status.errors) == (157, 3)


def test_empty_fleet_status(registry: Registry) -> None:
    status = registry.fleet_status()
    assert (status.devices, status.inferences, status.versions, status.counters) == (
        0,
        0,
        {},
        {},
    )
    assert registry.device_summaries() == []


# --------------------------------------------------------------------------- counters
def test_counters(registry: Registry) -> None:
    assert registry.counters() == {}
    registry.bump_counter("rejected.bad_json")
    registry.bump_counter("rejected.bad_json", 4)
    registry.bump_counter("blocks.served", 2)
    assert registry.counters() == {"blocks.served": 2, "rejected.bad_json": 5}
    assert registry.fleet_status().counters == {"blocks.served": 2, "rejected.bad_json": 5}


def test_concurrent_counter_bumps_are_not_lost(registry: Registry) -> None:
    def bump() -> None:
        for _ in range(20):
            registry.bump_counter("hits")

    threads = [threading.Thread(target=bump) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.counters() == {"hits": 100}


def test_concurrent_deployments_and_ingest_do_not_conflict(registry: Registry) -> None:
    # On PostgreSQL, foreign-key checks of ingest batches lock device rows too;
    # a deployment that locked them the wrong way deadlocked against ingest.
    mv = _version(registry)
    _bundle(registry, mv, "generic")
    devices = [f"d{i:02d}" for i in range(12)]
    for device_id in devices:
        registry.enroll_device(device_id)
    errors: list[BaseException] = []

    def deploy(k: int) -> None:
        try:
            for i in range(15):
                registry.create_deployment(mv.id, devices[(k + i) % 12 :] + devices[: (k + i) % 12])
        except BaseException as exc:
            errors.append(exc)

    def ingest(k: int) -> None:
        try:
            for i in range(15):
                batch = [
                    _telemetry(devices[(k * 5 + i + j * 7) % 12], 1, p50=1.0) for j in range(6)
                ]
                registry.add_telemetry(batch)
                registry.add_events([Event(d.device_id, EventKind.VERIFIED) for d in batch])
                registry.record_reported(_report(devices[(k + i) % 12]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deploy, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=ingest, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(d.generation for d in registry.all_desired()) == 4 * 15 * 12
    assert registry.fleet_status().inferences == 4 * 15 * 6
