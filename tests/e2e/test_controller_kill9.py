"""kill -9 the real controller process mid-rollout; a new one carries on.

The controller runs as ``edgefleet serve`` in its own process on SQLite and a
Mosquitto the fixture owns; the agents run here. The process is killed with
SIGKILL while the rollout is between waves, restarted, and must finish the
rollout with every device started exactly once and installed exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from edgefleet.agent.config import AgentConfig, HttpSettings
from edgefleet.agent.daemon import Agent
from edgefleet.agent.fetcher import TransferSettings
from edgefleet.controller.catalog import register_model
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.controller.registry import Registry
from edgefleet.controller.rollout.engine import RolloutConfig, RolloutStatus
from edgefleet.controller.rollout.store import RolloutStore, Selector
from edgefleet.controller.trust import TrustRepository
from edgefleet.shared.link import BrokerSettings
from tests.e2e.harness import wait_for

pytestmark = pytest.mark.slow

DEVICES = 6


def _serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    code = "from edgefleet.controller.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, "--config", str(config), "-v", "serve"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        env={**os.environ, "EDGEFLEET_DATABASE_URL": ""},
    )


def test_kill_9_mid_rollout_then_restart_finishes_without_repeats(
    tmp_path: Path, mosquitto: BrokerSettings
) -> None:
    home = tmp_path / "home"
    config = tmp_path / "controller.toml"
    config.write_text(
        f'home = "home"\n[broker]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\n'
        "[service]\nmaintenance_interval_s = 0.5\ningest_flush_s = 0.1\n"
        "rollout_interval_s = 0.2\n"
    )
    home.mkdir()
    registry = Registry(f"sqlite:///{(home / 'registry.db').resolve()}")
    repository = TrustRepository.init(home / "repository")
    (tmp_path / "root.json").write_bytes(repository.root_bytes())
    register_model(registry, repository, build_demo_model(), name="k9", version="1.0")
    token = os.urandom(3).hex()
    agents: list[Agent] = []
    log = tmp_path / "controller.log"
    controller = _serve(config, log)
    try:
        for i in range(DEVICES):
            device_id = f"k9-{i}-{token}"
            registry.enroll_device(device_id, tags=[f"k9-{token}"])
            agent = Agent(
                AgentConfig(
                    device_id=device_id,
                    state_dir=tmp_path / "agents" / device_id,
                    trust_root=tmp_path / "root.json",
                    telemetry_interval_s=0.5,
                    retry_backoff_s=0.5,
                    broker=mosquitto,
                    http=HttpSettings(port=0),
                    transfer=TransferSettings(request_timeout_s=2.0),
                )
            )
            agent.start()
            agents.append(agent)
        store = RolloutStore(registry, actor="test")
        rollout = store.create(
            "k9",
            "1.0",
            Selector(tags=(f"k9-{token}",)),
            RolloutConfig(
                canary_count=1,
                base_rate=1,
                increment_factor=2.0,
                max_rate=4,
                max_in_flight=4,
                soak_s=1.5,
                observe_s=1.0,
                device_timeout_s=60.0,
                min_executed=2,
            ),
        )

        def some_but_not_all() -> bool:
            updated = store.get(rollout.id).counts.get("updated", 0)
            return 1 <= updated < DEVICES

        wait_for(some_but_not_all, 60, f"a partial rollout (log: {log})")
        controller.send_signal(signal.SIGKILL)
        controller.wait(10)
        assert store.get(rollout.id).status is RolloutStatus.RUNNING
        time.sleep(1.0)  # devices keep installing what they were told; nobody steps
        controller = _serve(config, log)
        wait_for(
            lambda: store.get(rollout.id).status is not RolloutStatus.RUNNING,
            90,
            f"the rollout to finish after the restart (log: {log})",
        )
        info = store.get(rollout.id)
        story = "\n".join(
            f"{d.kind} {d.device_id}: {d.reason}" for d in store.decisions(rollout.id)
        )
        assert info.status is RolloutStatus.COMPLETED, story
        assert info.counts == {"updated": DEVICES}, story
        starts = Counter(
            d.device_id for d in store.decisions(rollout.id) if d.kind == "device_in_flight"
        )
        assert sorted(starts.values()) == [1] * DEVICES, starts
        assert all(a.installs == 1 for a in agents)
    finally:
        controller.kill()
        controller.wait(10)
        for agent in agents:
            agent.stop()
        registry.close()
