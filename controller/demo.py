"""``edgefleet demo``: the whole path on one machine, for real.

An embedded broker (unless one is given), a controller on SQLite and a fresh
TUF repository in a temporary directory, N agents with their own MQTT
connections, state directories and HTTP endpoints. The demo compiles the
packaged demo model for the profile this machine matches (the compile report
says which variant won and why), signs the bundles, deploys to every agent -
each gets the variant for its profile - sends inference requests through each
agent's local endpoint and reads the results back from the controller's
registry, so what it prints is what the controller saw.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.agent.config import AgentConfig, HttpSettings
from edgefleet.agent.daemon import Agent
from edgefleet.agent.fetcher import TransferSettings
from edgefleet.controller.broker import EmbeddedBroker
from edgefleet.controller.catalog import register_compiled
from edgefleet.controller.compiler import match_profile
from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.demo_model import build_demo_model, demo_inputs
from edgefleet.controller.registry import Registry
from edgefleet.controller.service import ControllerService
from edgefleet.controller.trust import TrustRepository
from edgefleet.shared.hardware import detect_hardware
from edgefleet.shared.link import BrokerSettings

__all__ = ["DemoDevice", "DemoResult", "run_demo"]

log = logging.getLogger(__name__)

DEMO_MODEL = "demo-mlp"
DEMO_VERSION = "1.0.0"


@dataclass(frozen=True)
class DemoDevice:
    id: str
    model_version: str | None
    status: str
    inferences: int
    p50_ms: float | None
    variant: str | None = None
    error: str | None = None


@dataclass
class DemoResult:
    model: str
    version: str
    broker: str
    elapsed_s: float
    devices: list[DemoDevice] = field(default_factory=list)
    profile: str | None = None
    compile_report: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return bool(self.devices) and all(
            d.status == "active" and d.model_version == self.version and d.inferences > 0
            for d in self.devices
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "model": self.model,
            "version": self.version,
            "broker": self.broker,
            "elapsed_s": round(self.elapsed_s, 2),
            "profile": self.profile,
            "compile_report": self.compile_report,
            "devices": [asdict(d) for d in self.devices],
        }


def _post_json(url: str, body: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"the demo only talks to loopback endpoints, not {url}")
    request = urllib.request.Request(  # noqa: S310 - checked above
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - loopback
        result: dict[str, Any] = json.loads(response.read())
        return result


def _wait(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_demo(
    agents: int = 5,
    *,
    requests_per_agent: int = 20,
    broker: BrokerSettings | None = None,
    workdir: Path | None = None,
    timeout_s: float = 45.0,
    say: Callable[[str], None] = lambda _msg: None,
) -> DemoResult:
    """Run the end-to-end demo and report what the controller saw per device."""
    if agents < 1:
        raise ValueError("the demo needs at least one agent")
    started = time.monotonic()
    with ExitStack() as stack:
        work = stack.enter_context(_workdir(workdir))
        if broker is None:
            embedded = stack.enter_context(EmbeddedBroker())
            broker = BrokerSettings(host=embedded.host, port=embedded.port)
            say(f"embedded MQTT broker on {embedded.host}:{embedded.port}")
        registry = Registry(f"sqlite:///{work / 'registry.db'}")
        stack.callback(registry.close)
        repository = TrustRepository.init(work / "repository")
        service = ControllerService(
            registry,
            repository,
            broker,
            ServiceSettings(
                client_id=f"edgefleet-demo-controller-{work.name}",
                maintenance_interval_s=1.0,
                ingest_flush_s=0.2,
            ),
        )
        service.start()
        stack.callback(service.stop)

        profile = match_profile(detect_hardware())
        say(
            f"compiling {DEMO_MODEL}@{DEMO_VERSION} for profile {profile.name} "
            "(this machine's class)"
        )
        registered = register_compiled(
            registry,
            repository,
            build_demo_model(),
            name=DEMO_MODEL,
            version=DEMO_VERSION,
            profiles=[profile],
            calibration=demo_inputs(64, seed=3),
            validation=demo_inputs(300, seed=2),
            latency_iterations=30,
            description="edgefleet demo MLP classifier",
        )
        report = registered.reports[profile.name]
        for line in report.format_table().splitlines():
            say(f"  {line}")
        say(
            f"registered release {registered.version.release}; signed TUF targets: "
            + ", ".join(b.target_path for b in registered.bundles)
        )

        root_file = work / "root.json"
        root_file.write_bytes(repository.root_bytes())
        fleet: list[Agent] = []
        for i in range(agents):
            device_id = f"gw-{i + 1:02d}"
            registry.enroll_device(device_id, hardware_class="generic", tags=("demo",))
            agent = Agent(
                AgentConfig(
                    device_id=device_id,
                    state_dir=work / "agents" / device_id,
                    trust_root=root_file,
                    telemetry_interval_s=1.0,
                    broker=broker,
                    http=HttpSettings(port=0),
                    transfer=TransferSettings(request_timeout_s=5.0),
                )
            )
            agent.start()
            stack.callback(agent.stop)
            fleet.append(agent)
        say(f"started {agents} agents")

        device_ids = [a.device_id for a in fleet]

        def all_reported() -> bool:
            devices = {d.id: d for d in registry.list_devices()}
            return all(devices[i].profile is not None for i in device_ids)

        # Deploy once every device has reported its hardware, so each gets the
        # variant for its profile straight away (a later report would re-target
        # it, at the cost of a second download).
        _wait(all_reported, 10.0)
        deployment = service.deploy(DEMO_MODEL, DEMO_VERSION, device_ids)
        say(f"deployment {deployment.id} to {len(device_ids)} devices")

        def all_settled() -> bool:
            for agent in fleet:
                desired = registry.desired_for(agent.device_id)
                active = agent.active_model
                done = (
                    desired is not None
                    and desired.model is not None
                    and active is not None
                    and active.target == desired.model.target
                )
                if not done and agent.reported_state().last_error is None:
                    return False
            return True

        _wait(all_settled, timeout_s)
        inputs = demo_inputs(1)
        body = {"inputs": {k: v.tolist() for k, v in inputs.items()}}
        for agent in fleet:
            if agent.active_model is None:
                continue
            for _ in range(requests_per_agent):
                try:
                    _post_json(f"{agent.server.url}/v1/infer", body)
                except OSError as exc:
                    log.warning("inference on %s failed: %s", agent.device_id, exc)
            agent.flush_telemetry()
        say(f"sent {requests_per_agent} inference requests through each agent's local endpoint")

        def telemetry_stored() -> bool:
            rows = {s.device_id: s for s in registry.device_summaries()}
            return all(
                a.active_model is None
                or (a.device_id in rows and rows[a.device_id].inferences >= requests_per_agent)
                for a in fleet
            )

        _wait(telemetry_stored, 10.0)
        result = DemoResult(
            DEMO_MODEL,
            DEMO_VERSION,
            f"{broker.host}:{broker.port}",
            0.0,
            profile=profile.name,
            compile_report=report.to_dict(),
        )
        variants = {
            a.device_id: a.active_model.target.rsplit("/", 1)[-1].removesuffix(".bundle")
            for a in fleet
            if a.active_model is not None
        }
        for summary in sorted(registry.device_summaries(), key=lambda s: s.device_id):
            active = summary.active_version == DEMO_VERSION and summary.last_error_code is None
            result.devices.append(
                DemoDevice(
                    id=summary.device_id,
                    model_version=summary.active_version,
                    status="active" if active else (summary.state or "unknown"),
                    inferences=summary.inferences,
                    p50_ms=None if summary.p50_ms is None else round(summary.p50_ms, 3),
                    variant=variants.get(summary.device_id),
                    error=summary.last_error_message,
                )
            )
        result.elapsed_s = time.monotonic() - started
        return result
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack re-raises
