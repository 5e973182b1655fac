"""An agent that installed a model over the real path never loads python-tuf itself (issue 12).

TUF verification runs in a short-lived child process (agent/verifier.py), so
the serving process carries the runtime its model needs and not python-tuf,
securesystemslib, urllib3 or cryptography (about 15 MB of RSS; BENCHMARKS.md,
"Agent footprint"). Real controller, broker and TUF repository; the agent is a
process of its own, so nothing the test process imported can hide a leak.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import Harness, wait_for

pytestmark = pytest.mark.slow

AGENT_PROCESS = Path(__file__).parents[1] / "agent" / "agent_process.py"


def test_installing_a_model_leaves_no_tuf_in_the_agent(harness: Harness) -> None:
    harness.register("1.0")
    device_id = harness.enroll("lean")
    spec_file = harness.tmp / "lean.json"
    spec_file.write_text(
        json.dumps(
            {
                "device_id": device_id,
                "state_dir": str(harness.tmp / "agents" / device_id),
                "trust_root": str(harness.root_file),
                "broker": dataclasses.asdict(harness.broker),
            }
        )
    )
    log = (harness.tmp / "lean.log").open("wb")
    child = subprocess.Popen(
        [sys.executable, str(AGENT_PROCESS), str(spec_file)], stdout=subprocess.PIPE, stderr=log
    )
    try:
        wait_for(lambda: harness.summary("lean").online, 60, "the agent to connect")
        harness.deploy("1.0", "lean")
        wait_for(
            lambda: harness.summary("lean").active_version == "1.0", 60, "the model to be active"
        )
        child.terminate()
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == 0
    modules = json.loads(out.decode().splitlines()[-1])["modules"]
    assert modules == ["onnxruntime"]  # the model's runtime, and nothing of TUF's
