"""A TFLite-only gateway is never sent an ONNX bundle (issue 12), end to end.

A real controller and broker, a real agent with both runtimes in this process,
and a real agent in a child process that cannot import onnxruntime (a
TFLite-only install). The version has ONNX bundles only: a deploy to the
TFLite gateway is refused naming ``no bundle for runtimes [tflite]``, and a
rollout to both skips it with that reason while the other gateway installs.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.controller.errors import NoMatchingBundleError
from edgefleet.controller.rollout.engine import RolloutConfig, RolloutStatus
from edgefleet.controller.rollout.store import RolloutStore, Selector
from edgefleet.shared.link import BrokerSettings
from tests.e2e.harness import MODEL, Harness, infer, wait_for

pytestmark = pytest.mark.slow

AGENT_PROCESS = Path(__file__).parents[1] / "agent" / "agent_process.py"


@pytest.fixture
def fast_harness(tmp_path: Path, embedded_broker: BrokerSettings) -> Iterator[Harness]:
    h = Harness(
        tmp_path, embedded_broker, f"sqlite:///{tmp_path / 'registry.db'}", rollout_interval_s=0.3
    )
    yield h
    h.close()


def start_tflite_only_agent(h: Harness, device_id: str) -> subprocess.Popen[bytes]:
    spec = {
        "device_id": device_id,
        "state_dir": str(h.tmp / "agents" / device_id),
        "trust_root": str(h.root_file),
        "broker": dataclasses.asdict(h.broker),
        "hide": ["onnxruntime"],
    }
    spec_file = h.tmp / f"{device_id}.json"
    spec_file.write_text(json.dumps(spec))
    log = (h.tmp / f"{device_id}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, str(AGENT_PROCESS), str(spec_file)], stdout=log, stderr=log
    )


def test_tflite_only_gateway_is_skipped_with_the_reason(fast_harness: Harness) -> None:
    pytest.importorskip("ai_edge_litert")
    h = fast_harness
    registered = h.register("1.0")
    assert {b.runtime for b in registered.bundles} == {"onnxruntime"}
    tfl, both = h.device_id("tfl"), h.device_id("both")
    h.registry.enroll_device(tfl, tags=["gw"])
    h.registry.enroll_device(both, tags=["gw"])
    child = start_tflite_only_agent(h, tfl)
    try:
        agent = h.start_agent(h.agent_config("both"))
        wait_for(
            lambda: (
                {
                    d.id: d.runtimes for d in h.registry.list_devices() if d.online and d.runtimes
                }.get(tfl)
                == ("tflite",)
            ),
            60,
            "the TFLite-only agent to report its runtimes",
        )
        assert child.poll() is None

        with pytest.raises(NoMatchingBundleError, match=r"no bundle for runtimes \[tflite\]"):
            h.service.deploy(MODEL, "1.0", [tfl])

        store = RolloutStore(h.registry, actor="test")
        config = RolloutConfig(
            canary_count=1, soak_s=0.2, observe_s=0.5, device_timeout_s=30, min_executed=1
        )
        rollout = store.create(MODEL, "1.0", Selector(tags=("gw",)), config)
        wait_for(
            lambda: store.get(rollout.id).status is RolloutStatus.COMPLETED,
            60,
            f"the rollout to complete ({store.get(rollout.id).counts})",
        )
        h.wait_active(agent, "1.0")
        assert infer(agent)["model"]["version"] == "1.0"
        assert store.get(rollout.id).counts == {"updated": 1}
        skipped = [d for d in store.decisions(rollout.id) if d.kind == "skipped"]
        assert [d.device_id for d in skipped] == [tfl]
        assert "no bundle for runtimes [tflite]" in skipped[0].reason

        # The gateway was never sent anything, so it neither tried nor refused.
        assert h.registry.desired_for(tfl) is None
        summary = h.summary("tfl")
        assert summary.last_error_code is None
        assert child.poll() is None
    finally:
        child.terminate()
        child.wait(30)
