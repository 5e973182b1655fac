"""``Telemetry.decode``'s msgspec path accepts exactly what the field readers accept.

The fast path may only say "yes, and here is the same window" or "ask the
readers": for any payload, either it declines, or the readers accept the
payload too and build an identical window (same values *and* types: ``repr``
tells ``5`` from ``5.0``). Error messages are the readers' own by
construction, and tests/protocols/test_messages.py keeps checking them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.protocols.errors import MessageError
from edgefleet.protocols.messages import (
    LatencySummary,
    ModelRef,
    Telemetry,
    _fast_telemetry,
    decode,
)

pytest.importorskip("msgspec")

VALID = Telemetry(
    device_id="dev-1",
    window_s=10.0,
    requests=120,
    errors=3,
    latency_ms=LatencySummary(p50=1.5, p95=3.0, p99=4.5),
    model=ModelRef("m", "1.0", 2, "m/generic/fp32/bundle.tar"),
    rss_bytes=48_000_000,
    cpu_percent=3.5,
    rejected={"malformed_frame": 2},
    at=1_700_000_000.25,
    samples=240,
    sample_latency_ms=LatencySummary(p50=0.7, p95=1.5, p99=2.0),
)
FIELDS = sorted(json.loads(VALID.encode()))

# Values that sit on every edge the readers judge: types, bools, bounds,
# huge and non-finite numbers, nesting, and strings near their length caps.
EDGES: list[Any] = [
    0, -1, 1, -0.5, 2**53, 2**53 + 1, 2**63, 2**64, 10**30, 0.0, -0.0, 1.5, 1e308, 86_400_000.0,
    86_400_000.5, 604_800, 604_800.1, 102_400, 102_400.5, True, False, None, "1", [], {},
    "dev-1", "x" * 64, "x" * 65, "bad id", "ok\n", "", "x" * 129, "x" * 513,
]  # fmt: skip
KEYS = [*FIELDS, "latency_ms.p50", "latency_ms.p99", "model.release", "model.name", "rejected.x"]
edge_numbers = st.sampled_from(EDGES)
json_values = st.recursive(
    st.one_of(
        edge_numbers,
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=70),
        st.sampled_from(["dev-1", "x" * 64, "x" * 65, "bad id", "ok\n", "", "x" * 129]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=8,
)


def _readers(payload: bytes) -> Telemetry | MessageError:
    try:
        return Telemetry.from_dict(decode(payload))
    except MessageError as exc:
        return exc


def _same(payload: bytes) -> None:
    fast = _fast_telemetry(payload)
    slow = _readers(payload)
    if fast is None:
        return  # declined: the readers decide, with their own message
    assert not isinstance(slow, MessageError), f"fast path accepted what the readers refuse: {slow}"
    assert repr(fast) == repr(slow)
    assert fast.extra == slow.extra


def test_an_agents_window_takes_the_fast_path() -> None:
    payload = VALID.encode()
    fast = _fast_telemetry(payload)
    assert fast is not None
    assert repr(fast) == repr(VALID)
    assert repr(Telemetry.decode(payload)) == repr(VALID)
    # Optional parts absent or null, as older agents send them.
    body = json.loads(payload)
    for key in ("samples", "sample_latency_ms", "latency_ms", "model", "rejected", "at"):
        body.pop(key)
    lean = json.dumps(body).encode()
    assert _fast_telemetry(lean) is not None
    _same(lean)


def test_unknown_fields_and_refusals_go_through_the_readers() -> None:
    body = json.loads(VALID.encode())
    body["newer_field"] = {"x": 1}
    payload = json.dumps(body).encode()
    assert _fast_telemetry(payload) is None
    assert Telemetry.decode(payload).extra == {"newer_field": {"x": 1}}
    body = json.loads(VALID.encode())
    body["errors"] = body["requests"] + 1
    with pytest.raises(MessageError, match="exceeds 'requests'"):
        Telemetry.decode(json.dumps(body).encode())


def _with(key: str, value: Any) -> bytes:
    body = json.loads(VALID.encode())
    if "." in key:
        outer, inner = key.split(".")
        body[outer][inner] = value
    else:
        body[key] = value
    return json.dumps(body).encode()


def test_every_field_at_every_edge_agrees_with_readers() -> None:
    for key in KEYS:
        for value in EDGES:
            _same(_with(key, value))


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(KEYS), value=json_values)
def test_one_field_changed_fast_path_agrees_with_readers(key: str, value: Any) -> None:
    _same(_with(key, value))


@settings(max_examples=200, deadline=None)
@given(drop=st.sets(st.sampled_from(FIELDS)), raw=st.binary(max_size=40))
def test_missing_fields_and_raw_bytes_agree(drop: set[str], raw: bytes) -> None:
    body = json.loads(VALID.encode())
    for key in drop:
        body.pop(key)
    _same(json.dumps(body).encode())
    _same(raw)
    _same(json.dumps(body).encode()[:-1] + raw)
