"""Agent footprint: RSS against a bare onnxruntime process, empty-agent RSS, install sizes.

Run from a checkout with the dev install (``pip install -e ".[all,dev]"``)::

    python bench/agent_footprint.py [--model-mb 3] [--json]

In one run, on this machine:

1. starts an embedded broker and a real controller (SQLite, TUF repository)
   and registers an ONNX model of about ``--model-mb`` MB;
2. starts a real agent in its own process and measures its RSS once it is
   connected and idle (*empty agent*), then deploys the model, waits for it to
   be active (timed: deploy to active, TUF verifier child included), serves
   ``--requests`` inferences over HTTP and measures again (*agent with
   model*); then restarts it, so that it restores the model from its slot,
   and measures once more (*restarted*);
3. starts a *bare* process that holds only what serving that model needs:
   numpy, onnxruntime with the same session (same file, same session options
   as :class:`~edgefleet.shared.runtime.OnnxRuntimeBackend`), and a paho MQTT
   client connected to the same broker; it runs the same inferences and is
   measured the same way;
4. prints the ratio agent / bare (issue 12's target: at most 1.1) and the
   on-disk size of what each agent extra installs (``agent``, ``agent-onnx``,
   ``agent-tflite``), summed from the installed distributions' RECORD files
   (importlib.metadata) following each extra's requirements on this platform.

RSS is ``VmRSS`` from ``/proc/<pid>/status``, read after the process has
settled (``--settle-s``). Each process is measured ``--repeat`` times and the
median is reported. Linux only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "footprint"
FEATURES = 64


# --------------------------------------------------------------------------- children
def child_bare(model_path: str, host: str, port: int, requests: int) -> None:
    """The baseline: numpy, onnxruntime with the agent's session options, paho connected."""
    import numpy as np
    import onnxruntime as ort
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bare-{os.getpid()}")
    client.connect(host, port)
    client.loop_start()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    feeds = {"features": np.full((1, FEATURES), 0.5, dtype=np.float32)}
    for _ in range(requests):
        session.run(None, feeds)
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes stdin
    client.loop_stop()


def child_agent(spec_file: str) -> None:
    """A real agent, configured from a JSON spec (see :func:`start_agent`)."""
    spec = json.loads(Path(spec_file).read_text())
    from edgefleet.agent.config import AgentConfig, HttpSettings
    from edgefleet.agent.daemon import Agent
    from edgefleet.shared.link import BrokerSettings

    config = AgentConfig(
        device_id=spec["device_id"],
        state_dir=Path(spec["state_dir"]),
        trust_root=Path(spec["trust_root"]),
        broker=BrokerSettings(**spec["broker"]),
        http=HttpSettings(port=spec["http_port"]),
        telemetry_interval_s=5.0,
    )
    Agent(config).run()


