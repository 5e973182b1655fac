"""The agent imports only what it needs now (issue 12, footprint).

In a fresh interpreter: importing the agent, and starting one that connects
to a real broker and serves nothing, loads no inference runtime, no
python-tuf (with urllib3) and no ``cryptography``. Those come with the first
install (TUF verification) or enrollment; a runtime with the first model that
needs it. ``bench/agent_footprint.py`` measures what that saves.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from edgefleet.shared.link import BrokerSettings

HEAVY = (
    "onnxruntime",
    "ai_edge_litert",
    "tflite_runtime",
    "tuf",
    "securesystemslib",
    "urllib3",
    "cryptography",
)

_CHILD = """
import json, sys, time
from pathlib import Path
import edgefleet.agent.daemon, edgefleet.agent.config
imported = sorted(m for m in {heavy!r} if m in sys.modules)
from edgefleet.agent.config import AgentConfig, HttpSettings
from edgefleet.agent.daemon import Agent
from edgefleet.shared.link import BrokerSettings
spec = json.loads(sys.argv[1])
agent = Agent(AgentConfig(
    device_id="footprint-1",
    state_dir=Path(spec["state_dir"]),
    trust_root=Path(spec["trust_root"]),
    broker=BrokerSettings(**spec["broker"]),
    http=HttpSettings(port=0),
))
agent.start()
deadline = time.monotonic() + 60
while not agent.link.connected and time.monotonic() < deadline:
    time.sleep(0.05)
connected = agent.link.connected
running = sorted(m for m in {heavy!r} if m in sys.modules)
agent.stop()
print(json.dumps({{"imported": imported, "running": running, "connected": connected}}))
"""


def test_a_connected_idle_agent_loads_no_runtime_tuf_or_cryptography(
    tmp_path: Path, embedded_broker: BrokerSettings
) -> None:
    root = tmp_path / "root.json"
    root.write_text("{}")  # only copied at start; TUF reads it at the first install
    spec = {
        "state_dir": str(tmp_path / "state"),
        "trust_root": str(root),
        "broker": dataclasses.asdict(embedded_broker),
    }
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(heavy=HEAVY), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["connected"] is True
    assert result["imported"] == []
    assert result["running"] == []


def test_the_heavy_modules_are_importable_here() -> None:
    """The check above is meaningful only where these are installed (the dev install)."""
    code = "import onnxruntime, tuf.ngclient, cryptography.x509, urllib3"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
