"""Agents that heal and never go back, through the real path: controller, broker, agent.

Each scenario is one the issue reproduced against a running fleet:

- release 3 of a model, then other models, then release 1 of the first: the
  agent must refuse it (``release_rollback``), because its high-water mark is
  on disk and not only in the two kept slots; a re-issued rollback (the old
  bytes signed under a newer release, as the rollout engine makes them) works.
- the active slot's model file truncated, then a restart: the agent must not
  reinstall from that slot again; it discards it and downloads.
- a bundle bigger than the state disk's free space: refused up front with
  ``insufficient_space``, no partial file left behind, and a small bundle
  installs afterwards.

Each refusal or repair reaches the controller as an event with its code,
which is what ``edgefleet device events`` prints.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from edgefleet.agent.daemon import Agent
from edgefleet.controller.catalog import register_model
from edgefleet.controller.cli import cli
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.catalog import reissue_bundle
from edgefleet.controller.registry.deployments import assign_desired
from edgefleet.controller.rollout.runner import sign_reissue
from edgefleet.controller.rollout.store import Reissue
from tests.e2e.harness import MODEL, Harness, infer, wait_for, wide_model
from tests.support.smallfs import small_filesystem

pytestmark = pytest.mark.slow


def event_codes(h: Harness, name: str) -> list[tuple[str, str | None]]:
    """(kind, error code) of the device's events, newest first, from `edgefleet device events`."""
    result = CliRunner().invoke(
        cli,
        [
            "--home",
            str(h.tmp / "cli-home"),
            "--database-url",
            h.registry.url,
            "device",
            "events",
            h.device_id(name),
            "--limit",
            "50",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return [(row["kind"], row["code"]) for row in json.loads(result.stdout)]


def deploy_reissue(h: Harness, version: str, name: str) -> int:
    """Roll ``name`` back to MODEL@version the way the rollout engine does: a re-issue.

    The catalog makes a bundle row with the model's next release and
    ``reissue_of`` the original; the runner signs the original bytes under it;
    the device's desired state points at it. Returns the re-issued release.
    """
    now = m.utcnow()
    with h.registry.database.write() as s:
        version_row = s.scalars(
            sa.select(m.ModelVersion)
            .join(m.Model, m.Model.id == m.ModelVersion.model_id)
            .where(m.Model.name == MODEL, m.ModelVersion.version == version)
        ).one()
        original = s.scalars(
            sa.select(m.Bundle).where(
                m.Bundle.model_version_id == version_row.id, m.Bundle.reissue_of.is_(None)
            )
        ).first()
        assert original is not None
        model_row = s.get(m.Model, version_row.model_id)
        assert model_row is not None
        made = reissue_bundle(s, original, above=model_row.last_release, now=now)
        release = made.bundle.release
        assert release is not None
        sign_reissue(
            h.repository,
            Reissue(
                made.source.target_path, made.bundle.target_path, release, made.version.release
            ),
        )
        deployment = m.Deployment(
            id=uuid.uuid4().hex, model_version_id=version_row.id, created_at=now, status="active"
        )
        s.add(deployment)
        s.flush()
        assign_desired(s, deployment.id, version_row, {h.device_id(name): made.bundle}, now)
    return release


def test_no_deploy_sequence_installs_an_older_release(harness: Harness) -> None:
    """The issue's sequence: release 3 of a model, other models, then release 1: refused."""
    h = harness
    first = h.register("1.0", build_demo_model(seed=1))
    for version in ("2.0", "3.0"):
        h.register(version, build_demo_model(seed=int(version[0])))
    for other in ("e2e-other-b", "e2e-other-c"):
        register_model(
            h.registry, h.repository, build_demo_model(seed=7), name=other, version="1.0"
        )
    h.enroll("gw-down")
    agent = h.start_agent(h.agent_config("gw-down"))
    device = h.device_id("gw-down")

    def run_other(other: str) -> None:
        h.service.deploy(other, "1.0", [device])
        wait_for(
            lambda: agent.active_model is not None and agent.active_model.name == other,
            30,
            f"{device} to run {other}",
        )

    # The device ran another model first (so release 3 is not the first mark
    # ever written), then release 3, then two other models, which push
    # release 3 out of both kept slots.
    run_other("e2e-other-c")
    h.deploy("3.0", "gw-down")
    h.wait_active(agent, "3.0")
    run_other("e2e-other-b")
    run_other("e2e-other-c")
    kept = {agent.slots.active(), agent.slots.previous()}
    assert MODEL not in {r.model.name for r in kept if r is not None}

    h.deploy("1.0", "gw-down")
    summary = h.wait_error("gw-down", "release_rollback")
    assert summary.active_version == "1.0"  # e2e-other-c@1.0 still serves
    assert agent.active_model is not None and agent.active_model.name == "e2e-other-c"
    wait_for(
        lambda: ("rejected", "release_rollback") in event_codes(h, "gw-down"),
        10,
        "the release_rollback event",
    )
    # Refused before any byte of the old bundle was requested.
    assert not any(first.bundles[0].sha256 in p for p in agent.fetcher.blocks_by_path)

    # A deliberate rollback: release 1's bytes re-issued above release 3.
    release = deploy_reissue(h, "1.0", "gw-down")
    assert release > 3
    wait_for(
        lambda: (
            agent.active_model is not None
            and agent.active_model.name == MODEL
            and agent.active_model.release == release
        ),
        30,
        f"{device} to accept the re-issue",
    )
    assert infer(agent)["model"]["version"] == "1.0"
    wait_for(lambda: h.summary("gw-down").last_error_code is None, 10, "error cleared")


def test_truncated_active_slot_is_discarded_and_reinstalled(harness: Harness) -> None:
    h = harness
    h.register("1.0")
    h.register("2.0", build_demo_model(seed=1))
    h.enroll("gw-rot")
    config = h.agent_config("gw-rot")
    agent = h.start_agent(config)
    h.deploy("1.0", "gw-rot")
    h.wait_active(agent, "1.0")
    h.deploy("2.0", "gw-rot")
    h.wait_active(agent, "2.0")
    active = agent.slots.active()
    assert active is not None
    agent.stop()

    model = active.path / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])

    healed = h.start_agent(config)
    # It serves at once (the good previous slot), then downloads 2.0 again
    # instead of loading the same truncated files.
    assert healed.active_model is not None
    h.wait_active(healed, "2.0")
    assert infer(healed)["model"]["version"] == "2.0"
    assert healed.installs == 1
    wait_for(
        lambda: (
            [e.kind for e in h.registry.events_for(h.device_id("gw-rot"), 50)].count("installed")
            == 3
        ),
        10,
        "the third installed event",
    )
    installed = next(
        e for e in h.registry.events_for(h.device_id("gw-rot"), 10) if e.kind == "installed"
    )
    assert installed.detail is not None and installed.detail["extra"]["downloaded"] is True
    assert healed.slots.verify(healed.slots.active()) is None  # type: ignore[arg-type]
    wait_for(
        lambda: ("install_failed", "bad_slot") in event_codes(h, "gw-rot"),
        10,
        "the discarded slot reported as an event",
    )
    assert h.summary("gw-rot").last_error_code is None


