"""``edgefleet demo``: the whole path on one machine, for real.

An embedded broker (unless one is given), a controller on SQLite and a fresh
TUF repository in a temporary directory, N agents with their own MQTT
connections, state directories and HTTP endpoints. The demo compiles the
packaged demo model for the profile this machine matches (the compile report
says which variant won and why), signs the bundles, deploys to every agent -
each gets the variant for its profile - sends inference requests through each
agent's local endpoint and reads the results back from the controller's
registry, so what it prints is what the controller saw.

Each agent is a real process (``python -m edgefleet.agent --config FILE``)
with its own config file and log under the work directory, exactly as on a
gateway: the controller never imports the agent (docs/architecture.md), and
everything the demo learns about an agent comes over MQTT into the registry
or from the agent's HTTP endpoint.

``demo --dashboard`` passes ``hold=``: the fleet then stays up inside
:func:`serve_dashboard`, which starts the same API server ``serve`` runs,
creates an operator token, compiles a second version to roll out, and keeps
inference traffic flowing until Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.controller.broker import EmbeddedBroker
from edgefleet.controller.catalog import register_compiled
from edgefleet.controller.compiler import Profile, match_profile
from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.demo_model import build_demo_model, demo_inputs
from edgefleet.controller.registry import Registry
from edgefleet.controller.service import ControllerService
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.errors import ProtocolError
from edgefleet.protocols.messages import ModelRef, ReportedState
from edgefleet.shared.durable import atomic_write
from edgefleet.shared.hardware import detect_hardware
from edgefleet.shared.link import BrokerSettings

__all__ = [
    "DashboardSession",
    "DemoDevice",
    "DemoFleet",
    "DemoResult",
    "run_demo",
    "serve_dashboard",
]

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


@dataclass
class DemoFleet:
    """The running demo, handed to ``run_demo(hold=...)``: valid only inside that call."""

    service: ControllerService
    registry: Registry
    repository: TrustRepository
    work: Path
    broker: BrokerSettings
    profile: Profile
    agent_urls: dict[str, str]
    result: DemoResult

    def infer_round(self) -> int:
        """One inference request through each agent's endpoint; returns how many succeeded."""
        inputs = demo_inputs(1)
        body = {"inputs": {k: v.tolist() for k, v in inputs.items()}}
        done = 0
        for device_id, url in self.agent_urls.items():
            try:
                _post_json(f"{url}/v1/infer", body, timeout_s=5.0)
                done += 1
            except (OSError, ValueError) as exc:
                log.debug("inference on %s failed: %s", device_id, exc)
        return done

    def register_version(self, version: str) -> None:
        """Compile and sign another version of the demo model (something to roll out)."""
        register_compiled(
            self.registry,
            self.repository,
            build_demo_model(),
            name=DEMO_MODEL,
            version=version,
            profiles=[self.profile],
            calibration=demo_inputs(64, seed=3),
            validation=demo_inputs(300, seed=2),
            latency_iterations=30,
            description=f"edgefleet demo MLP classifier, {version}",
        )


@dataclass
class DashboardSession:
    """What ``demo --dashboard`` prints: where the dashboard is and a token to sign in with."""

    url: str
    token: str
    role: str


