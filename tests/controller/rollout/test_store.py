"""Rollout persistence and steps against real databases (SQLite, and PostgreSQL in CI).

Devices here are simulated at the registry boundary - reports and telemetry
are stored exactly as the ingest worker stores them - so every rule of the
I/O layer (locking, one transaction per step, re-issues) runs for real
without brokers or agents. The end-to-end tests do the same with real agents.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgefleet.controller.catalog import register_model
from edgefleet.controller.cli import cli
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.controller.errors import NotFoundError
from edgefleet.controller.registry import Registry
from edgefleet.controller.registry import models as m
from edgefleet.controller.rollout.engine import DeviceState, RolloutConfig, RolloutStatus
from edgefleet.controller.rollout.errors import RolloutError, RolloutStateError
from edgefleet.controller.rollout.runner import sign_reissue
from edgefleet.controller.rollout.store import Reissue, RolloutStore, Selector
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.bundle import TargetCustom
from edgefleet.protocols.messages import (
    AgentState,
    ErrorInfo,
    HardwareInfo,
    LatencySummary,
    ModelRef,
    ReportedState,
    Telemetry,
)

CFG = RolloutConfig(
    canary_count=1,
    base_rate=2,
    max_rate=4,
    max_in_flight=4,
    soak_s=0,
    observe_s=0,
    device_timeout_s=60,
    min_executed=2,
)


@pytest.fixture
def registry(database_url: str) -> Iterator[Registry]:
    r = Registry(database_url)
    yield r
    r.close()


@pytest.fixture
def repo(tmp_path: Path) -> TrustRepository:
    return TrustRepository.init(tmp_path / "repository")


class Fleet:
    """Devices that report and send telemetry through the registry, like ingest does."""

    def __init__(self, registry: Registry, repo: TrustRepository, n: int) -> None:
        self.registry, self.repo = registry, repo
        self.v1 = register_model(registry, repo, build_demo_model(), name="m", version="1.0")
        self.v2 = register_model(registry, repo, build_demo_model(seed=1), name="m", version="2.0")
        self.ids = [f"d{i:02d}" for i in range(n)]
        for device_id in self.ids:
            registry.enroll_device(device_id, tags=["t"])
            registry.set_online(device_id, True)
            self.report(device_id, self.ref("1.0"))

    def ref(self, version: str, release: int | None = None, target: str | None = None) -> ModelRef:
        reg = self.v1 if version == "1.0" else self.v2
        return ModelRef(
            "m", version, release or reg.version.release, target or reg.bundles[0].target_path
        )

    def report(
        self,
        device_id: str,
        active: ModelRef | None,
        *,
        failed: str | None = None,
        deployment: str | None = None,
        generation: int = 0,
    ) -> None:
        self.registry.record_reported(
            ReportedState(
                device_id=device_id,
                state=AgentState.FAILED if failed else AgentState.IDLE,
                active=active,
                hardware=HardwareInfo("x86_64", runtimes=("onnxruntime",)),
                generation=generation,
                deployment_id=deployment,
                last_error=ErrorInfo(failed, "bad") if failed else None,
            )
        )

    def telemetry(
        self, device_id: str, version: str, requests: int, errors: int, p95: float
    ) -> None:
        self.registry.add_telemetry(
            [
                Telemetry(
                    device_id,
                    1.0,
                    requests,
                    errors,
                    LatencySummary(p95 / 2, p95, p95),
                    self.ref(version),
                    1,
                    0.0,
                )
            ]
        )

    def desired(self, device_id: str) -> ModelRef | None:
        d = self.registry.desired_for(device_id)
        return None if d is None else d.model


def signer(repo: TrustRepository) -> object:
    return lambda r: sign_reissue(repo, r)


def test_a_failing_canary_is_rolled_back_to_a_reissue_of_the_kept_bundle(
    registry: Registry, repo: TrustRepository
) -> None:
    fleet = Fleet(registry, repo, 5)
    for device_id in fleet.ids:
        fleet.telemetry(device_id, "1.0", 50, 0, 3.0)
    store = RolloutStore(registry, actor="c1")
    info = store.create("m", "2.0", Selector(tags=("t",)), CFG)
    step = store.step(info.id, signer(repo))  # type: ignore[arg-type]
    assert step is not None and step.desired_changed
    canary = [d for d in store.devices(info.id) if d.state is DeviceState.IN_FLIGHT]
    assert [d.device_id for d in canary] == ["d00"]
    assert canary[0].baseline_p95_ms == pytest.approx(3.0)
    desired = registry.desired_for("d00")
    assert (
        desired is not None
        and desired.deployment_id == info.id
        and desired.model == fleet.ref("2.0")
    )

    # It installs, then errors on 40% of requests.
    fleet.report("d00", fleet.ref("2.0"), deployment=info.id, generation=desired.generation)
    store.step(info.id, signer(repo))  # type: ignore[arg-type]
    fleet.telemetry("d00", "2.0", 10, 4, 3.0)
    result = store.step(info.id, signer(repo))  # type: ignore[arg-type]
    assert result is not None
    got = store.get(info.id)
    assert got.status is RolloutStatus.HALTED
    assert got.counts == {"rolling_back": 1, "cancelled": 4}
    back = fleet.desired("d00")
    assert back is not None
    assert (back.version, back.release) == ("1.0", 3)  # a new release of the old version
    target = repo.get_target(back.target)
    assert target is not None
    custom = TargetCustom.from_dict(target.unrecognized_fields["custom"])
    assert custom.release == 3 and custom.extra["reissue_of"] == 1
    assert target.hashes["sha256"] == fleet.v1.bundles[0].sha256  # same bytes: no download
    # Others never moved.
    assert all(fleet.desired(d) is None for d in fleet.ids[1:])
    # The device reports the re-issue active: rolled back; the release counter moved on.
    fleet.report("d00", back)
    store.step(info.id, signer(repo))  # type: ignore[arg-type]
    assert store.get(info.id).counts == {"rolled_back": 1, "cancelled": 4}
    assert (
        registry.register_model_version(
            "m", "3.0", source_sha256="0" * 64, inputs=(), outputs=()
        ).release
        == 4
    )
    kinds = [d.kind for d in store.decisions(info.id)]
    assert kinds.count("device_in_flight") == 1 and "halted" in kinds
    assert store.active_ids() == []  # settled: nothing left to step


def test_install_refusal_is_a_failure_and_a_step_is_all_or_nothing(
    registry: Registry, repo: TrustRepository
) -> None:
    fleet = Fleet(registry, repo, 3)
    store = RolloutStore(registry)
    info = store.create("m", "2.0", Selector(devices=("d00", "d01")), CFG)
    store.step(info.id, signer(repo))  # type: ignore[arg-type]
    desired = registry.desired_for("d00")
    assert desired is not None
    fleet.report(
        "d00",
        fleet.ref("1.0"),
        failed="smoke_test_failed",
        deployment=info.id,
        generation=desired.generation,
    )

    def crash(_: Reissue) -> None:
        raise RuntimeError("controller died while signing")

    before = (store.get(info.id), store.devices(info.id), registry.desired_for("d00"))
    with pytest.raises(RuntimeError):
        store.step(info.id, crash)
    # Nothing of the failed step is visible: not the failure, not the halt, not the re-issue.
    assert (store.get(info.id), store.devices(info.id), registry.desired_for("d00")) == before
    assert len(registry.bundles_for(fleet.v1.version.id)) == 1
    store.step(info.id, signer(repo))  # type: ignore[arg-type]
    got = store.devices(info.id)
    assert got[0].device_id == "d00" and got[0].state is DeviceState.ROLLING_BACK
    story = [(d.kind, d.reason) for d in store.decisions(info.id) if d.device_id == "d00"]
    assert ("device_failed", "install refused: smoke_test_failed: bad") in story


def test_continuous_deployment_and_overlap_rules(registry: Registry, repo: TrustRepository) -> None:
    fleet = Fleet(registry, repo, 2)
    store = RolloutStore(registry)
    info = store.create("m", "2.0", Selector(tags=("t",)), CFG)
    with pytest.raises(RolloutStateError, match="unfinished rollout"):
        store.create("m", "1.0", Selector(devices=("d00",)), CFG)
    t = m.utcnow()
    for i in range(6):
        store.step(info.id, signer(repo), now=t + timedelta(seconds=i))  # type: ignore[arg-type]
        for d in store.devices(info.id):
            if d.state is DeviceState.IN_FLIGHT:
                fleet.report(d.device_id, fleet.ref("2.0"))
            if d.state is DeviceState.OBSERVING:
                fleet.telemetry(d.device_id, "2.0", 5, 0, 1.0)
    assert store.get(info.id).status is RolloutStatus.COMPLETED
    # A device that joins the group later gets the rollout's model.
    registry.enroll_device("late", tags=["t"])
    registry.set_online("late", True)
    store.step(info.id, signer(repo))  # type: ignore[arg-type]
    late = fleet.desired("late")
    assert late is not None and late.version == "2.0"
    # A new rollout over the same devices supersedes the completed one.
    newer = store.create("m", "2.0", Selector(devices=("d00",)), CFG)
    assert store.get(info.id).status is RolloutStatus.SUPERSEDED
    assert store.get(newer.id).status is RolloutStatus.RUNNING


def test_operator_commands_and_bad_input(registry: Registry, repo: TrustRepository) -> None:
    Fleet(registry, repo, 2)
    store = RolloutStore(registry, actor="cli:ops")
    with pytest.raises(NotFoundError, match=r"m@9\.9"):
        store.create("m", "9.9", Selector(all=True), CFG)
    with pytest.raises(NotFoundError, match="unknown devices: nope"):
        store.create("m", "2.0", Selector(devices=("nope",)), CFG)
    with pytest.raises(RolloutError, match="give device ids, tags, profiles or all"):
        Selector()
    info = store.create("m", "2.0", Selector(all=True), CFG, start=False)
    assert info.status is RolloutStatus.CREATED and info.devices == 0
    with pytest.raises(RolloutStateError, match="cannot pause"):
        store.pause(info.id)
    assert store.start(info.id).devices == 2
    assert store.pause(info.id, "investigating").status is RolloutStatus.PAUSED
    assert store.step(info.id, lambda _r: None) is not None
    assert all(
        d.state is DeviceState.PENDING for d in store.devices(info.id)
    )  # paused: nothing starts
    assert store.resume(info.id).status is RolloutStatus.RUNNING
    assert store.abort(info.id, "wrong model").status is RolloutStatus.ABORTED
    with pytest.raises(RolloutStateError, match="cannot resume"):
        store.resume(info.id)
    store.step(info.id, lambda _r: None)
    assert store.get(info.id).counts == {"cancelled": 2}
    story = [(d.kind, d.actor, d.reason) for d in store.decisions(info.id) if d.device_id is None]
    assert ("paused", "cli:ops", "investigating") in story
    assert ("aborted", "cli:ops", "wrong model") in story
    with pytest.raises(NotFoundError):
        store.get("ro-missing")


def test_concurrent_steps_start_each_device_once(registry: Registry, repo: TrustRepository) -> None:
    Fleet(registry, repo, 12)
    store = RolloutStore(registry)
    cfg = RolloutConfig(canary_count=12, max_in_flight=12, observe_s=0)
    info = store.create("m", "2.0", Selector(all=True), cfg)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        other = RolloutStore(registry, actor=name)
        try:
            for _ in range(5):
                other.step(info.id, lambda _r: None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"c{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    starts = [d.device_id for d in store.decisions(info.id) if d.kind == "device_in_flight"]
    assert sorted(starts) == sorted(set(starts)) and len(starts) == 12
    gens = {registry.desired_for(f"d{i:02d}").generation for i in range(12)}  # type: ignore[union-attr]
    assert gens == {1}


def test_cli_create_show_watch_and_abort(tmp_path: Path, database_url: str) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(f'home = "{tmp_path / "state"}"\ndatabase_url = "{database_url}"\n')
    run = lambda *a: CliRunner().invoke(cli, ["--config", str(config), *a], catch_exceptions=False)  # noqa: E731
    result = run("init")
    assert result.exit_code == 0, result.output
    registry = Registry(database_url)
    repo = TrustRepository.open(tmp_path / "state" / "repository")
    try:
        Fleet(registry, repo, 3)
    finally:
        registry.close()
    bad = run("rollout", "create", "m", "2.0", "--tag", "t", "--canary", "150%")
    assert bad.exit_code == 1 and "canary_pct must be in (0, 100]" in bad.output
    bad = run("rollout", "create", "m", "2.0", "--canary", "3")
    assert bad.exit_code == 1 and "give device ids, tags, profiles or all" in bad.output
    result = run(
        "rollout", "create", "m", "2.0", "--tag", "t", "--canary", "34%", "--soak-s", "5", "--json"
    )
    assert result.exit_code == 0, result.output
    created = json.loads(result.output)
    assert created["config"]["canary_pct"] == 34.0 and created["counts"] == {"pending": 3}
    rid = created["id"]
    assert rid in run("rollout", "list").output
    shown = run("rollout", "show", rid)
    assert (
        shown.exit_code == 0
        and "started" in shown.output
        and "3 device(s) selected" in shown.output
    )
    watched = run("rollout", "watch", rid, "--once")
    assert watched.exit_code == 0 and "unstarted" in watched.output and "[" in watched.output
    aborted = run("rollout", "abort", rid, "--reason", "test", "--json")
    assert json.loads(aborted.output)["status"] == "aborted"
    again = run("rollout", "resume", rid)
    assert again.exit_code == 1 and "cannot resume" in again.output
    assert run("rollout", "show", "nope").exit_code == 1
    detail = json.loads(run("rollout", "show", rid, "--json").output)
    assert [d["kind"] for d in detail["decisions"]] == ["created", "started", "aborted"]