def test_bundle_bigger_than_the_disk_is_refused_and_the_device_recovers(
    harness: Harness, tmp_path: Path
) -> None:
    h = harness
    disk = tmp_path / "small-disk"
    with small_filesystem(disk, 8 * 2**20) as skip:
        if skip:
            pytest.skip(skip)
        h.register("1.0")
        big = h.register("2.0", wide_model(hidden=120_000))
        assert big.bundles[0].length > 8 * 2**20
        h.register("3.0", build_demo_model(seed=3))
        h.enroll("gw-full")
        config = h.agent_config("gw-full").with_overrides(state_dir=disk / "state")
        agent: Agent = h.start_agent(config)
        h.deploy("1.0", "gw-full")
        h.wait_active(agent, "1.0")

        h.deploy("2.0", "gw-full")
        summary = h.wait_error("gw-full", "insufficient_space")
        assert summary.active_version == "1.0"
        assert agent.active_model is not None and agent.active_model.version == "1.0"
        wait_for(
            lambda: ("install_failed", "insufficient_space") in event_codes(h, "gw-full"),
            10,
            "the insufficient_space event",
        )
        # Refused before the first block: nothing of it is on the disk.
        assert not any(big.bundles[0].sha256 in p for p in agent.fetcher.blocks_by_path)
        leftovers = [
            p
            for sub in ("partial", "downloads")
            if (disk / "state" / sub).exists()
            for p in (disk / "state" / sub).rglob("*")
            if p.is_file()
        ]
        assert leftovers == []

        h.deploy("3.0", "gw-full")
        h.wait_active(agent, "3.0")
        assert infer(agent)["model"]["version"] == "3.0"
        agent.stop()


def test_device_installs_on_its_own_once_space_is_freed(harness: Harness, tmp_path: Path) -> None:
    """No redeploy, no human on the device: freeing space is enough."""
    h = harness
    disk = tmp_path / "small-disk"
    with small_filesystem(disk, 8 * 2**20) as skip:
        if skip:
            pytest.skip(skip)
        h.register("1.0")
        h.register("2.0", wide_model(hidden=20_000))  # about 1.6 MB
        h.enroll("gw-freed")
        config = h.agent_config("gw-freed").with_overrides(state_dir=disk / "state")
        agent = h.start_agent(config)
        h.deploy("1.0", "gw-freed")
        h.wait_active(agent, "1.0")
        # Something else on the device fills most of the disk.
        filler = disk / "other-app.log"
        filler.write_bytes(b"\0" * (5 * 2**20))

        h.deploy("2.0", "gw-freed")
        h.wait_error("gw-freed", "insufficient_space")
        assert agent.active_model is not None and agent.active_model.version == "1.0"

        filler.unlink()
        h.wait_active(agent, "2.0", timeout_s=60)
        assert infer(agent)["model"]["version"] == "2.0"
        wait_for(lambda: h.summary("gw-freed").last_error_code is None, 10, "error cleared")
        agent.stop()
