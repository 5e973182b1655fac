"""The Open Inference Protocol (KServe v2) beside the v1 JSON API, over real HTTP.

A real onnxruntime model behind a real server; requests are built by hand
as an OIP client (tritonclient, KServe's) sends them, binary tensor data
extension included, and the answers are decoded the same way.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.metrics import ServingMetrics
from edgefleet.agent.serving import InferenceServer, ModelHolder
from edgefleet.protocols.messages import ModelRef
from edgefleet.shared.runtime import OnnxRuntimeBackend
from tests.shared.test_runtime import write_affine_model

REF = ModelRef(name="affine", version="1.0.0", release=1, target="affine-1.tar")
HEADER = "Inference-Header-Content-Length"


@pytest.fixture
def holder(tmp_path: Path) -> ModelHolder:
    holder = ModelHolder()
    holder.swap(OnnxRuntimeBackend().load(write_affine_model(tmp_path)), REF)
    return holder


@pytest.fixture
def metrics() -> ServingMetrics:
    return ServingMetrics()


@pytest.fixture
def conn(holder: ModelHolder, metrics: ServingMetrics) -> Iterator[http.client.HTTPConnection]:
    srv = InferenceServer(holder, metrics, max_body_bytes=64 * 1024, poll_interval=0.05)
    srv.start()
    connection = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        yield connection
    finally:
        connection.close()
        srv.stop()


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def binary_request(
    inputs: list[tuple[str, np.ndarray]], **extra: Any
) -> tuple[bytes, dict[str, str]]:
    """An OIP request with every input as binary tensor data."""
    tensors = [
        {
            "name": name,
            "shape": list(array.shape),
            "datatype": {"float32": "FP32", "int32": "INT32"}[array.dtype.name],
            "parameters": {"binary_data_size": array.nbytes},
        }
        for name, array in inputs
    ]
    header = json.dumps({"inputs": tensors, **extra}).encode()
    body = header + b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes() for _, a in inputs)
    return body, {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def test_health_server_and_model_metadata(conn: http.client.HTTPConnection) -> None:
    assert call(conn, "GET", "/v2/health/live")[2] == b'{"live":true}'
    assert call(conn, "GET", "/v2/health/ready")[2] == b'{"ready":true}'
    status, _, body = call(conn, "GET", "/v2")
    assert status == 200
    assert "binary_tensor_data" in json.loads(body)["extensions"]
    status, _, body = call(conn, "GET", "/v2/models/affine")
    assert status == 200
    assert json.loads(body) == {
        "name": "affine",
        "versions": ["1.0.0"],
        "platform": "edgefleet",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    assert call(conn, "GET", "/v2/models/affine/versions/1.0.0/ready")[0] == 200
    status, _, body = call(conn, "GET", "/v2/models/affine/versions/9.9.9")
    assert status == 404
    assert json.loads(body)["code"] == "unknown_model"


def test_json_tensors_flat_and_nested(conn: http.client.HTTPConnection) -> None:
    for data in ([1, 2, 3, 4, 5, 6], [[1, 2, 3], [4, 5, 6]]):
        request = {
            "id": "req-1",
            "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": data}],
        }
        status, headers, body = call(
            conn, "POST", "/v2/models/affine/infer", json.dumps(request).encode()
        )
        assert status == 200, body
        assert headers["Content-Type"] == "application/json"
        reply = json.loads(body)
        assert reply["model_name"] == "affine" and reply["model_version"] == "1.0.0"
        assert reply["id"] == "req-1"
        (out,) = reply["outputs"]
        assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [2, 3]
        # y = 2x + 1, row-major and flat as OIP sends it.
        assert out["data"] == [3.0, 5.0, 7.0, 9.0, 11.0, 13.0]


def test_binary_tensors_both_ways(conn: http.client.HTTPConnection) -> None:
    x = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)
    body, headers = binary_request([("x", x)], parameters={"binary_data_output": True})
    status, reply_headers, reply = call(conn, "POST", "/v2/models/affine/infer", body, headers)
    assert status == 200, reply
    assert reply_headers["Content-Type"] == "application/octet-stream"
    split = int(reply_headers[HEADER])
    meta = json.loads(reply[:split])
    (out,) = meta["outputs"]
    assert out["shape"] == [4, 3]
    assert out["parameters"]["binary_data_size"] == 4 * 3 * 4
    y = np.frombuffer(reply[split:], dtype="<f4").reshape(out["shape"])
    np.testing.assert_allclose(y, x * 2 + 1, rtol=1e-6)

    # Binary in, JSON out when the output asks for it.
    body, headers = binary_request(
        [("x", x[:1])], outputs=[{"name": "y", "parameters": {"binary_data": False}}]
    )
    status, reply_headers, reply = call(conn, "POST", "/v2/models/affine/infer", body, headers)
    assert status == 200
    assert reply_headers["Content-Type"] == "application/json"
    assert json.loads(reply)["outputs"][0]["data"] == pytest.approx((x[0] * 2 + 1).tolist())


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda b, h: (b, {**h, HEADER: str(len(b) + 1)}), "bad_request"),
        (lambda b, h: (b + b"\0\0\0\0", h), "bad_request"),  # bytes beyond the inputs
        (lambda b, h: (b[:-4], h), "bad_request"),  # cut short
        (lambda b, h: (b, {**h, HEADER: "x"}), "bad_request"),
        (lambda b, h: (b"[" + b[1:], h), "bad_json"),
    ],
)
def test_malformed_binary_requests_are_400(
    conn: http.client.HTTPConnection, mutate: Any, code: str
) -> None:
    body, headers = binary_request([("x", np.ones((2, 3), np.float32))])
    body, headers = mutate(body, headers)
    status, _, reply = call(conn, "POST", "/v2/models/affine/infer", body, headers)
    assert status == 400
    assert json.loads(reply)["code"] == code
    assert isinstance(json.loads(reply)["error"], str)


@pytest.mark.parametrize(
    ("tensor", "code", "text"),
    [
        (
            {"name": "x", "shape": [1, 3], "datatype": "INT32", "data": [1, 2, 3]},
            "bad_input",
            "FP32",
        ),
        (
            {"name": "z", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
            "bad_input",
            "no input",
        ),
        ({"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}, "bad_input", ""),
        ({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3]}, "bad_input", "fit"),
        ({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": ["a", 2, 3]}, "bad_input", ""),
        ({"name": "x", "shape": [1, -3], "datatype": "FP32", "data": [1, 2, 3]}, "bad_request", ""),
        ({"name": "x", "shape": [1, 3], "datatype": "FP32"}, "bad_request", "data"),
        (
            {
                "name": "x",
                "shape": [1, 3],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 8},
            },
            "bad_input",
            "12",
        ),
    ],
)
def test_bad_tensors_are_400_with_a_reason(
    conn: http.client.HTTPConnection, metrics: ServingMetrics, tensor: Any, code: str, text: str
) -> None:
    body = json.dumps({"inputs": [tensor]}).encode()
    status, _, reply = call(conn, "POST", "/v2/models/affine/infer", body)
    assert status == 400
    error = json.loads(reply)
    assert error["code"] == code
    assert text in error["error"]
    assert metrics.totals().errors[code] == 1
    assert metrics.total_requests == 0  # never reached the model


def test_wrong_model_name_is_404_and_counted(
    conn: http.client.HTTPConnection, metrics: ServingMetrics
) -> None:
    body = json.dumps({"inputs": []}).encode()
    status, _, reply = call(conn, "POST", "/v2/models/other/infer", body)
    assert status == 404
    assert json.loads(reply)["code"] == "unknown_model"
    assert metrics.totals().errors["unknown_model"] == 1
    # A wrong method is no inference request.
    assert call(conn, "GET", "/v2/models/affine/infer")[0] == 405
    assert call(conn, "GET", "/v2/nowhere")[0] == 404
    assert metrics.totals().requests == 1


def test_no_model_is_not_ready_and_503(metrics: ServingMetrics) -> None:
    srv = InferenceServer(ModelHolder(), metrics, poll_interval=0.05)
    srv.start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        status, _, body = call(conn, "GET", "/v2/health/ready")
        assert (status, json.loads(body)) == (503, {"ready": False})
        assert call(conn, "GET", "/v2/health/live")[0] == 200
        status, _, body = call(conn, "POST", "/v2/models/any/infer", b'{"inputs": []}')
        assert status == 503
        assert json.loads(body)["code"] == "no_model"
        assert metrics.totals().errors["no_model"] == 1
    finally:
        conn.close()
        srv.stop()


def test_token_guards_v2_except_health(holder: ModelHolder, metrics: ServingMetrics) -> None:
    token = "v2-Token"  # noqa: S105 - a test value
    srv = InferenceServer(holder, metrics, poll_interval=0.05, token=token)
    srv.start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        assert call(conn, "GET", "/v2/health/ready")[0] == 200
        assert call(conn, "GET", "/v2/health/live")[0] == 200
        assert call(conn, "GET", "/v2/models/affine")[0] == 401
        assert call(conn, "GET", "/v2")[0] == 401
        body, headers = binary_request([("x", np.ones((1, 3), np.float32))])
        assert call(conn, "POST", "/v2/models/affine/infer", body, headers)[0] == 401
        assert metrics.totals().errors["unauthorized"] == 1
        conn.close()
        auth = {**headers, "Authorization": f"Bearer {token}"}
        assert call(conn, "POST", "/v2/models/affine/infer", body, auth)[0] == 200
    finally:
        conn.close()
        srv.stop()


def test_v1_and_v2_share_one_keep_alive_connection(
    conn: http.client.HTTPConnection, metrics: ServingMetrics
) -> None:
    conn.connect()
    first = conn.sock
    body, headers = binary_request([("x", np.ones((1, 3), np.float32))])
    v1 = json.dumps({"inputs": {"x": [[1.0, 1.0, 1.0]]}}).encode()
    for _ in range(10):
        assert call(conn, "POST", "/v2/models/affine/infer", body, headers)[0] == 200
        assert call(conn, "POST", "/v1/infer", v1, {"Content-Type": "application/json"})[0] == 200
    assert conn.sock is first
    assert metrics.total_requests == 20
