"""Run a real agent in its own process, for tests: ``python agent_process.py SPEC.json``.

SPEC is JSON: ``device_id``, ``state_dir``, ``trust_root``, ``broker`` (the
fields of :class:`BrokerSettings`), optional ``hide`` (module names made
unimportable first, e.g. ``["onnxruntime"]`` for a TFLite-only gateway:
``sys.modules[name] = None`` makes ``import`` and ``find_spec`` both see them
as absent), optional ``agent`` (extra :class:`AgentConfig` fields) and
optional ``stall_after_s``: a thread then takes the agent's lock after that
many seconds and never gives it back, so its loops hang as in a deadlock.

It runs :meth:`Agent.run`, so SIGTERM stops it the way systemd does; the
test watches it through the broker and the registry (or its sd_notify socket).
After a clean stop it prints ``{"modules": [...]}``: which of the heavy
modules (runtimes, python-tuf, cryptography) the process ever imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    for name in spec.get("hide", ()):
        sys.modules[name] = None  # type: ignore[assignment]
    import logging

    from edgefleet.agent.config import AgentConfig, HttpSettings
    from edgefleet.agent.daemon import Agent
    from edgefleet.agent.fetcher import TransferSettings
    from edgefleet.shared.link import BrokerSettings

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = AgentConfig(
        device_id=spec["device_id"],
        state_dir=Path(spec["state_dir"]),
        trust_root=Path(spec["trust_root"]),
        broker=BrokerSettings(**spec["broker"]),
        http=HttpSettings(port=0),
        transfer=TransferSettings(request_timeout_s=2.0, max_attempts=3),
        telemetry_interval_s=0.5,
        retry_backoff_s=0.5,
        **spec.get("agent", {}),
    )
    agent = Agent(config)
    if "stall_after_s" in spec:
        import threading

        threading.Timer(float(spec["stall_after_s"]), agent._lock.acquire).start()
    agent.run()
    # After a clean stop: which heavy modules this process ever imported.
    heavy = ("onnxruntime", "ai_edge_litert", "tuf", "securesystemslib", "urllib3", "cryptography")
    print(json.dumps({"modules": sorted(m for m in heavy if m in sys.modules)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
