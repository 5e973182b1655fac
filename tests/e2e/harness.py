"""A real controller plus real agents for end-to-end tests.

Everything is real: the broker (amqtt or Mosquitto), the registry database,
the TUF repository, the agents' MQTT connections and HTTP endpoints. Device
ids carry a random suffix because brokers are shared across a test session
and keep retained messages: a device id reused by a later test would receive
an earlier test's desired state.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import tarfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.config import AgentConfig, HttpSettings
from edgefleet.agent.daemon import Agent
from edgefleet.agent.fetcher import TransferSettings
from edgefleet.controller.bundle import build_bundle, default_sample, inspect_onnx
from edgefleet.controller.catalog import RegisteredModel, bundle_target_path, register_model
from edgefleet.controller.compiler import Profile
from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.controller.registry import DeviceSummary, Registry
from edgefleet.controller.service import ControllerService
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.bundle import TargetCustom
from edgefleet.shared.link import BrokerSettings

MODEL = "e2e-mlp"


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    if not predicate():
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")


def wide_model(hidden: int = 4096, seed: int = 3) -> bytes:
    """An MLP of ~hidden*80 bytes: big enough to need many transfer blocks."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, hidden)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (hidden, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "wide",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def swap_model_in_bundle(bundle: bytes, model: bytes) -> bytes:
    """Put another model into a bundle, keeping the sample (and so the expected outputs).

    The result is internally consistent (manifest hash matches) and can be
    signed: it models a bad build that only the smoke test can catch.
    """
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        for info in tar.getmembers():
            f = tar.extractfile(info)
            assert f is not None
            members[info.name] = f.read()
    manifest = json.loads(members["manifest.json"])
    manifest["model_sha256"] = hashlib.sha256(model).hexdigest()
    members["manifest.json"] = json.dumps(manifest).encode()
    members["model.onnx"] = model
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    return out.getvalue()


class Harness:
    """A running controller with helpers to register, enroll, deploy and inspect."""

    def __init__(
        self,
        tmp: Path,
        broker: BrokerSettings,
        database_url: str,
        *,
        profiles: Mapping[str, Profile] | None = None,
        **service: Any,
    ) -> None:
        self.tmp = tmp
        self.broker = broker
        self.token = secrets.token_hex(3)
        self.registry = Registry(database_url)
        self.repository = TrustRepository.init(tmp / "repository")
        self.root_file = tmp / "root.json"
        self.root_file.write_bytes(self.repository.root_bytes())
        self.service = ControllerService(
            self.registry,
            self.repository,
            broker,
            ServiceSettings(
                client_id=f"e2e-controller-{self.token}",
                **{"maintenance_interval_s": 0.5, "ingest_flush_s": 0.1, **service},
            ),
            profiles=profiles,
        )
        self.service.start()
        self.agents: list[Agent] = []

    def close(self) -> None:
        for agent in self.agents:
            try:
                agent.stop()
            except Exception:  # already stopped by the test
                pass
        self.service.stop()
        self.registry.close()

    # ------------------------------------------------------------------ catalog
    def register(
        self,
        version: str,
        model: bytes | None = None,
        hardware_classes: tuple[str, ...] = ("generic",),
    ) -> RegisteredModel:
        return register_model(
            self.registry,
            self.repository,
            model or build_demo_model(),
            name=MODEL,
            version=version,
            hardware_classes=hardware_classes,
        )

    def register_broken(self, version: str) -> RegisteredModel:
        """A signed, well-formed bundle whose model fails its own smoke test."""
        good = build_demo_model()
        inputs, outputs = inspect_onnx(good)
        info = self.registry.register_model_version(
            MODEL, version, source_sha256="0" * 64, inputs=inputs, outputs=outputs
        )
        bundle, _ = build_bundle(
            good,
            name=MODEL,
            version=version,
            release=info.release,
            hardware_class="generic",
            precision="fp32",
            sample_inputs=default_sample(inputs),
        )
        bad = swap_model_in_bundle(bundle, build_demo_model(seed=99))
        custom = TargetCustom(
            MODEL, version, info.release, "onnxruntime", "fp32", "generic", inputs, outputs
        )
        published = self.repository.add_target(
            bundle_target_path(MODEL, version, "generic", "fp32"), bad, custom
        )
        bundle_info = self.registry.add_bundle(
            info.id,
            hardware_class="generic",
            runtime="onnxruntime",
            precision="fp32",
            target_path=published.path,
            sha256=published.sha256,
            length=published.length,
        )
        return RegisteredModel(info, (bundle_info,))

    # ------------------------------------------------------------------ devices
    def device_id(self, name: str) -> str:
        return f"{name}-{self.token}"

    def agent_config(self, name: str, **overrides: Any) -> AgentConfig:
        device_id = self.device_id(name)
        transfer = overrides.pop(
            "transfer", TransferSettings(request_timeout_s=2.0, max_attempts=3)
        )
        return AgentConfig(
            device_id=device_id,
            state_dir=self.tmp / "agents" / device_id,
            trust_root=self.root_file,
            telemetry_interval_s=overrides.pop("telemetry_interval_s", 0.5),
            retry_backoff_s=overrides.pop("retry_backoff_s", 0.5),
            broker=overrides.pop("broker", self.broker),
            http=overrides.pop("http", HttpSettings(port=0)),
            transfer=transfer,
            **overrides,
        )

    def enroll(self, name: str, hardware_class: str = "generic") -> str:
        device_id = self.device_id(name)
        self.registry.enroll_device(device_id, hardware_class=hardware_class)
        return device_id

    def start_agent(self, config: AgentConfig) -> Agent:
        agent = Agent(config)
        agent.start()
        self.agents.append(agent)
        return agent

    def deploy(self, version: str, *names: str) -> str:
        return self.service.deploy(MODEL, version, [self.device_id(n) for n in names]).id

    def summary(self, name: str) -> DeviceSummary:
        device_id = self.device_id(name)
        return next(s for s in self.registry.device_summaries() if s.device_id == device_id)

    def wait_active(self, agent: Agent, version: str, timeout_s: float = 30.0) -> None:
        wait_for(
            lambda: agent.active_model is not None and agent.active_model.version == version,
            timeout_s,
            f"{agent.device_id} to run {version}",
        )

    def wait_error(self, name: str, code: str, timeout_s: float = 30.0) -> DeviceSummary:
        wait_for(
            lambda: self.summary(name).last_error_code == code,
            timeout_s,
            f"{name} to report {code} (last: {self.summary(name).last_error_code})",
        )
        return self.summary(name)


def infer(agent: Agent, features: list[list[float]] | None = None) -> dict[str, Any]:
    """One inference through the agent's HTTP endpoint, sized for its active model."""
    if features is None:
        current = agent.holder.current()
        assert current is not None, "no model loaded"
        width = current[0].inputs[0].shape[1]
        assert isinstance(width, int)
        features = [[0.5] * width]
    body = {"inputs": {"features": features}}
    request = urllib.request.Request(
        f"{agent.server.url}/v1/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result
