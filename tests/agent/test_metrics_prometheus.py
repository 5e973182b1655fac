"""``GET /metrics`` on a real inference server with a real onnxruntime model.

Every request here is real HTTP to a running :class:`InferenceServer`, and
every number is read back by parsing the response with prometheus_client's
own parser, as Prometheus would.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.agent.metrics import (
    INFERENCE_ERROR_REASONS,
    LATENCY_BUCKETS_S,
    ActiveModelInfo,
    InstallCounter,
    PrometheusExporter,
    RejectionCounter,
    ServingMetrics,
)
from edgefleet.agent.serving import InferenceServer, ModelHolder
from edgefleet.protocols.messages import ModelRef
from edgefleet.shared.runtime import InferenceError, LoadedModel, OnnxRuntimeBackend
from tests.agent.test_serving import ScriptedModel
from tests.shared.test_runtime import write_affine_model

REF = ModelRef(name="affine", version="1.2.0", release=3, target="affine-1.2.0.tar")
Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture
def holder() -> ModelHolder:
    return ModelHolder()


@pytest.fixture
def metrics() -> ServingMetrics:
    return ServingMetrics()


@pytest.fixture
def server(holder: ModelHolder, metrics: ServingMetrics) -> Iterator[InferenceServer]:
    srv = InferenceServer(holder, metrics, max_body_bytes=64 * 1024, poll_interval=0.05)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def onnx_model(tmp_path: Path) -> LoadedModel:
    return OnnxRuntimeBackend().load(write_affine_model(tmp_path))


def request(
    server: InferenceServer,
    method: str,
    path: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(server.url + path, data=data, method=method)
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read(), dict(err.headers)


def infer(server: InferenceServer, inputs: Any, headers: dict[str, str] | None = None) -> int:
    body = json.dumps({"inputs": inputs}).encode()
    status, _, _ = request(server, "POST", "/v1/infer", body, headers)
    return status


def scrape(server: InferenceServer, headers: dict[str, str] | None = None) -> Samples:
    status, body, reply_headers = request(server, "GET", "/metrics", headers=headers)
    assert status == 200, body
    assert reply_headers["Content-Type"].startswith("text/plain; version=")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    found = [v for ls, v in samples.get(name, []) if all(ls.get(k) == x for k, x in labels.items())]
    assert found, f"no sample {name}{labels}"
    return sum(found)


def buckets(samples: Samples, name: str) -> list[tuple[float, float]]:
    return sorted((float(ls["le"]), v) for ls, v in samples[name + "_bucket"])


def test_counters_and_histograms_move_after_real_inferences(
    server: InferenceServer, holder: ModelHolder, onnx_model: LoadedModel
) -> None:
    before = scrape(server)
    assert value(before, "edgefleet_agent_inference_requests_total") == 0
    assert value(before, "edgefleet_agent_inference_duration_seconds_count") == 0
    assert value(before, "edgefleet_agent_model_loaded") == 0
    assert "edgefleet_agent_model_info" not in before

    holder.swap(onnx_model, REF)
    batches = [1, 4, 2, 1, 8]
    for batch in batches:
        assert infer(server, {"x": [[1.0, 2.0, 3.0]] * batch}) == 200
    after = scrape(server)

    assert value(after, "edgefleet_agent_inference_requests_total") == len(batches)
    assert value(after, "edgefleet_agent_inference_errors_total") == 0
    per_request = "edgefleet_agent_inference_duration_seconds"
    per_sample = "edgefleet_agent_inference_sample_duration_seconds"
    assert value(after, per_request + "_count") == len(batches)
    assert value(after, per_sample + "_count") == sum(batches)
    assert value(after, per_request + "_sum") > 0
    # The per-sample sum is the per-request one: latency / batch, batch times.
    assert value(after, per_sample + "_sum") == pytest.approx(value(after, per_request + "_sum"))
    for name in (per_request, per_sample):
        bounds = buckets(after, name)
        assert [le for le, _ in bounds] == [*LATENCY_BUCKETS_S, float("inf")]
        counts = [n for _, n in bounds]
        assert counts == sorted(counts), f"{name} buckets are not cumulative: {counts}"
        assert counts[-1] == value(after, name + "_count")

    assert (
        value(after, "edgefleet_agent_model_info", model="affine", version="1.2.0", release="3")
        == 1
    )
    assert value(after, "edgefleet_agent_model_loaded") == 1
    assert value(after, "edgefleet_agent_resident_memory_bytes") > 1024 * 1024
    assert value(after, "edgefleet_agent_cpu_seconds_total") > 0
    assert value(after, "edgefleet_agent_uptime_seconds") >= value(
        before, "edgefleet_agent_uptime_seconds"
    )


def test_bad_requests_count_as_errors_with_bounded_reasons(
    server: InferenceServer, holder: ModelHolder, onnx_model: LoadedModel
) -> None:
    # No model yet: 503 no_model.
    assert infer(server, {"x": [[1.0, 2.0, 3.0]]}) == 503
    holder.swap(onnx_model, REF)
    status, _, _ = request(server, "POST", "/v1/infer", b"{not json")
    assert status == 400
    assert infer(server, {"x": [[1.0, 2.0]]}) == 400  # wrong width: bad_input
    assert infer(server, {"x": [[1.0, 2.0]]}) == 400
    status, _, _ = request(server, "POST", "/v1/infer", b"[1, 2]")
    assert status == 400  # bad_request
    big = json.dumps({"inputs": {"x": [[0.0, 0.0, 0.0]] * 10_000}}).encode()
    status, _, _ = request(server, "POST", "/v1/infer", big)
    assert status == 413
    # No Content-Length at all: 411 (urllib always sends one, so http.client).
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/infer")
        conn.endheaders()
        assert conn.getresponse().status == 411
    finally:
        conn.close()
    # Not inference requests: a wrong path or method counts nowhere.
    assert request(server, "GET", "/v1/infer")[0] == 405
    assert request(server, "GET", "/nowhere")[0] == 404
    assert infer(server, {"x": [[1.0, 2.0, 3.0]]}) == 200

    samples = scrape(server)
    errors = {ls["reason"]: v for ls, v in samples["edgefleet_agent_inference_errors_total"]}
    assert set(errors) == set(INFERENCE_ERROR_REASONS)
    assert errors["no_model"] == 1
    assert errors["bad_json"] == 1
    assert errors["bad_input"] == 2
    assert errors["bad_request"] == 1
    assert errors["too_large"] == 1
    assert errors["length_required"] == 1
    assert errors["inference_failed"] == 0
    assert value(samples, "edgefleet_agent_inference_requests_total") == 8
    # Refused requests never reached the model: no latency recorded for them.
    assert value(samples, "edgefleet_agent_inference_duration_seconds_count") == 1


def test_a_runtime_failure_counts_once_as_inference_failed(
    server: InferenceServer, holder: ModelHolder
) -> None:
    holder.swap(ScriptedModel(error=InferenceError("the runtime broke")), REF)
    assert infer(server, {"x": [[1.0, 2.0, 3.0]]}) == 500
    samples = scrape(server)
    assert value(samples, "edgefleet_agent_inference_errors_total", reason="inference_failed") == 1
    assert value(samples, "edgefleet_agent_inference_errors_total") == 1
    assert value(samples, "edgefleet_agent_inference_requests_total") == 1
    # It ran (and failed): its run time is in the histogram, as in telemetry.
    assert value(samples, "edgefleet_agent_inference_duration_seconds_count") == 1


def test_metrics_need_the_token_when_one_is_set(
    holder: ModelHolder, metrics: ServingMetrics, onnx_model: LoadedModel
) -> None:
    token = "metrics-Token_1"  # noqa: S105 - a test value
    srv = InferenceServer(holder, metrics, poll_interval=0.05, token=token)
    srv.start()
    try:
        holder.swap(onnx_model, REF)
        status, body, headers = request(srv, "GET", "/metrics")
        assert status == 401
        assert json.loads(body)["error"]["code"] == "unauthorized"
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert request(srv, "GET", "/healthz")[0] == 200
        assert infer(srv, {"x": [[1.0, 2.0, 3.0]]}) == 401
        auth = {"Authorization": f"Bearer {token}"}
        assert infer(srv, {"x": [[1.0, 2.0, 3.0]]}, auth) == 200
        samples = scrape(srv, auth)
        assert value(samples, "edgefleet_agent_inference_errors_total", reason="unauthorized") == 1
        assert value(samples, "edgefleet_agent_inference_requests_total") == 2
        assert value(samples, "edgefleet_agent_inference_duration_seconds_count") == 1
    finally:
        srv.stop()


def test_exporter_reports_installs_refusals_and_the_model_variant(
    holder: ModelHolder, metrics: ServingMetrics
) -> None:
    """The agent's exporter: what the daemon feeds it comes out, labels bounded."""
    installs = InstallCounter()
    rejections = RejectionCounter()
    exporter = PrometheusExporter(
        metrics,
        model=lambda: ActiveModelInfo("m", "2.0.0", 7, "x86-vnni", "int8", "onnxruntime"),
        rejections=rejections,
        installs=installs,
        labels={"version": "9.9.9", "device_id": "gw-1"},
    )
    srv = InferenceServer(holder, metrics, poll_interval=0.05, exporter=exporter)
    srv.start()
    try:
        installs.installed()
        installs.installed()
        installs.failed("smoke_test_failed", refused=False)
        installs.failed("signature", refused=True)
        for i in range(200):  # a hostile stream of new codes stays bounded
            installs.failed(f"made-up-{i}", refused=False)
        rejections.count("malformed_desired")
        samples = scrape(srv)
    finally:
        srv.stop()
    assert value(samples, "edgefleet_agent_installs_total") == 2
    failures = samples["edgefleet_agent_install_failures_total"]
    assert len(failures) <= 32
    assert (
        value(
            samples, "edgefleet_agent_install_failures_total", outcome="refused", code="signature"
        )
        == 1
    )
    assert value(samples, "edgefleet_agent_install_failures_total") == 202
    assert value(samples, "edgefleet_agent_install_failures_total", code="other") > 0
    rejected = "edgefleet_agent_rejected_messages_total"
    assert value(samples, rejected, reason="malformed_desired") == 1
    assert (
        value(
            samples,
            "edgefleet_agent_model_info",
            model="m",
            version="2.0.0",
            release="7",
            variant="x86-vnni",
            precision="int8",
            runtime="onnxruntime",
        )
        == 1
    )
    assert value(samples, "edgefleet_agent_info", version="9.9.9", device_id="gw-1") == 1


def test_registry_is_private() -> None:
    """Two exporters in one process (tests, fleet benches) never collide or share."""
    from prometheus_client import REGISTRY

    one = PrometheusExporter(ServingMetrics(), model=lambda: None)
    two = PrometheusExporter(ServingMetrics(), model=lambda: None)
    one._serving.refuse("bad_json")
    assert b'reason="bad_json"} 1.0' in one.render()
    assert b'reason="bad_json"} 0.0' in two.render()
    assert REGISTRY.get_sample_value("edgefleet_agent_inference_requests_total") is None
