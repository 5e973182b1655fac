"""Tests for the local HTTP inference endpoint, over real HTTP to a real server."""

from __future__ import annotations

import http.client
import json
import selectors
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from email.message import Message
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.metrics import ServingMetrics
from edgefleet.agent.serving import InferenceServer, ModelHolder
from edgefleet.protocols.bundle import TensorSpec
from edgefleet.protocols.errors import ConfigError
from edgefleet.protocols.messages import ModelRef
from edgefleet.shared.runtime import LoadedModel, OnnxRuntimeBackend
from tests.shared.test_runtime import affine, write_affine_model

REF_A = ModelRef(name="affine", version="1.0.0", release=1, target="affine-1.tar")
REF_B = ModelRef(name="affine", version="2.0.0", release=2, target="affine-2.tar")
SPEC_X = TensorSpec("x", "float32", (None, 3))
SPEC_Y = TensorSpec("y", "float32", (None, 3))


class ScriptedModel:
    """An in-memory LoadedModel: returns ``value`` everywhere, or raises ``error``.

    With ``gate`` set, ``run`` signals ``started`` and then blocks until the
    gate opens, so a test can act while a request is in flight.
    """

    inputs: tuple[TensorSpec, ...] = (SPEC_X,)
    outputs: tuple[TensorSpec, ...] = (SPEC_Y,)

    def __init__(
        self,
        value: float = 0.0,
        error: Exception | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.value = value
        self.error = error
        self.gate = gate
        self.started = threading.Event()
        self.calls = 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        self.started.set()
        if self.gate is not None and not self.gate.wait(timeout=10):
            raise TimeoutError("test gate never opened")
        if self.error is not None:
            raise self.error
        return {"y": np.full(feeds["x"].shape, self.value, np.float32)}


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


def call(
    server: InferenceServer, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, dict[str, Any], Message]:
    """One real HTTP request with urllib; returns (status, JSON body, headers)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    # The URL is always our own http://127.0.0.1:<port>.
    req = urllib.request.Request(server.url + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read()), err.headers


def infer(server: InferenceServer, inputs: Any) -> tuple[int, dict[str, Any]]:
    status, body, _ = call(server, "POST", "/v1/infer", {"inputs": inputs})
    return status, body


# --------------------------------------------------------------------------- inference
def test_infer_runs_the_live_model(
    server: InferenceServer, holder: ModelHolder, metrics: ServingMetrics, onnx_model: LoadedModel
) -> None:
    holder.swap(onnx_model, REF_A)
    x = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]
    status, body = infer(server, {"x": x})
    assert status == 200
    assert body["outputs"] == {"y": affine(np.array(x, np.float32)).tolist()}
    assert body["model"] == {"name": "affine", "version": "1.0.0", "release": 1}
    assert 0 <= body["latency_ms"] < 5000
    stats = metrics.take_window()
    assert (stats.requests, stats.errors) == (1, 0)
    assert stats.p50_ms == pytest.approx(body["latency_ms"])


def test_no_model_is_503(server: InferenceServer, metrics: ServingMetrics) -> None:
    status, body = infer(server, {"x": [[1, 2, 3]]})
    assert status == 503
    assert body["error"]["code"] == "no_model"
    status, body, _ = call(server, "GET", "/v1/model")
    assert status == 503
    assert body["error"]["code"] == "no_model"
    assert metrics.total_requests == 0


@pytest.mark.parametrize(
    "case",
    [
        (b"{not json", "bad_json", "not valid JSON"),
        (b"\xff\xfe", "bad_json", "not valid JSON"),
        (b"[1, 2]", "bad_request", '{"inputs"'),
        (b'{"x": [[1, 2, 3]]}', "bad_request", '{"inputs"'),
        (b'{"inputs": {"x": [1, 2, 3]}}', "bad_input", "must have rank 2"),
        (b'{"inputs": {"x": [[1, 2, 3]], "z": 1}}', "bad_input", "unknown input(s) 'z'"),
        (b'{"inputs": {}}', "bad_input", "missing input(s) 'x'"),
        (b'{"inputs": {"x": [[1, NaN, 3]]}}', "bad_input", "NaN"),
        (b'{"inputs": {"x": [["a", "b", "c"]]}}', "bad_input", "strings"),
    ],
)
def test_bad_requests_are_400_and_not_counted(
    server: InferenceServer,
    holder: ModelHolder,
    metrics: ServingMetrics,
    onnx_model: LoadedModel,
    case: tuple[bytes, str, str],
) -> None:
    raw, code, message = case
    holder.swap(onnx_model, REF_A)
    status, body, _ = call(server, "POST", "/v1/infer", raw=raw)
    assert status == 400
    assert body["error"]["code"] == code
    assert message in body["error"]["message"]
    assert metrics.total_requests == 0


def test_body_too_large_is_413(server: InferenceServer, holder: ModelHolder) -> None:
    holder.swap(ScriptedModel(), REF_A)
    big = {"inputs": {"x": [[0.0, 0.0, 0.0]] * 10_000}}
    status, body, headers = call(server, "POST", "/v1/infer", big)
    assert status == 413
    assert body["error"]["code"] == "too_large"
    assert headers["Connection"] == "close"


def _post_raw(
    port: int, body_size: int, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST a ``body_size``-byte body with http.client, which sends it all before reading.

    That is how urllib, requests and most clients behave: a server that
    answers and closes with the body unread makes them fail with a broken
    pipe or a reset instead of reading the answer.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/infer")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(body_size))
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        chunk = b" " * (256 * 1024)
        sent = 0
        while sent < body_size:
            piece = chunk[: body_size - sent]
            conn.send(piece)
            sent += len(piece)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), dict(resp.getheaders())
    finally:
        conn.close()


def test_a_9_mb_body_gets_the_413_not_a_broken_pipe(
    holder: ModelHolder, metrics: ServingMetrics
) -> None:
    # The agent's default limit (8 MiB) and the body size of issue 9's report.
    srv = InferenceServer(holder, metrics, poll_interval=0.05)
    srv.start()
    try:
        holder.swap(ScriptedModel(), REF_A)
        for _ in range(3):  # every time, not by luck of timing
            status, body, headers = _post_raw(srv.port, 9 * 1024 * 1024)
            assert status == 413
            assert body["error"]["code"] == "too_large"
            assert "exceeds 8388608" in body["error"]["message"]
            assert headers["Connection"] == "close"
        assert metrics.total_requests == 0
        # The server still answers afterwards.
        status, _, _ = call(srv, "GET", "/healthz")
        assert status == 200
    finally:
        srv.stop()


def test_413_is_sent_before_the_body_is_read(server: InferenceServer, holder: ModelHolder) -> None:
    # Headers only, no body yet: the answer must come from Content-Length alone.
    holder.swap(ScriptedModel(), REF_A)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 9437184\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(4096)
            assert data, f"connection closed without an answer: {answer!r}"
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_token_guards_inference_and_model_but_not_health(
    holder: ModelHolder, metrics: ServingMetrics, onnx_model: LoadedModel
) -> None:
    token = "s3cret-Token_value"  # noqa: S105 - a test value
    srv = InferenceServer(
        holder, metrics, max_body_bytes=64 * 1024, poll_interval=0.05, token=token
    )
    srv.start()
    try:
        holder.swap(onnx_model, REF_A)
        body = json.dumps({"inputs": {"x": [[1.0, 2.0, 3.0]]}}).encode()

        def request(path: str, auth: str | None, data: bytes | None = None) -> tuple[int, Any]:
            req = urllib.request.Request(srv.url + path, data=data)
            if auth is not None:
                req.add_header("Authorization", auth)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as err:
                with err:
                    status = err.code
                    challenge = err.headers.get("WWW-Authenticate", "")
                    answer = json.loads(err.read())
            assert status != 401 or challenge.startswith("Bearer"), challenge
            return status, answer

        for auth in (None, "Bearer wrong", f"Basic {token}", f"Bearer {token}x", "Bearer"):
            status, answer = request("/v1/infer", auth, body)
            assert (status, answer["error"]["code"]) == (401, "unauthorized"), auth
            status, answer = request("/v1/model", auth)
            assert (status, answer["error"]["code"]) == (401, "unauthorized"), auth
        assert metrics.total_requests == 0  # refused requests never reach the model

        status, answer = request("/v1/infer", f"Bearer {token}", body)
        assert status == 200 and answer["model"]["version"] == "1.0.0"
        status, answer = request("/v1/model", f"bearer {token}")
        assert status == 200
        assert request("/healthz", None) == (200, {"status": "ok"})
        assert metrics.total_requests == 1
        # A refused client sending a large body still reads its 401.
        status, answer, _ = _post_raw(srv.port, 2 * 1024 * 1024)
        assert (status, answer["error"]["code"]) == (401, "unauthorized")
    finally:
        srv.stop()


@pytest.mark.parametrize("token", ["", "two words", "caf\u00e9", "tab\there"])
def test_unusable_token_is_a_config_error(
    holder: ModelHolder, metrics: ServingMetrics, token: str
) -> None:
    with pytest.raises(ConfigError, match="token"):
        InferenceServer(holder, metrics, token=token)


def test_batch_size_is_recorded_per_request(
    server: InferenceServer, holder: ModelHolder, metrics: ServingMetrics, onnx_model: LoadedModel
) -> None:
    holder.swap(onnx_model, REF_A)
    for rows in (1, 3, 40):
        status, _ = infer(server, {"x": [[1.0, 2.0, 3.0]] * rows})
        assert status == 200
    stats = metrics.take_window()
    assert (stats.requests, stats.samples) == (3, 44)
    # 40 of the 44 samples came in the big batch: it sets the per-sample median.
    assert stats.sample_p50_ms is not None and stats.p50_ms is not None
    assert stats.sample_p50_ms < stats.p50_ms


def test_a_burst_of_connections_queues_instead_of_having_its_syns_dropped(
    server: InferenceServer,
) -> None:
    # issue 9: one request took 31.6 s during a model switch. When the accept
    # queue is full the kernel drops a SYN and the client retries after 1, 2,
    # 4, 8, 16 s (31 s in all). Stop the accept loop (a starved serving thread)
    # and connect more clients than the old backlog of 64 held.
    httpd = server._httpd
    assert httpd is not None
    httpd.shutdown()  # the socket keeps listening; nothing accepts
    sel = selectors.DefaultSelector()
    socks = []
    try:
        for _ in range(200):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", server.port))
            sel.register(sock, selectors.EVENT_WRITE)
            socks.append(sock)
        connected = 0
        deadline = time.monotonic() + 0.8  # well before the first SYN retry at 1 s
        while connected < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.05):
                sel.unregister(key.fileobj)
                connected += 1
        assert connected == 200, f"only {connected} of 200 connections were queued"
    finally:
        for sock in socks:
            sock.close()
        sel.close()


def test_body_without_length_is_411(server: InferenceServer, holder: ModelHolder) -> None:
    holder.swap(ScriptedModel(), REF_A)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/infer")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        assert resp.status == 411
        assert json.loads(resp.read())["error"]["code"] == "length_required"
    finally:
        conn.close()


def test_runtime_failure_is_500_and_counted(
    server: InferenceServer, holder: ModelHolder, metrics: ServingMetrics
) -> None:
    model = ScriptedModel(error=RuntimeError("kernel exploded"))
    holder.swap(model, REF_A)
    status, body = infer(server, {"x": [[1, 2, 3]]})
    assert status == 500
    assert body["error"]["code"] == "inference_failed"
    assert "kernel exploded" in body["error"]["message"]
    stats = metrics.take_window()
    assert (stats.requests, stats.errors) == (1, 1)


def test_non_finite_outputs_become_null(server: InferenceServer, holder: ModelHolder) -> None:
    holder.swap(ScriptedModel(value=float("nan")), REF_A)
    status, body = infer(server, {"x": [[1, 2, 3]]})
    assert status == 200
    assert body["outputs"]["y"] == [[None, None, None]]


def test_parallel_requests(
    server: InferenceServer, holder: ModelHolder, metrics: ServingMetrics, onnx_model: LoadedModel
) -> None:
    holder.swap(onnx_model, REF_A)
    results: list[int] = []

    def client(i: int) -> None:
        status, body = infer(server, {"x": [[i, i, i]]})
        if status == 200 and body["outputs"]["y"] == [[2.0 * i + 1] * 3]:
            results.append(i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(16))
    assert metrics.total_requests == 16


# --------------------------------------------------------------------------- swaps
def test_swap_during_inflight_request_finishes_on_old_model(
    server: InferenceServer, holder: ModelHolder, metrics: ServingMetrics
) -> None:
    gate = threading.Event()
    old = ScriptedModel(value=1.0, gate=gate)
    new = ScriptedModel(value=2.0)
    holder.swap(old, REF_A)
    answer: dict[str, Any] = {}

    def slow_client() -> None:
        answer["status"], answer["body"] = infer(server, {"x": [[0, 0, 0]]})

    client = threading.Thread(target=slow_client)
    client.start()
    try:
        assert old.started.wait(timeout=10), "request never reached the model"
        holder.swap(new, REF_B)
        # New requests already see the new model while the old one is busy.
        status, body = infer(server, {"x": [[0, 0, 0]]})
        assert (status, body["model"]["release"], body["outputs"]["y"]) == (200, 2, [[2.0] * 3])
    finally:
        gate.set()
        client.join(timeout=10)
    assert answer["status"] == 200
    assert answer["body"]["model"]["release"] == 1
    assert answer["body"]["outputs"]["y"] == [[1.0, 1.0, 1.0]]
    assert (old.calls, new.calls) == (1, 1)
    assert metrics.take_window().errors == 0


def test_holder_swap_and_clear() -> None:
    holder = ModelHolder()
    assert holder.current() is None
    model = ScriptedModel()
    holder.swap(model, REF_A)
    assert holder.current() == (model, REF_A)
    holder.clear()
    assert holder.current() is None


# --------------------------------------------------------------------------- other endpoints
def test_model_endpoint_describes_io(
    server: InferenceServer, holder: ModelHolder, onnx_model: LoadedModel
) -> None:
    holder.swap(onnx_model, REF_A)
    status, body, _ = call(server, "GET", "/v1/model")
    assert status == 200
    assert body == {
        "model": REF_A.to_dict(),
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 3]}],
    }


def test_healthz(server: InferenceServer, holder: ModelHolder) -> None:
    assert call(server, "GET", "/healthz")[:2] == (200, {"status": "no_model"})
    holder.swap(ScriptedModel(), REF_A)
    assert call(server, "GET", "/healthz")[:2] == (200, {"status": "ok"})


def test_unknown_path_and_wrong_method(server: InferenceServer) -> None:
    status, body, _ = call(server, "GET", "/v3/whatever")
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body, headers = call(server, "GET", "/v1/infer")
    assert (status, body["error"]["code"], headers["Allow"]) == (405, "method_not_allowed", "POST")
    status, body, _ = call(server, "DELETE", "/v1/model")
    assert status == 405


def test_request_logging_is_silent_on_stderr(
    server: InferenceServer, capfd: pytest.CaptureFixture[str]
) -> None:
    call(server, "GET", "/healthz")
    call(server, "GET", "/nope")
    assert capfd.readouterr().err == ""


# --------------------------------------------------------------------------- lifecycle
def test_refuses_non_loopback_bind_unless_allowed(
    holder: ModelHolder, metrics: ServingMetrics
) -> None:
    for host in ("0.0.0.0", "192.168.1.10", "gateway.local", "::"):  # noqa: S104
        with pytest.raises(ConfigError, match="non-loopback"):
            InferenceServer(holder, metrics, host=host)
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        InferenceServer(holder, metrics, host=host)
    everywhere = "0.0.0.0"  # noqa: S104 - constructed, never started
    remote = InferenceServer(holder, metrics, host=everywhere, allow_remote=True)
    assert remote.host == everywhere


def test_start_stop_port_and_url(holder: ModelHolder, metrics: ServingMetrics) -> None:
    srv = InferenceServer(holder, metrics, poll_interval=0.05)
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.port
    srv.start()
    try:
        assert srv.port > 0
        assert srv.url == f"http://127.0.0.1:{srv.port}"
        with pytest.raises(RuntimeError, match="already started"):
            srv.start()
        assert call(srv, "GET", "/healthz")[0] == 200
        url = srv.url
    finally:
        srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/healthz", timeout=2)