def serve_dashboard(
    fleet: DemoFleet,
    *,
    address: str = "127.0.0.1:0",
    role: str = "operator",
    say: Callable[[str], None] = lambda _msg: None,
    ready: Callable[[DashboardSession], None] = lambda _s: None,
    stop: threading.Event | None = None,
    next_version: str | None = "1.1.0",
    infer_interval_s: float = 1.0,
) -> None:
    """Serve the management API and dashboard of ``fleet`` until ``stop`` is set (or Ctrl-C).

    The same server ``serve`` runs (:func:`~edgefleet.controller.api.server.start_api`).
    A token of ``role`` is created and handed to ``ready``; ``next_version``
    of the demo model is compiled so there is something to roll out from the
    page, and every agent gets one inference request per ``infer_interval_s``
    so the charts move.
    """
    from edgefleet.controller.api.server import start_api
    from edgefleet.controller.config import ApiSettings
    from edgefleet.controller.registry.tokens import TokenStore

    if next_version is not None:
        say(f"compiling {DEMO_MODEL}@{next_version}, to roll out from the dashboard")
        fleet.register_version(next_version)
    server = start_api(fleet.service, ApiSettings(address=address), ca_dir=fleet.work / "ca")
    try:
        created = TokenStore(fleet.registry.database).create(f"demo-{role}", role)
        session = DashboardSession(url=f"{server.url}/", token=created.token, role=role)
        ready(session)
        stop = stop or threading.Event()
        while not stop.wait(infer_interval_s):
            fleet.infer_round()
    finally:
        server.stop()


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


# Agents publish telemetry this often, so the demo sees its requests promptly.
_TELEMETRY_INTERVAL_S = 0.5
# How long a stopping agent may take to say goodbye (SIGTERM) before it is killed.
_AGENT_STOP_S = 15.0


@dataclass
class _AgentProcess:
    """One agent, run as its own process exactly as on a gateway."""

    device_id: str
    url: str
    log_file: Path
    process: subprocess.Popen[bytes]

    @property
    def exit_code(self) -> int | None:
        """``None`` while the agent runs."""
        return self.process.poll()


def _free_port() -> int:
    """A loopback port nobody listens on right now, for one agent's HTTP endpoint."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _toml_table(values: Mapping[str, object]) -> list[str]:
    return [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]


def _write_agent_config(
    path: Path, device_id: str, state_dir: Path, trust_root: Path, broker: BrokerSettings, port: int
) -> None:
    """The agent's config file, in the format of ``deploy/agent.example.toml``."""
    lines = [
        *_toml_table(
            {
                "device_id": device_id,
                "state_dir": state_dir,
                "trust_root": trust_root,
                "telemetry_interval_s": _TELEMETRY_INTERVAL_S,
            }
        ),
        "",
        "[broker]",
        *_toml_table(dataclasses.asdict(broker)),
        "",
        "[http]",
        *_toml_table({"port": port}),
        "",
        "[transfer]",
        *_toml_table({"request_timeout_s": 5.0}),
    ]
    # Owner-only: the [broker] table may hold a password.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")


def _start_agent(
    work: Path, device_id: str, trust_root: Path, broker: BrokerSettings
) -> _AgentProcess:
    """``python -m edgefleet.agent --config agents/ID/agent.toml``, logging to ``agent.log``."""
    # Absolute paths: the agent resolves relative ones against its config's folder.
    home = (work / "agents" / device_id).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = home / "agent.toml"
    _write_agent_config(config, device_id, home / "state", trust_root.resolve(), broker, port)
    log_file = home / "agent.log"
    with log_file.open("wb") as out:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "edgefleet.agent", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=home,
        )
    return _AgentProcess(device_id, f"http://127.0.0.1:{port}", log_file, process)


def _stop_agents(fleet: list[_AgentProcess]) -> None:
    """SIGTERM every agent (a clean goodbye, as systemd stops it), then reap; kill stragglers."""
    for agent in fleet:
        if agent.exit_code is None:
            agent.process.terminate()
    deadline = time.monotonic() + _AGENT_STOP_S
    for agent in fleet:
        try:
            agent.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("agent %s did not stop in time; killing it", agent.device_id)
            agent.process.kill()
            agent.process.wait()


def _active_model(reported: Mapping[str, Any] | None) -> ModelRef | None:
    """The model a device reported it serves, from the registry's copy of its report."""
    if reported is None:
        return None
    try:
        return ReportedState.from_dict(reported).active
    except ProtocolError:
        return None


