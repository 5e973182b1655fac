"""Issue 10's worst regression: ``deploy`` said "published" and nothing happened.

The CLI is a client of the controller: it never connects to a broker itself.
Without ``--api`` a deploy only records the desired state; the running
``edgefleet serve`` publishes it, and ``devices``/``status`` flag any desired
state that is not published, or that no device acknowledged within
``[service] ack_warning_s``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from edgefleet.controller import cli as cli_package
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings, MqttLink
from tests.controller.cli.runner import run
from tests.e2e.harness import wait_for

EDGEFLEET = [sys.executable, "-c", "from edgefleet.controller.cli import main; main()"]

# Only these run a broker or the service on purpose: `serve` is the service,
# `demo` runs a whole demo fleet on one machine.
SERVICE_MODULES = {"home.py", "demo.py"}
BROKER_NAMES = {"paho", "MqttLink", "publish_desired_states", "ControllerService", "EmbeddedBroker"}


def test_no_command_module_but_serve_and_demo_can_reach_a_broker() -> None:
    package = Path(cli_package.__file__).parent
    for module in sorted(package.glob("*.py")):
        if module.name in SERVICE_MODULES:
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {node.module or "", *(a.name for a in node.names)}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            found = {n for n in names for bad in BROKER_NAMES if bad in n}
            assert not found, f"{module.name} imports {found}: only `serve` publishes"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}


def test_a_deploy_without_a_service_is_recorded_flagged_and_published_when_serve_starts(
    tmp_path: Path, embedded_broker: BrokerSettings
) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(
        f'home = "state"\n[broker]\nhost = "{embedded_broker.host}"\n'
        f"port = {embedded_broker.port}\n"
        f'[service]\nclient_id = "no-publish-{os.getpid()}-{id(tmp_path)}"\n'
        "maintenance_interval_s = 0.5\nack_warning_s = 3600\n"
        "[api]\nenabled = false\n"
    )
    assert run(config, "init").exit_code == 0
    model = tmp_path / "m.onnx"
    model.write_bytes(build_demo_model())
    registered = run(config, "model", "register", str(model), "--name", "m", "--version", "1")
    assert registered.exit_code == 0, registered.output
    device = f"np-{os.getpid()}-{id(tmp_path) % 100000}"
    enrolled = run(config, "device", "enroll", device, "--out", str(tmp_path / "agent"))
    assert enrolled.exit_code == 0, enrolled.output

    # Watch the device's desired-state topic on the fleet's broker.
    seen: list[bytes] = []
    probes: list[bytes] = []
    lock = threading.Lock()
    topic = str(DeviceTopic(device, Channel.DESIRED))
    probe_topic = f"test/no-publish/{device}"
    watcher = MqttLink(
        BrokerSettings(host=embedded_broker.host, port=embedded_broker.port),
        f"watch-{device}",
    )

    def on_desired(_topic: str, payload: bytes, _retained: bool) -> None:
        with lock:
            seen.append(payload)

    def on_probe(_topic: str, payload: bytes, _retained: bool) -> None:
        with lock:
            probes.append(payload)

    watcher.subscribe(topic, on_desired)
    watcher.subscribe(probe_topic, on_probe)
    watcher.start(wait=True)
    serve: subprocess.Popen[bytes] | None = None
    try:
        deployed = run(config, "deploy", "m", "1", "--device", device, "--json")
        assert deployed.exit_code == 0, deployed.output
        data = json.loads(deployed.output)
        assert data["via"] == "registry" and data["published"] == 0
        assert data["unpublished"] == [device]

        # Nothing reached the broker: a probe sent after the deploy comes back
        # through the same subscription path, and no desired state came before it.
        assert watcher.publish(probe_topic, b"after-deploy", qos=1, wait_s=30)
        wait_for(lambda: bool(probes), 30, "the probe to come back")
        with lock:
            assert seen == [], "the CLI published a desired state itself"

        # devices and status say nobody delivered it.
        rows = {r["id"]: r for r in json.loads(run(config, "devices", "--json").output)}
        assert rows[device]["delivery"] == "unpublished"
        status = run(config, "status")
        assert f"desired states unpublished: 1 ({device})" in status.output

        # `edgefleet serve` starts and publishes what was recorded.
        serve = subprocess.Popen(
            [*EDGEFLEET, "--config", str(config), "serve"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        wait_for(lambda: bool(seen), 60, "serve to publish the recorded desired state")
        assert serve.poll() is None
        with lock:
            desired = json.loads(seen[0])
        assert desired["model"]["name"] == "m" and desired["model"]["version"] == "1"

        def delivery() -> str:
            rows = json.loads(run(config, "devices", "--json").output)
            return str({r["id"]: r for r in rows}[device]["delivery"])

        wait_for(lambda: delivery() == "waiting", 30, "the registry to mark it published")
    finally:
        watcher.stop()
        if serve is not None:
            serve.terminate()
            serve.communicate(timeout=30)

    # No device ever reports it: with [service] ack_warning_s = 0 it is flagged,
    # without any command-line flag.
    text = config.read_text().replace("ack_warning_s = 3600", "ack_warning_s = 0")
    config.write_text(text)
    rows = {r["id"]: r for r in json.loads(run(config, "devices", "--json").output)}
    assert rows[device]["delivery"] == "unacknowledged"
    status = run(config, "status")
    assert f"desired states unacknowledged: 1 ({device})" in status.output
    assert "published more than 0s ago and not reported by the device" in status.output


def test_deploy_wait_without_a_service_times_out_saying_unpublished(
    home: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_demo_model())
    assert (
        run(home, "model", "register", str(model), "--name", "m", "--version", "1").exit_code == 0
    )
    assert run(home, "device", "enroll", "gw-1", "--out", str(tmp_path / "a")).exit_code == 0
    result = run(home, "deploy", "m", "1", "--device", "gw-1", "--wait", "--timeout", "0", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "deploy_timeout" and error["pending"] == {"gw-1": "unpublished"}
    assert error["active"] == [] and error["deployment"]
    assert result.stdout == ""
