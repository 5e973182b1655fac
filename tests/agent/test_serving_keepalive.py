"""Keep-alive on the inference endpoint: one connection, many requests, bounded.

Real sockets against a real server: connections are reused, a body the
server did not read closes the connection (it would be parsed as the next
request), ``Expect: 100-continue`` gets its 100 only when the body is
wanted, idle connections are closed, and open connections are capped.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent import serving
from edgefleet.agent.metrics import ServingMetrics
from edgefleet.agent.serving import InferenceServer, ModelHolder
from edgefleet.protocols.messages import ModelRef
from edgefleet.shared.runtime import OnnxRuntimeBackend
from tests.e2e.harness import wait_for
from tests.shared.test_runtime import write_affine_model

REF = ModelRef(name="affine", version="1.0.0", release=1, target="affine-1.tar")
BODY = json.dumps({"inputs": {"x": [[1.0, 2.0, 3.0]]}}).encode()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[InferenceServer]:
    holder = ModelHolder()
    holder.swap(OnnxRuntimeBackend().load(write_affine_model(tmp_path)), REF)
    srv = InferenceServer(holder, ServingMetrics(), max_body_bytes=64 * 1024, poll_interval=0.05)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def post(conn: http.client.HTTPConnection, path: str, body: bytes) -> http.client.HTTPResponse:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp


def read_reply(sock: socket.socket) -> bytes:
    """Bytes until the peer has sent one full JSON reply (headers and Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed early: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_one_connection_serves_many_requests(server: InferenceServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.connect()
        first = conn.sock
        for _ in range(20):
            resp = post(conn, "/v1/infer", BODY)
            assert resp.status == 200
            assert resp.version == 11
            assert resp.getheader("Connection") is None
        # A 400 whose body was read keeps the connection too.
        assert post(conn, "/v1/infer", b"{oops").status == 400
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b'{"status":"ok"}'
        assert conn.sock is first, "the client had to reconnect"
    finally:
        conn.close()


def test_an_unread_body_closes_the_connection(server: InferenceServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        # A POST to a path that reads no body: its body must not become the
        # next request, so the server answers and closes.
        smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(
            b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + str(len(smuggled)).encode()
            + b"\r\n\r\n"
            + smuggled
        )
        reply = read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 404 ")
        assert b"Connection: close" in reply
        # The body was not answered as a request of its own.
        assert sock.recv(65536) == b""


def test_expect_100_continue_gets_its_100_when_the_body_is_wanted(
    server: InferenceServer,
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n"
        )
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(1)
            assert chunk
            interim += chunk
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(BODY)
        reply = read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["outputs"]["y"] == [[3.0, 5.0, 7.0]]


def test_an_idle_keep_alive_connection_is_closed(
    server: InferenceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving, "_KEEPALIVE_IDLE_S", 0.3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_reply(sock).startswith(b"HTTP/1.1 200 ")
        # Then nothing: the server closes (recv returns b"") well before 30 s.
        assert sock.recv(65536) == b""


def test_open_connections_are_capped(server: InferenceServer) -> None:
    httpd = server._httpd
    assert httpd is not None
    httpd.max_connections = 2
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(2)]
    try:
        for sock in held:  # both are being served (their threads are up)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_reply(sock).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as third:
            reply = read_reply(third)
            assert reply.startswith(b"HTTP/1.1 503 ")
            assert b'"busy"' in reply
        held.pop().close()

        def served() -> bool:
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return read_reply(sock).startswith(b"HTTP/1.1 200 ")

        wait_for(served, 30, "a slot to free up after a client left")
    finally:
        for sock in held:
            sock.close()
