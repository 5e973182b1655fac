from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.protocols import bounds
from edgefleet.protocols.bounds import fold_reasons
from edgefleet.protocols.errors import MessageError
from edgefleet.protocols.messages import (
    MAX_MESSAGE_BYTES,
    AgentState,
    DesiredState,
    ErrorInfo,
    Event,
    EventKind,
    FileRequest,
    HardwareInfo,
    LatencySummary,
    ModelRef,
    ReportedState,
    Telemetry,
)

REF = ModelRef("demo", "1.0", 3, "demo/1.0/generic-fp32.bundle")
HW = HardwareInfo("x86_64", ("avx2",), ("onnxruntime",), "generic")

SAMPLES = [
    DesiredState("gw-1", 4, REF, "dep1", 12.5),
    DesiredState("gw-1", 0, None),
    ReportedState(
        "gw-1", AgentState.FAILED, REF, HW, 4, "dep1", REF, ErrorInfo("tampered", "x"), "0.1.0", 1.0
    ),
    Event("gw-1", EventKind.DOWNLOAD_PROGRESS, 4, "dep1", REF, None, 10, 20, 2.0),
    Telemetry(
        "gw-1", 10.0, 5, 1, LatencySummary(1.0, 2.0, 3.0), REF, 1000, 12.5, {"wrong_device": 2}, 3.0
    ),
    FileRequest("gw-1", "ab" * 16, "targets/x.bundle", 65536, ((0, 4), (9, 10))),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Any) -> None:
    assert type(message).decode(message.encode()) == message


def test_unknown_fields_survive_round_trip() -> None:
    body = json.loads(SAMPLES[0].encode())
    body["future_field"] = {"nested": True}
    decoded = DesiredState.decode(json.dumps(body))
    assert decoded.extra == {"future_field": {"nested": True}}
    assert json.loads(decoded.encode())["future_field"] == {"nested": True}


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"device_id":"gw-1","generation":1}', "schema version"),
        (b'{"v":true,"device_id":"gw-1","generation":1}', "schema version"),
        (b'{"v":1,"device_id":"gw-1","generation":"1"}', "'generation' must be int"),
        (b'{"v":1,"device_id":"gw-1","generation":true}', "got bool"),
        (b'{"v":1,"device_id":"gw/1","generation":1}', "invalid device id"),
        (b'{"v":1,"device_id":"gw-1","generation":-1}', ">= 0"),
        (b'{"v":1,"device_id":"gw-1","generation":1,"model":{"name":"m"}}', "missing field"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_desired_state_validation_names_the_problem(payload: bytes, fragment: str) -> None:
    with pytest.raises(MessageError, match=fragment):
        DesiredState.decode(payload)


def test_oversized_payload_refused_before_parsing() -> None:
    with pytest.raises(MessageError, match="exceeds"):
        DesiredState.decode(b" " * (MAX_MESSAGE_BYTES + 1))


def test_non_finite_numbers_refused() -> None:
    body = json.loads(SAMPLES[4].encode())
    body["cpu_percent"] = float("inf")
    with pytest.raises(MessageError, match="finite"):
        Telemetry.decode(json.dumps(body))


@pytest.mark.parametrize(
    "changes",
    [
        {"path": "/etc/passwd"},
        {"path": "targets/../../x"},
        {"block_size": 10},
        {"request_id": "XYZ"},
        {"ranges": [[5, 2]]},
        {"ranges": [[0, 1]] * 300},
        {"ranges": [[0, "a"]]},
    ],
)
def test_file_request_refuses_hostile_fields(changes: dict[str, Any]) -> None:
    body = json.loads(SAMPLES[5].encode()) | changes
    with pytest.raises(MessageError):
        FileRequest.decode(json.dumps(body))


def test_block_indices_are_capped() -> None:
    req = FileRequest("gw-1", "ab" * 16, "targets/x", 65536, ((0, 1_000_000),))
    assert req.block_indices(64) == list(range(64))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
KINDS = [DesiredState, ReportedState, Event, Telemetry, FileRequest]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(KINDS),
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
                "window_s",
                "requests",
                "errors",
                "rss_bytes",
                "cpu_percent",
                "path",
                "request_id",
                "block_size",
                "ranges",
                "latency_ms",
                "rejected",
                "active",
            ]
        ),
        json_values,
        max_size=12,
    ),
)
def test_any_json_object_parses_or_raises_message_error(kind: Any, body: dict[str, Any]) -> None:
    try:
        payload = json.dumps(body).encode()
    except ValueError:
        return
    try:
        kind.decode(payload)
    except MessageError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KINDS), st.binary(max_size=512))
