"""Telemetry's optional per-sample fields: new agents send them, old ones still validate."""

from __future__ import annotations

import json

import pytest

from edgefleet.protocols.errors import MessageError
from edgefleet.protocols.messages import LatencySummary, ModelRef, Telemetry

REF = ModelRef("demo", "1.0", 3, "demo/1.0/generic-fp32.bundle")
OLD = Telemetry("gw-1", 10.0, 5, 1, LatencySummary(1.0, 2.0, 3.0), REF, 1000, 12.5, {}, 3.0)


def test_per_sample_fields_round_trip() -> None:
    new = Telemetry(
        "gw-1",
        10.0,
        5,
        1,
        LatencySummary(1.0, 2.0, 3.0),
        REF,
        1000,
        12.5,
        at=3.0,
        samples=6004,
        sample_latency_ms=LatencySummary(0.01, 0.02, 0.5),
    )
    assert Telemetry.decode(new.encode()) == new
    body = json.loads(new.encode())
    assert body["samples"] == 6004
    assert body["sample_latency_ms"] == {"p50": 0.01, "p95": 0.02, "p99": 0.5}


def test_an_older_agents_window_still_validates_and_has_no_sample_figures() -> None:
    body = json.loads(OLD.encode())
    assert "samples" not in body and "sample_latency_ms" not in body
    decoded = Telemetry.decode(json.dumps(body))
    assert decoded == OLD
    assert (decoded.samples, decoded.sample_latency_ms, decoded.extra) == (None, None, {})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("samples", -1),
        ("samples", "many"),
        ("samples", True),
        ("sample_latency_ms", [1, 2, 3]),
        ("sample_latency_ms", {"p50": 1.0, "p95": 2.0}),
    ],
)
def test_malformed_sample_fields_are_refused(field: str, value: object) -> None:
    body = json.loads(OLD.encode())
    body[field] = value
    with pytest.raises(MessageError):
        Telemetry.decode(json.dumps(body))