def run_demo(
    agents: int = 5,
    *,
    requests_per_agent: int = 20,
    broker: BrokerSettings | None = None,
    workdir: Path | None = None,
    timeout_s: float = 45.0,
    say: Callable[[str], None] = lambda _msg: None,
    hold: Callable[[DemoFleet], None] | None = None,
) -> DemoResult:
    """Run the end-to-end demo and report what the controller saw per device.

    Args:
        hold: called with the running fleet once the demo is done, before
            anything stops; the fleet (broker, controller, agents) runs until
            it returns. ``demo --dashboard`` serves the dashboard from here.
    """
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

        # The agents start (one process each) before the compile, so that their
        # start-up (a Python process loading onnxruntime, TUF and paho) overlaps
        # it. The compile times its candidates in interleaved rounds, so the
        # extra load slows all of them alike rather than skewing the choice.
        root_file = work / "root.json"
        atomic_write(root_file, repository.root_bytes())
        device_ids = [f"gw-{i + 1:02d}" for i in range(agents)]
        for device_id in device_ids:
            registry.enroll_device(device_id, hardware_class="generic", tags=("demo",))
        fleet: list[_AgentProcess] = []
        stack.callback(_stop_agents, fleet)
        for device_id in device_ids:
            fleet.append(_start_agent(work, device_id, root_file, broker))
        say(f"started {agents} agents, one process each (logs under {work / 'agents'})")

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

        def all_reported() -> bool:
            devices = {d.id: d for d in registry.list_devices()}
            return all(
                devices[a.device_id].profile is not None or a.exit_code is not None for a in fleet
            )

        # Deploy once every device has reported its hardware, so each gets the
        # variant for its profile straight away (a later report would re-target
        # it, at the cost of a second download).
        _wait(all_reported, 10.0)
        deployment = service.deploy(DEMO_MODEL, DEMO_VERSION, device_ids)
        say(f"deployment {deployment.id} to {len(device_ids)} devices")

        def all_settled() -> bool:
            devices = {d.id: d for d in registry.list_devices()}
            for agent in fleet:
                if agent.exit_code is not None:
                    continue  # it will not settle; the result says why
                info = devices[agent.device_id]
                desired = registry.desired_for(agent.device_id)
                active = _active_model(info.reported)
                done = (
                    desired is not None
                    and desired.model is not None
                    and active is not None
                    and active.target == desired.model.target
                )
                if not done and info.last_error is None:
                    return False
            return True

        _wait(all_settled, timeout_s)
        active_models = {
            d.id: model
            for d in registry.list_devices()
            if (model := _active_model(d.reported)) is not None
        }
        serving = [a for a in fleet if a.device_id in active_models and a.exit_code is None]
        inputs = demo_inputs(1)
        body = {"inputs": {k: v.tolist() for k, v in inputs.items()}}
        for agent in serving:
            for _ in range(requests_per_agent):
                try:
                    _post_json(f"{agent.url}/v1/infer", body)
                except OSError as exc:
                    log.warning("inference on %s failed: %s", agent.device_id, exc)
        say(f"sent {requests_per_agent} inference requests through each agent's local endpoint")

        def telemetry_stored() -> bool:
            # Each agent publishes a telemetry window every _TELEMETRY_INTERVAL_S.
            rows = {s.device_id: s for s in registry.device_summaries()}
            return all(
                a.device_id in rows and rows[a.device_id].inferences >= requests_per_agent
                for a in serving
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
            device_id: model.target.rsplit("/", 1)[-1].removesuffix(".bundle")
            for device_id, model in active_models.items()
        }
        exited = {
            a.device_id: f"agent process exited with code {a.exit_code} (log: {a.log_file})"
            for a in fleet
            if a.exit_code is not None
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
                    error=summary.last_error_message or exited.get(summary.device_id),
                )
            )
        result.elapsed_s = time.monotonic() - started
        if hold is not None:
            hold(
                DemoFleet(
                    service=service,
                    registry=registry,
                    repository=repository,
                    work=work,
                    broker=broker,
                    profile=profile,
                    agent_urls={a.device_id: a.url for a in serving},
                    result=result,
                )
            )
        return result
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack re-raises
