"""A poisoned telemetry row cannot keep a rollout "running" forever (issue 9, item 5).

Two rows with ``requests = 2**63 - 1`` made the health query's ``SUM``
overflow on SQLite, so every step of the rollout failed with a traceback;
on PostgreSQL the same rows (errors as large as requests) judged the canary
by numbers no device can produce. The rows are inserted straight through
SQL, as an older version or a bug could have stored them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import sqlalchemy as sa

from edgefleet.controller.registry import Registry
from edgefleet.controller.registry import models as m
from edgefleet.controller.rollout.engine import DeviceState, RolloutStatus
from edgefleet.controller.rollout.store import RolloutStore, Selector
from edgefleet.controller.trust import TrustRepository
from tests.controller.rollout.test_store import CFG, Fleet, signer

INT64_MAX = 2**63 - 1


@pytest.fixture
def registry(database_url: str) -> Iterator[Registry]:
    r = Registry(database_url)
    yield r
    r.close()


@pytest.fixture
def repo(tmp_path: Path) -> TrustRepository:
    return TrustRepository.init(tmp_path / "repository")


def test_a_poisoned_row_cannot_stall_or_decide_a_rollout(
    registry: Registry, repo: TrustRepository
) -> None:
    fleet = Fleet(registry, repo, 4)
    for device_id in fleet.ids:
        fleet.telemetry(device_id, "1.0", 50, 0, 3.0)
    store = RolloutStore(registry, actor="c1")
    info = store.create("m", "2.0", Selector(tags=("t",)), CFG)
    store.step(info.id, signer(repo))  # type: ignore[arg-type]
    desired = registry.desired_for("d00")
    assert desired is not None
    fleet.report("d00", fleet.ref("2.0"), deployment=info.id, generation=desired.generation)
    store.step(info.id, signer(repo))  # type: ignore[arg-type]
    assert store.devices(info.id)[0].state is DeviceState.OBSERVING

    poisoned = {
        "device_id": "d00",
        "at": m.utcnow(),
        "window_s": 1.0,
        "requests": INT64_MAX,
        "errors": INT64_MAX,
        "p50_ms": -1.0,
        "p95_ms": float("inf"),
        "p99_ms": None,
        "model_version": "2.0",
        "rss_bytes": INT64_MAX,
        "cpu_percent": -1.0,
    }
    with registry.engine.begin() as connection:
        connection.execute(sa.insert(cast("sa.Table", m.TelemetryRecord.__table__)), [poisoned] * 2)
    fleet.telemetry("d00", "2.0", 40, 0, 3.0)

    result = store.step(info.id, signer(repo))  # type: ignore[arg-type]
    assert result is not None
    d00 = store.devices(info.id)[0]
    assert d00.state is DeviceState.UPDATED
    # Judged on the valid window only: 40 requests, no errors.
    story = [d.reason for d in store.decisions(info.id) if d.device_id == "d00"]
    assert any("40 requests, 0 errors" in reason for reason in story), story
    assert store.get(info.id).status is RolloutStatus.RUNNING
