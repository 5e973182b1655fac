"""Property-based: hostile payloads at every topic handler, on both sides.

The handlers are called the way paho's network thread calls them (topic,
payload bytes, retained flag), with real registries and agents behind them.
Nothing may raise, nothing may hang, and every refusal must be counted.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.agent.config import AgentConfig, HttpSettings
from edgefleet.agent.daemon import Agent
from edgefleet.controller.registry import Registry
from edgefleet.controller.service import _MAX_FILE_REQUEST_BYTES, ControllerService
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.errors import FrameError, MessageError
from edgefleet.protocols.framing import BlockFrame
from edgefleet.protocols.messages import (
    DesiredState,
    Event,
    FileRequest,
    ModelRef,
    ReportedState,
    Telemetry,
)
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings

DEVICE = "gw-fuzz"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3)
    ),
    max_leaves=12,
)
valid_desired = DesiredState(DEVICE, 3, ModelRef("m", "1", 2, "m/1/generic-fp32.bundle"), "d")
payloads = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=64).map(lambda b: valid_desired.encode()[: len(b)]),  # truncated
    st.dictionaries(
        st.sampled_from(
            [
                "v",
                "device_id",
                "generation",
                "model",
                "state",
                "hardware",
                "kind",
                "requests",
                "path",
                "ranges",
            ]
        ),
        json_values,
        max_size=8,
    ).map(lambda d: json.dumps(d).encode()),
    st.just(b"x" * 300_000),  # oversized
    st.just(json.dumps({**json.loads(valid_desired.encode()), "generation": "3"}).encode()),
)
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerService]:
    tmp = tmp_path_factory.mktemp("fuzz-controller")
    registry = Registry(f"sqlite:///{tmp / 'r.db'}")
    registry.enroll_device(DEVICE)
    # Not started: the handlers and the ingest step are driven directly.
    service = ControllerService(
        registry, TrustRepository.init(tmp / "repo"), BrokerSettings(port=1)
    )
    yield service
    registry.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Agent:
    tmp = tmp_path_factory.mktemp("fuzz-agent")
    repo = TrustRepository.init(tmp / "repo")
    (tmp / "root.json").write_bytes(repo.root_bytes())
    return Agent(
        AgentConfig(
            device_id=DEVICE,
            state_dir=tmp / "state",
            trust_root=tmp / "root.json",
            broker=BrokerSettings(port=1),
            http=HttpSettings(port=0),
        )
    )


def _valid(channel: Channel, payload: bytes) -> bool:
    """Whether the controller should accept this payload (decodes, right device)."""
    if channel is Channel.STATUS:
        return payload.strip() in (b"online", b"offline")
    kind = {
        Channel.REPORTED: ReportedState,
        Channel.EVENTS: Event,
        Channel.TELEMETRY: Telemetry,
        Channel.FILE_REQUEST: FileRequest,
    }[channel]
    try:
        return kind.decode(payload).device_id == DEVICE  # type: ignore[attr-defined]
    except MessageError:
        return False


@FUZZ
@given(
    channel=st.sampled_from([Channel.REPORTED, Channel.STATUS, Channel.EVENTS, Channel.TELEMETRY]),
    payload=payloads,
)
def test_controller_ingest_survives_anything(
    controller: ControllerService, channel: Channel, payload: bytes
) -> None:
    before = sum(controller.rejected().values())
    controller._on_message(str(DeviceTopic(DEVICE, channel)), payload, False)
    batch = []
    while not controller._ingest.empty():
        batch.append(controller._ingest.get_nowait())
    assert len(batch) == 1
    controller._store(batch)
    rejected = sum(controller.rejected().values()) - before
    assert rejected == (0 if _valid(channel, payload) else 1)


@FUZZ
@given(payload=payloads)
def test_controller_file_requests_survive_anything(
    controller: ControllerService, payload: bytes
) -> None:
    before = sum(controller.rejected().values())
    controller._on_message(str(DeviceTopic(DEVICE, Channel.FILE_REQUEST)), payload, False)
    try:
        parsed, raw = controller._requests.get_nowait()
    except queue.Empty:
        # Refused on arrival, never queued: only requests over the size bound.
        assert len(payload) > _MAX_FILE_REQUEST_BYTES
        request = None
    else:
        request = controller._decode(parsed, raw, FileRequest)
    rejected = sum(controller.rejected().values()) - before
    # Valid, and small enough to be queued (a FileRequest is a few hundred bytes;
    # the bound keeps the request queue's memory bounded).
    accepted = _valid(Channel.FILE_REQUEST, payload) and len(payload) <= _MAX_FILE_REQUEST_BYTES
    assert (request is not None) == accepted
    assert rejected == (0 if request is not None else 1)


@FUZZ
@given(payload=payloads, retained=st.booleans())
def test_agent_desired_handler_survives_anything(
    agent: Agent, payload: bytes, retained: bool
) -> None:
    before = sum(agent.rejections.snapshot().values())
    agent._on_desired(str(DeviceTopic(DEVICE, Channel.DESIRED)), payload, retained)
    rejected = sum(agent.rejections.snapshot().values()) - before
    try:
        valid = DesiredState.decode(payload).device_id == DEVICE
    except MessageError:
        valid = False
    if valid:
        assert rejected == 0
        assert agent._desired == DesiredState.decode(payload)
    else:
        assert rejected == 1


@FUZZ
@given(
    payload=st.one_of(
        payloads, st.binary(min_size=48, max_size=400).map(lambda b: b"EFB1\x01" + b[5:])
    )
)
def test_agent_frame_handler_survives_anything(agent: Agent, payload: bytes) -> None:
    before = sum(agent.rejections.snapshot().values())
    agent.fetcher.on_frame(str(DeviceTopic(DEVICE, Channel.FILE_BLOCKS)), payload, False)
    try:
        BlockFrame.decode(payload)
    except FrameError:
        assert sum(agent.rejections.snapshot().values()) == before + 1
    else:  # a well-formed frame for no active transfer is dropped quietly
        assert sum(agent.rejections.snapshot().values()) == before