def test_any_bytes_parse_or_raise_message_error(kind: Any, payload: bytes) -> None:
    try:
        kind.decode(payload)
    except MessageError:
        pass


# --------------------------------------------------------------------------- values (issue 9)
def _telemetry(**changes: Any) -> dict[str, Any]:
    body = json.loads(SAMPLES[4].encode())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"requests": 2**63 - 1, "errors": 0}, "'requests' is too large"),
        ({"requests": 2**53 + 1, "errors": 0}, "'requests' is too large"),
        ({"requests": 5, "errors": 6}, "exceeds 'requests'"),
        ({"errors": -1}, "'errors' must be >= 0"),
        ({"latency_ms": {"p50": -1.0}}, "'p50' must be >= 0"),
        ({"latency_ms": {"p50": 3.0, "p95": 2.0, "p99": 4.0}}, "p50 <= p95 <= p99"),
        ({"latency_ms": {"p99": 1e12}}, "'p99' must be <="),
        ({"window_s": -10.0}, "'window_s' must be >= 0"),
        ({"window_s": 1e9}, "'window_s' must be <="),
        ({"cpu_percent": -1.0}, "'cpu_percent' must be >= 0"),
        ({"cpu_percent": 1e9}, "'cpu_percent' must be <="),
        ({"rss_bytes": 2**60}, "'rss_bytes' is too large"),
        ({"rejected": {"wrong_device": 2**62}}, "'rejected' must map"),
        ({"at": -5.0}, "'at' must be >= 0"),
    ],
)
def test_telemetry_values_out_of_range_are_refused(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(MessageError, match=fragment):
        Telemetry.from_dict(_telemetry(**changes))


def test_telemetry_at_the_bounds_is_accepted() -> None:
    t = Telemetry.from_dict(
        _telemetry(
            requests=2**53,
            errors=2**53,
            latency_ms={"p50": 0.0, "p95": 0.0, "p99": 0.0},
            window_s=0.0,
            cpu_percent=0.0,
            rss_bytes=2**53,
        )
    )
    assert (t.requests, t.errors, t.rss_bytes) == (2**53, 2**53, 2**53)


def test_unknown_rejection_reasons_are_folded_into_other() -> None:
    invented = {f"made_up_{i}": 3 for i in range(60)}
    t = Telemetry.from_dict(_telemetry(rejected={"wrong_device": 1, "other": 2, **invented}))
    assert t.rejected == {"wrong_device": 1, "other": 2 + 60 * 3}
    assert set(t.rejected) <= bounds.KNOWN_REJECTION_REASONS
    assert fold_reasons({"x": bounds.MAX_COUNT, "y": bounds.MAX_COUNT}) == {
        "other": bounds.MAX_COUNT
    }


def _event(**changes: Any) -> dict[str, Any]:
    body = json.loads(SAMPLES[3].encode())
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"generation": 2**31}, "'generation' is too large"),
        ({"bytes_done": 2**63 - 1}, "'bytes_done' is too large"),
        ({"bytes_total": 2**54}, "'bytes_total' is too large"),
        ({"at": -1.0}, "'at' must be >= 0"),
    ],
)
def test_event_values_out_of_range_are_refused(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(MessageError, match=fragment):
        Event.from_dict(_event(**changes))


def test_event_unknown_fields_are_capped_with_a_marker() -> None:
    small = Event.from_dict(_event(hint="x" * 100))
    assert small.extra == {"hint": "x" * 100}
    big = Event.from_dict(_event(blob="x" * 250_000, hint="y"))
    marker = big.extra[bounds.TRUNCATED_KEY]
    assert big.extra == {bounds.TRUNCATED_KEY: marker}
    assert marker["keys"] == 2 and marker["bytes"] > 250_000
    assert len(big.encode()) < 2 * bounds.MAX_DETAIL_BYTES
    # The event itself survives: it may be the only record of a failure.
    assert (big.kind, big.generation) == (EventKind.DOWNLOAD_PROGRESS, 4)