# --------------------------------------------------------------------------- measuring
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def rss_by_mapping(pid: int, top: int = 8) -> dict[str, int]:
    """RSS (KiB) per mapped file (``[anon]``, ``[heap]`` for memory), largest first."""
    sizes: dict[str, int] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if not parts[0].endswith(":"):  # a mapping's header line
            name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
        elif parts[0] == "Rss:":
            sizes[name] = sizes.get(name, 0) + int(parts[1])
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:top])


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def make_model(megabytes: float) -> bytes:
    """An MLP whose float32 weights take about ``megabytes`` MB."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    hidden = max(8, int(megabytes * 1e6 / 4 / (FEATURES + 4)))
    rng = np.random.default_rng(7)
    w1 = rng.normal(0, 0.1, (FEATURES, hidden)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (hidden, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "footprint",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def infer(port: int) -> None:
    body = json.dumps({"inputs": {"features": [[0.5] * FEATURES]}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our agent
        response.read()


# --------------------------------------------------------------------------- install size
def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def install_closure(extra: str) -> dict[str, int]:
    """Installed distributions ``edgefleet[extra]`` needs here, with their on-disk bytes.

    Follows Requires-Dist with markers evaluated for this platform and the
    requested extras, as pip would; sizes come from each distribution's
    RECORD. edgefleet itself counts as the size of its own packages.
    """
    from importlib import metadata

    from packaging.requirements import Requirement

    sizes: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    todo: list[tuple[str, frozenset[str]]] = [("edgefleet", frozenset({extra}))]
    while todo:
        name, extras = todo.pop()
        key = _canonical(name)
        fresh = {e for e in extras | {""} if (key, e) not in seen}
        if not fresh:
            continue
        seen.update((key, e) for e in fresh)
        dist = metadata.distribution(name)
        if key not in sizes:
            sizes[key] = _dist_bytes(dist) if key != "edgefleet" else _own_bytes()
        for raw in dist.requires or ():
            req = Requirement(raw)
            wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in fresh)
            if wanted:
                todo.append((req.name, frozenset(req.extras)))
    return sizes


def _dist_bytes(dist: Any) -> int:
    total = 0
    for f in dist.files or ():
        path = Path(str(dist.locate_file(f)))
        if path.is_file():
            total += path.stat().st_size
    return total


def _own_bytes() -> int:
    return sum(
        p.stat().st_size
        for part in ("protocols", "shared", "agent", "controller", "src")
        for p in (ROOT / part).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


# --------------------------------------------------------------------------- run
def _serves(port: int) -> bool:
    try:
        infer(port)
    except OSError:
        return False
    return True


def start_agent(
    tmp: Path, broker: Any, root_file: Path, device_id: str, port: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = port or free_port()
    spec = {
        "device_id": device_id,
        "state_dir": str(tmp / device_id),
        "trust_root": str(root_file),
        "broker": dataclasses.asdict(broker),
        "http_port": port,
    }
    spec_file = tmp / f"{device_id}.json"
    spec_file.write_text(json.dumps(spec))
    log = (tmp / f"{device_id}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child-agent", str(spec_file)], stdout=log, stderr=log
    )
    return proc, port


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from edgefleet.controller.broker import EmbeddedBroker
    from edgefleet.controller.catalog import register_model
    from edgefleet.controller.config import ServiceSettings
    from edgefleet.controller.registry import Registry
    from edgefleet.controller.service import ControllerService
    from edgefleet.controller.trust import TrustRepository
    from edgefleet.shared.link import BrokerSettings

    model = make_model(args.model_mb)
    result: dict[str, Any] = {"model_bytes": len(model), "requests": args.requests}
    empty: list[int] = []
    loaded: list[int] = []
    restarted: list[int] = []
    install_s: list[float] = []
    bare: list[int] = []
    with tempfile.TemporaryDirectory() as tmp_name, EmbeddedBroker() as embedded:
        tmp = Path(tmp_name)
        broker = BrokerSettings(host=embedded.host, port=embedded.port)
        registry = Registry(f"sqlite:///{tmp / 'registry.db'}")
        repository = TrustRepository.init(tmp / "repository")
        root_file = tmp / "root.json"
        root_file.write_bytes(repository.root_bytes())
        service = ControllerService(
            registry,
            repository,
            broker,
            ServiceSettings(client_id="footprint-controller", maintenance_interval_s=0.5),
        )
        service.start()
        try:
            register_model(registry, repository, model, name=MODEL, version="1.0")
            model_file = tmp / "model.onnx"
            model_file.write_bytes(model)
            for run in range(args.repeat):
                device_id = f"gw-{run}"
                registry.enroll_device(device_id)
                agent, port = start_agent(tmp, broker, root_file, device_id)
                try:
                    wait_for(
                        lambda d=device_id: any(
                            x.id == d and x.online and x.state is not None
                            for x in registry.list_devices()
                        ),
                        60,
                        "the agent to connect",
                    )
                    time.sleep(args.settle_s)
                    empty.append(rss_kib(agent.pid))
                    deployed_at = time.monotonic()
                    service.deploy(MODEL, "1.0", [device_id])
                    wait_for(
                        lambda d=device_id: any(
                            x.id == d and x.active_version == "1.0" for x in registry.list_devices()
                        ),
                        120,
                        "the model to be active",
                    )
                    install_s.append(time.monotonic() - deployed_at)
                    for _ in range(args.requests):
                        infer(port)
                    time.sleep(args.settle_s)
                    loaded.append(rss_kib(agent.pid))
                    result["agent_with_model_mappings"] = rss_by_mapping(agent.pid)
                    # Restarted (a reboot, or systemd's restart): the model is
                    # restored from its slot, without a download or TUF.
                    agent.terminate()
                    agent.wait(30)
                    agent, port = start_agent(tmp, broker, root_file, device_id, port)
                    wait_for(lambda p=port: _serves(p), 60, "the restarted agent to serve")
                    for _ in range(args.requests):
                        infer(port)
                    time.sleep(args.settle_s)
                    restarted.append(rss_kib(agent.pid))
                    result["restarted_agent_mappings"] = rss_by_mapping(agent.pid)
                finally:
                    agent.terminate()
                    agent.wait(30)
                baseline = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--child-bare",
                        str(model_file),
                        broker.host,
                        str(broker.port),
                        str(args.requests),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                try:
                    assert baseline.stdout is not None
                    if baseline.stdout.readline().strip() != b"ready":
                        raise RuntimeError("the bare process did not start")
                    time.sleep(args.settle_s)
                    bare.append(rss_kib(baseline.pid))
                    result["bare_mappings"] = rss_by_mapping(baseline.pid)
                finally:
                    assert baseline.stdin is not None
                    baseline.stdin.close()
                    baseline.wait(30)
        finally:
            service.stop()
            registry.close()
    result["empty_agent_kib"] = statistics.median(empty)
    result["agent_with_model_kib"] = statistics.median(loaded)
    result["bare_kib"] = statistics.median(bare)
    result["restarted_agent_kib"] = statistics.median(restarted)
    result["install_s"] = statistics.median(install_s)
    result["ratio"] = result["agent_with_model_kib"] / result["bare_kib"]
    result["restarted_ratio"] = result["restarted_agent_kib"] / result["bare_kib"]
    result["samples"] = {
        "empty": empty,
        "loaded": loaded,
        "restarted": restarted,
        "bare": bare,
        "install_s": install_s,
    }
    result["install_bytes"] = {
        extra: sum(install_closure(extra).values())
        for extra in ("agent", "agent-onnx", "agent-tflite")
    }
    result["install_detail"] = {
        extra: dict(sorted(install_closure(extra).items(), key=lambda kv: -kv[1]))
        for extra in ("agent", "agent-onnx", "agent-tflite")
    }
    return result


def report(result: dict[str, Any]) -> str:
    mib = 1024.0
    lines = [
        f"model: {result['model_bytes'] / 1e6:.1f} MB ONNX, {result['requests']} inferences",
        f"bare process (numpy + onnxruntime session + paho): {result['bare_kib'] / mib:.1f} MiB",
        f"agent with the model loaded:                    "
        f"{result['agent_with_model_kib'] / mib:.1f} MiB  "
        f"({result['ratio']:.2f}x bare; target <= 1.10x)",
        f"agent restarted, model restored from its slot:  "
        f"{result['restarted_agent_kib'] / mib:.1f} MiB  "
        f"({result['restarted_ratio']:.2f}x bare)",
        f"deploy -> model active (verifier child incl.):  {result['install_s']:.2f} s",
        f"empty agent (connected, no model):              "
        f"{result['empty_agent_kib'] / mib:.1f} MiB",
        "install size (site-packages, this platform):",
    ]
    for extra, size in result["install_bytes"].items():
        top = ", ".join(
            f"{name} {b / 1e6:.1f}" for name, b in list(result["install_detail"][extra].items())[:4]
        )
        lines.append(f"  edgefleet[{extra}]: {size / 1e6:.1f} MB  (largest, MB: {top})")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-bare":
        child_bare(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--child-agent":
        child_agent(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model-mb", type=float, default=3.0)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
