"""The local HTTP inference endpoint (stdlib only).

Applications on the gateway call the model the agent currently runs over
plain HTTP+JSON on the loopback interface. The endpoint is deliberately
small: no framework, HTTP/1.1 with keep-alive and a thread per open
*connection*, not per request (``ThreadingHTTPServer`` with daemon threads;
onnxruntime sessions are safe to run concurrently), and JSON bodies bounded
by ``max_body_bytes``. It binds to 127.0.0.1 by default
and refuses any non-loopback address unless ``allow_remote=True``, since it
has no authentication.

Endpoints
---------

``POST /v1/infer``
    Request body::

        {"inputs": {"<input name>": <nested list of numbers>, ...}}

    Every model input must be given, with the rank and fixed dimensions the
    model declares; numbers are converted strictly to the input's dtype (see
    :func:`edgefleet.shared.runtime.coerce_inputs`). Responses:

    * 200 ``{"outputs": {"<output name>": <nested list>}, "model":
      {"name", "version", "release"}, "latency_ms": <float>}``; non-finite
      output values are sent as ``null``. ``latency_ms`` is the model run
      only, without HTTP and JSON work.
    * 400 ``{"error": {"code": "bad_json" | "bad_request" | "bad_input",
      "message"}}``: unparseable body, no ``inputs`` object, or inputs that
      do not fit the model.
    * 401 ``unauthorized``: a ``token`` is configured and the request has no
      ``Authorization: Bearer <token>`` header with it (``WWW-Authenticate:
      Bearer`` is sent). Checked before the body is read.
    * 411 ``length_required``: no ``Content-Length`` (chunked bodies are not
      accepted).
    * 413 ``too_large``: body larger than ``max_body_bytes``. Decided from the
      ``Content-Length`` header alone and answered *before* any of the body is
      read; see "Refusing a body" below.
    * 503 ``no_model``: no model is loaded yet.
    * 500 ``inference_failed``: the runtime raised.

``GET /v1/model``
    200 ``{"model": {"name", "version", "release", "target"}, "inputs":
    [<tensor spec>], "outputs": [<tensor spec>]}`` where a tensor spec is
    ``{"name", "dtype", "shape"}`` (``null`` for a dynamic axis); 503
    ``no_model`` when none is loaded.

``GET /metrics``
    The agent's metrics in the Prometheus text format (``text/plain``, as
    prometheus_client writes it), from :class:`~edgefleet.agent.metrics.PrometheusExporter`:
    inference latency histograms (per request and per sample), inference
    requests and errors by reason, the active model, installs and refusals,
    RSS, CPU seconds and uptime. It follows the same rules as ``/v1/model``:
    the loopback-only bind (it is the same listener) and the token when one
    is configured, because it tells a caller as much - which model and
    version run here, how busy the device is, what it refused. Scrape it from
    the gateway itself (a local Prometheus, or an agent-mode collector that
    remote-writes); see docs/security.md.

``GET /healthz``
    Never needs the token. Always 200 while the process serves: ``{"status": "ok"}`` with a model,
    ``{"status": "no_model"}`` without one. It is a liveness check; use the
    body (or ``/v1/model``'s 503) for readiness.

Open Inference Protocol (KServe v2), for clients that already speak it
(tritonclient, KServe's): ``GET /v2`` (server metadata, extensions
``binary_tensor_data``), ``GET /v2/health/live``, ``GET /v2/health/ready``
(503 ``{"ready": false}`` without a model), ``GET /v2/models/{name}[/versions/
{version}]`` (metadata: datatypes ``FP32``, ``INT32``..., ``-1`` for a dynamic
axis), ``.../ready`` and ``POST .../infer``. An infer body is
``{"inputs": [{"name", "shape", "datatype", "data"}], "outputs"?,
"parameters"?, "id"?}`` with ``data`` flat (row-major) or nested, converted as
strictly as v1 inputs; or, with the binary tensor data extension, a JSON header
of ``Inference-Header-Content-Length`` bytes followed by each input's raw
little-endian bytes (``parameters.binary_data_size``). Outputs come back as
JSON ``data`` or, when asked (``binary_data_output`` or an output's
``binary_data``), as raw bytes after the JSON header with the same header
field. ``{name}`` must be the served model (404 ``unknown_model``). Errors are
the OIP shape ``{"error": "<message>", "code": "<our code>"}`` with the same
statuses and codes as v1. The health paths need no token; the rest do when
one is set.

Other paths answer 404 ``not_found``, other methods 405
``method_not_allowed``.

Only requests that reach the model (v1 or v2) are recorded in
:class:`~edgefleet.agent.metrics.ServingMetrics` (success, or failure for a
500), together with their batch size (the leading dimension of the first
input), so telemetry can report latency per sample; refused requests (4xx,
503) are not inferences and are not counted there. Prometheus does see them:
every inference request counts in ``edgefleet_agent_inference_requests_total``
and a refused one in ``edgefleet_agent_inference_errors_total`` under its
error code (:meth:`ServingMetrics.refuse`).

Authentication
--------------
With ``token`` set (``[http] token`` in the agent config), ``/v1/infer``,
``/v1/model`` and ``/metrics`` need ``Authorization: Bearer <token>``; the comparison is
constant-time (:func:`hmac.compare_digest`). It is meant for gateways where
other local users exist: without it any local process can call the model and
load the device. ``/healthz`` stays open so a supervisor needs no secret.

Refusing a body
---------------
A refusal (401, 411, 413) is decided from the request line and headers and
sent before the body is read. A client that is already sending a large body
(``http.client``/``urllib`` send all of it before reading any answer) would
get a broken pipe if we closed the socket with its body unread, because the
kernel answers unread input with a reset that destroys our reply. So after
the reply the server reads and discards the rest of the declared body - at
most ``_DRAIN_MAX_BYTES`` and for at most ``_DRAIN_DEADLINE_S`` seconds in
total, so a refused client cannot hold a thread - then closes. A client that
sent ``Expect: 100-continue`` (curl does for bodies over 1 MB) gets the
refusal instead of a 100 and sends no body at all, so nothing is drained.

Connections and the listen backlog
----------------------------------
The listen backlog is ``_BACKLOG`` (the kernel caps it at
``net.core.somaxconn``). When the accept queue is full the kernel drops a
client's SYN and the client retries after 1, 2, 4, 8 and 16 s: issue 9's
31.6 s request during a model switch is that schedule (1+2+4+8+16 = 31 s) plus
the request. The old backlog of 64 overflowed as soon as more connections were
pending than that while the accept loop was slow; a deep backlog keeps them
queued instead. ``bench/serving_backlog.py`` reproduces both (BENCHMARKS.md).

Keep-alive (issue 11): answering HTTP/1.0 and closing every connection made
each request pay a TCP connect, an accept and a new thread. Now a connection
serves requests until the client closes it, says ``Connection: close``, or
stays idle for ``_KEEPALIVE_IDLE_S``; each request's reads still time out
after 30 s. Replies leave in one write (a 64 KiB write buffer) on a socket
without Nagle (``TCP_NODELAY``): HTTP/1.1 with Nagle and split writes waited
for delayed ACKs (44 ms p50). At most ``_MAX_CONNECTIONS`` connections are
served at once; the next one gets a 503 ``busy`` from the accept thread and is
closed, so idle clients cannot make the agent spawn threads without bound. A
reply to a request whose body was not read (a refusal, a wrong path) closes
the connection after draining, since that body would otherwise be parsed as
the next request.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import numpy as np

from edgefleet import __version__
from edgefleet.agent.metrics import ActiveModelInfo, PrometheusExporter, ServingMetrics
from edgefleet.protocols.bundle import TensorSpec
from edgefleet.protocols.errors import ConfigError
from edgefleet.protocols.messages import ModelRef
from edgefleet.shared.runtime import InferenceInputError, LoadedModel, coerce_inputs

__all__ = ["DEFAULT_MAX_BODY_BYTES", "HttpAddressError", "InferenceServer", "ModelHolder"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


class ModelHolder:
    """The live model and its reference, swapped atomically.

    The pair is stored as one tuple and replaced in one assignment under a
    lock, so a reader sees either the old or the new pair, never a model
    with the other's reference.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: tuple[LoadedModel, ModelRef] | None = None

    def swap(self, model: LoadedModel, ref: ModelRef) -> None:
        """Make ``model`` the one new requests use; in-flight requests keep theirs."""
        with self._lock:
            self._current = (model, ref)

    def clear(self) -> None:
        """Stop serving any model (new requests get 503)."""
        with self._lock:
            self._current = None

    def current(self) -> tuple[LoadedModel, ModelRef] | None:
        """The live ``(model, ref)``, or None before the first model is loaded."""
        with self._lock:
            return self._current


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _jsonable(array: np.ndarray) -> Any:
    """Nested lists for JSON; NaN/inf become None because JSON has no such numbers."""
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        as_objects = array.astype(object)
        as_objects[~np.isfinite(array)] = None
        return as_objects.tolist()
    return array.tolist()


# After refusing a body, read and discard up to this much of it within this
# many seconds in total: closing a socket with unread input makes the kernel
# send a reset, which destroys our answer before the client reads it. Loopback
# moves 64 MiB in well under a second; a client slower than that is cut off.
_DRAIN_MAX_BYTES = 64 * 1024 * 1024
_DRAIN_DEADLINE_S = 5.0
# Listen backlog; the kernel caps it at net.core.somaxconn (4096 on current
# Linux). A full accept queue makes the kernel drop SYNs, which clients retry
# after 1, 2, 4, 8, 16 s: queueing is far kinder than that.
_BACKLOG = 1024
# Connections served at once (each holds a thread while open). Beyond this a
# new connection gets a 503 and is closed.
_MAX_CONNECTIONS = 256
# An idle keep-alive connection is closed after this long without a new
# request (the 30 s handler timeout still bounds each read of a request).
_KEEPALIVE_IDLE_S = 15.0
# Linux only (see _Handler.parse_request).
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
_BUSY_BODY = b'{"error":{"code":"busy","message":"too many open connections"}}'
_BUSY_REPLY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\n\r\n"
    + _BUSY_BODY
)


def _batch_size(feeds: Mapping[str, np.ndarray]) -> int:
    """Samples in one request: the leading dimension of the first input (1 for a scalar).

    Inputs of one request share their batch axis (the model would refuse them
    otherwise), so the first one is as good as any.
    """
    for array in feeds.values():
        return int(array.shape[0]) if array.ndim else 1
    return 1


def _model_info(holder: ModelHolder) -> ActiveModelInfo | None:
    """What a bare server knows of its model: the reference only."""
    live = holder.current()
    if live is None:
        return None
    ref = live[1]
    return ActiveModelInfo(ref.name, ref.version, ref.release)


# Open Inference Protocol (KServe v2) tensor types <-> numpy dtype names.
_V2_TO_NUMPY = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_NUMPY_TO_V2 = {v: k for k, v in _V2_TO_NUMPY.items()}
_V2_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|infer))?$")
_V2_OPEN = frozenset({"/v2/health/live", "/v2/health/ready"})
_HEADER_LENGTH = "Inference-Header-Content-Length"


def _v2_spec(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": _NUMPY_TO_V2.get(spec.dtype, spec.dtype.upper()),
        "shape": [-1 if d is None else d for d in spec.shape],
    }


def _v2_input(
    item: Any, specs: Mapping[str, TensorSpec], binary: memoryview, offset: int
) -> tuple[str, np.ndarray, int]:
    """One OIP input tensor as an array; returns ``(name, array, new binary offset)``.

    JSON ``data`` (flat, row-major, or nested) is converted as strictly as
    the v1 API's inputs; binary data (``parameters.binary_data_size``) must
    be exactly ``shape`` elements of ``datatype``, little-endian.
    """
    if not isinstance(item, dict):
        raise _HttpError(400, "bad_request", "each input must be an object")
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise _HttpError(400, "bad_request", "an input needs a string name and datatype")
    if (
        not isinstance(shape, list)
        or len(shape) > 32
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _HttpError(400, "bad_request", f"input {name!r}: shape must be a list of sizes")
    spec = specs.get(name)
    if spec is None:
        raise _HttpError(400, "bad_input", f"the model has no input {name!r}")
    dtype = _V2_TO_NUMPY.get(datatype)
    if dtype is None or dtype != spec.dtype:
        want = _NUMPY_TO_V2.get(spec.dtype, spec.dtype)
        raise _HttpError(400, "bad_input", f"input {name!r} is {want}, got datatype {datatype!r}")
    count = math.prod(shape)
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise _HttpError(400, "bad_request", f"input {name!r}: parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        itemsize = np.dtype(dtype).itemsize
        if not isinstance(size, int) or isinstance(size, bool) or size != count * itemsize:
            raise _HttpError(
                400, "bad_input", f"input {name!r}: binary_data_size must be {count * itemsize}"
            )
        if offset + size > len(binary):
            raise _HttpError(400, "bad_request", f"input {name!r}: binary data is cut short")
        array = np.frombuffer(
            binary, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=offset
        ).reshape(shape)
        if array.dtype != np.dtype(dtype):  # a big-endian host
            array = array.astype(dtype)
        return name, array, offset + size
    data = item.get("data")
    if not isinstance(data, list):
        raise _HttpError(400, "bad_request", f"input {name!r} needs data or binary_data_size")
    try:
        nested = np.asarray(data, dtype=object).reshape(shape).tolist()
    except ValueError as exc:
        raise _HttpError(
            400, "bad_input", f"input {name!r}: data does not fit {shape}: {exc}"
        ) from None
    try:
        return name, coerce_inputs({name: nested}, [spec])[name], offset
    except InferenceInputError as exc:
        raise _HttpError(400, "bad_input", str(exc)) from None


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Deep enough that a burst of connections waits in the accept queue
    # instead of having its SYNs dropped (see the module docstring).
    request_queue_size = _BACKLOG
    max_connections = _MAX_CONNECTIONS

    def __init__(
        self,
        address: tuple[str, int],
        holder: ModelHolder,
        metrics: ServingMetrics,
        max_body_bytes: int,
        token: str | None = None,
        exporter: PrometheusExporter | None = None,
    ) -> None:
        self.holder = holder
        self.metrics = metrics
        self.exporter = exporter
        self.max_body_bytes = max_body_bytes
        self.token = None if token is None else token.encode()
        self._open = 0
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        request, address = super().get_request()
        # No Nagle: a keep-alive client waiting for our reply must not wait
        # for the ACK of its previous one (40 ms with delayed ACKs).
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return request, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per *connection*, at most ``max_connections`` at once.

        With keep-alive a connection serves many requests on its thread; a
        connection beyond the cap is answered 503 on the accept thread and
        closed, so idle or slow clients cannot make the agent spawn threads
        without bound.
        """
        with self._open_lock:
            full = self._open >= self.max_connections
            if not full:
                self._open += 1
        if full:
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(_BUSY_REPLY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._open_lock:
                self._open -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open -= 1


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edgefleet-agent"
    sys_version = ""
    # Keep-alive: one connection serves many requests (a client that says
    # HTTP/1.0 or Connection: close still gets one answer and a close).
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one write (the handler flushes after each
    # request); larger bodies stream through the buffer.
    wbufsize = 64 * 1024
    # A client that stops sending mid-request must not hold a thread forever.
    timeout = 30
    _ALLOWED: ClassVar[dict[str, str]] = {
        "/v1/infer": "POST",
        "/v1/model": "GET",
        "/healthz": "GET",
        "/metrics": "GET",
    }
    # Requests to these paths are inference requests: counted for Prometheus
    # whatever their outcome (see ServingMetrics.refuse).
    _INFERENCE: ClassVar[frozenset[str]] = frozenset({"/v1/infer"})

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def setup(self) -> None:
        super().setup()
        self._served = 0
        self._body_consumed = False

    def handle_one_request(self) -> None:
        # Between keep-alive requests a shorter idle limit applies; the
        # request's own reads get the full timeout back (parse_request).
        if self._served:
            with contextlib.suppress(OSError):
                self.connection.settimeout(_KEEPALIVE_IDLE_S)
        self._body_consumed = False
        super().handle_one_request()
        self._served += 1

    def handle_expect_100(self) -> bool:
        # Not yet: "100 Continue" goes out only when the body is wanted (see
        # _read_body), so a refused client gets its 401/411/413 instead and
        # never sends the body.
        return True

    def parse_request(self) -> bool:
        with contextlib.suppress(OSError):
            self.connection.settimeout(self.timeout)
            if _QUICKACK is not None:
                # ACK the headers now rather than 40 ms later: a client with
                # Nagle on that writes headers and body separately (curl and
                # C clients can) holds the body until that ACK. On a fresh
                # connection Linux ACKs at once anyway; on a kept-alive one
                # it delays, and such requests took 45 ms instead of 1.
                self.connection.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return super().parse_request()

    # ------------------------------------------------------------------ plumbing
    def _send(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        self._send_bytes(status, payload, "application/json", headers)

    def _send_bytes(
        self,
        status: int,
        payload: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        headers = dict(headers or {})
        unread = 0 if self._body_consumed else self._declared_length()
        if unread or (not self._body_consumed and self.headers.get("Transfer-Encoding")):
            # A body we did not read would be parsed as the next request.
            headers["Connection"] = "close"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)
        # Closing with the body unread would reset the connection and destroy
        # this reply (module docstring, "Refusing a body"); a client that sent
        # Expect: 100-continue got no 100 and sends no body.
        if unread and self.headers.get("Expect", "").lower() != "100-continue":
            self._discard_input(unread)

    def _send_error(self, err: _HttpError) -> None:
        headers = dict(err.headers)
        if err.status == 405:
            headers["Allow"] = self._ALLOWED.get(self._path(), "")
        if err.status in (401, 411, 413):
            # We did not read the body; the connection cannot be reused.
            self.close_connection = True
            headers["Connection"] = "close"
        path = self._path()
        if path == "/v2" or path.startswith("/v2/"):
            # The OIP error shape: {"error": "<message>"}; our code rides along.
            self._send(err.status, {"error": err.message, "code": err.code}, headers)
            return
        self._send(err.status, {"error": {"code": err.code, "message": err.message}}, headers)

    def _discard_input(self, declared: int) -> None:
        """Read and drop up to ``declared`` body bytes, bounded in size and time.

        The reply is already flushed, so the client can read it as soon as it
        stops sending; draining only keeps the kernel from resetting the
        connection (and destroying that reply) while the client still sends.
        """
        self.wfile.flush()
        remaining = min(declared, _DRAIN_MAX_BYTES)
        deadline = time.monotonic() + _DRAIN_DEADLINE_S
        with contextlib.suppress(OSError):
            while remaining > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(remaining, 256 * 1024))
                if not chunk:
                    break
                remaining -= len(chunk)

    def _declared_length(self) -> int:
        """The body length the headers declare; 0 when none is declared."""
        try:
            return max(0, int(self.headers.get("Content-Length", "0")))
        except ValueError:
            return 0

    def _authorize(self, path: str) -> None:
        """Refuse a request to a protected endpoint without the configured token."""
        token = self.server.token
        if token is None or path == "/healthz" or path in _V2_OPEN:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, credential = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credential.strip().encode(), token
        ):
            raise _HttpError(
                401,
                "unauthorized",
                "this endpoint needs Authorization: Bearer <token>",
                headers={"WWW-Authenticate": 'Bearer realm="edgefleet-agent"'},
            )

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _is_inference(self, path: str) -> bool:
        if path in self._INFERENCE:
            return True
        match = _V2_MODEL_PATH.match(path)
        return match is not None and match.group(3) == "infer"

    def _route(self, method: str) -> None:
        path = self._path()
        if path == "/v2" or path.startswith("/v2/"):
            self._route_v2(method, path)
            return
        allowed = self._ALLOWED.get(path)
        if allowed is None:
            raise _HttpError(404, "not_found", f"no endpoint {path}")
        if allowed != method:
            raise _HttpError(405, "method_not_allowed", f"{path} accepts {allowed} only")
        self._authorize(path)
        if path == "/v1/infer":
            self._infer()
        elif path == "/v1/model":
            self._model()
        elif path == "/metrics":
            self._metrics()
        else:
            self._health()

    def _dispatch(self, method: str) -> None:
        try:
            self._route(method)
        except _HttpError as err:
            # A refused inference request (not a wrong path or method, and not
            # a runtime failure, which record() counted) is an error to report.
            if err.code not in (
                "not_found",
                "method_not_allowed",
                "inference_failed",
            ) and self._is_inference(self._path()):
                self.server.metrics.refuse(err.code)
            self._send_error(err)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    # ------------------------------------------------------------------ endpoints
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise _HttpError(411, "length_required", "send the body with a Content-Length")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise _HttpError(411, "length_required", "Content-Length is required")
        try:
            length = int(raw_length)
        except ValueError:
            raise _HttpError(400, "bad_request", "Content-Length is not a number") from None
        if length < 0:
            raise _HttpError(400, "bad_request", "Content-Length is negative")
        if length > self.server.max_body_bytes:
            # Decided from the header: not one byte of the body is read first.
            raise _HttpError(
                413,
                "too_large",
                f"body of {length} bytes exceeds {self.server.max_body_bytes}",
            )
        if (
            self.request_version != "HTTP/1.0"
            and self.headers.get("Expect", "").lower() == "100-continue"
        ):
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            # The client stopped sending (the handler's socket timeout);
            # http.server closes the connection after this.
            if self._is_inference(self._path()):
                self.server.metrics.refuse("timeout")
            raise
        if len(body) < length:
            # The client closed mid-body: nothing to answer on this connection.
            self.close_connection = True
        self._body_consumed = True
        return body

    def _infer(self) -> None:
        body = self._read_body()
        live = self.server.holder.current()  # one reference for the whole request
        if live is None:
            raise _HttpError(503, "no_model", "no model is loaded yet")
        model, ref = live
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _HttpError(400, "bad_json", f"body is not valid JSON: {exc}") from None
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), dict):
            raise _HttpError(400, "bad_request", 'body must be {"inputs": {"<name>": [...]}}')
        try:
            feeds = coerce_inputs(request["inputs"], model.inputs)
        except InferenceInputError as exc:
            raise _HttpError(400, "bad_input", str(exc)) from None
        outputs, latency = self._run_model(model, feeds, ref.label)
        self._send(
            200,
            {
                "outputs": {name: _jsonable(np.asarray(v)) for name, v in outputs.items()},
                "model": {"name": ref.name, "version": ref.version, "release": ref.release},
                "latency_ms": latency * 1000.0,
            },
        )

    def _model(self) -> None:
        live = self.server.holder.current()
        if live is None:
            raise _HttpError(503, "no_model", "no model is loaded yet")
        model, ref = live
        self._send(
            200,
            {
                "model": ref.to_dict(),
                "inputs": [s.to_dict() for s in model.inputs],
                "outputs": [s.to_dict() for s in model.outputs],
            },
        )

    # ------------------------------------------------------- Open Inference Protocol
    def _route_v2(self, method: str, path: str) -> None:
        if path in ("/v2", "/v2/health/live", "/v2/health/ready"):
            if method != "GET":
                raise _HttpError(405, "method_not_allowed", f"{path} accepts GET only")
            self._authorize(path)
            if path == "/v2":
                self._send(
                    200,
                    {
                        "name": "edgefleet-agent",
                        "version": __version__,
                        "extensions": ["binary_tensor_data"],
                    },
                )
            elif path == "/v2/health/live":
                self._send(200, {"live": True})
            else:
                ready = self.server.holder.current() is not None
                self._send(200 if ready else 503, {"ready": ready})
            return
        match = _V2_MODEL_PATH.match(path)
        if match is None:
            raise _HttpError(404, "not_found", f"no endpoint {path}")
        name, version, action = match.groups()
        want = "POST" if action == "infer" else "GET"
        if method != want:
            raise _HttpError(405, "method_not_allowed", f"{path} accepts {want} only")
        self._authorize(path)
        live = self.server.holder.current()
        if live is not None and (live[1].name != name or version not in (None, live[1].version)):
            label = name if version is None else f"{name} version {version}"
            raise _HttpError(404, "unknown_model", f"this device does not serve {label}")
        if action == "ready":
            self._send(200 if live else 503, {"name": name, "ready": live is not None})
            return
        if live is None:
            if action == "infer":
                self._read_body()  # the 503 keeps the connection: body consumed
            raise _HttpError(503, "no_model", "no model is loaded yet")
        if action == "infer":
            self._infer_v2(live)
            return
        model, ref = live
        info = self.server.exporter.active_model() if self.server.exporter else None
        self._send(
            200,
            {
                "name": ref.name,
                "versions": [ref.version],
                "platform": info.runtime if info is not None and info.runtime else "edgefleet",
                "inputs": [_v2_spec(s) for s in model.inputs],
                "outputs": [_v2_spec(s) for s in model.outputs],
            },
        )

    def _infer_v2(self, live: tuple[LoadedModel, ModelRef]) -> None:
        model, ref = live
        raw_header = self.headers.get(_HEADER_LENGTH)
        body = self._read_body()
        header_len = len(body)
        if raw_header is not None:
            try:
                header_len = int(raw_header)
            except ValueError:
                raise _HttpError(400, "bad_request", f"{_HEADER_LENGTH} is not a number") from None
            if not 0 <= header_len <= len(body):
                raise _HttpError(400, "bad_request", f"{_HEADER_LENGTH} exceeds the body")
        view = memoryview(body)
        try:
            request = json.loads(view[:header_len].tobytes())
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _HttpError(400, "bad_json", f"body is not valid JSON: {exc}") from None
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
            raise _HttpError(400, "bad_request", 'body must be {"inputs": [<tensor>, ...]}')
        specs = {s.name: s for s in model.inputs}
        binary = view[header_len:]
        feeds: dict[str, np.ndarray] = {}
        offset = 0
        for item in request["inputs"]:
            name, array, offset = _v2_input(item, specs, binary, offset)
            if name in feeds:
                raise _HttpError(400, "bad_input", f"input {name!r} is given twice")
            feeds[name] = array
        if offset != len(binary):
            raise _HttpError(400, "bad_request", "binary data beyond the declared inputs")
        wanted = self._v2_outputs(request, model)
        outputs, _latency = self._run_model(model, feeds, ref.label)
        tensors, blobs = [], []
        for name, as_binary in wanted:
            array = np.ascontiguousarray(outputs[name])
            tensor: dict[str, Any] = {
                "name": name,
                "datatype": _NUMPY_TO_V2.get(array.dtype.name, array.dtype.name.upper()),
                "shape": list(array.shape),
            }
            if as_binary:
                blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
                tensor["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                tensor["data"] = _jsonable(array.reshape(-1))
            tensors.append(tensor)
        reply: dict[str, Any] = {
            "model_name": ref.name,
            "model_version": ref.version,
            "outputs": tensors,
        }
        if isinstance(request.get("id"), str):
            reply["id"] = request["id"]
        header = json.dumps(reply, separators=(",", ":"), allow_nan=False).encode()
        if not blobs:
            self._send_bytes(200, header, "application/json")
            return
        self._send_bytes(
            200,
            b"".join([header, *blobs]),
            "application/octet-stream",
            {_HEADER_LENGTH: str(len(header))},
        )

    def _run_model(self, model: Any, feeds: dict[str, Any], label: str) -> tuple[Any, float]:
        """Run one inference for v1 and v2 alike: its outputs and seconds, recorded in metrics."""
        batch = _batch_size(feeds)
        start = time.perf_counter()
        try:
            outputs = model.run(feeds)
        except InferenceInputError as exc:
            raise _HttpError(400, "bad_input", str(exc)) from None
        except Exception as exc:  # anything the runtime raises is a failed inference
            self.server.metrics.record(time.perf_counter() - start, ok=False, batch=batch)
            log.warning("inference on %s failed: %s", label, exc, exc_info=True)
            raise _HttpError(500, "inference_failed", f"inference failed: {exc}") from None
        latency = time.perf_counter() - start
        self.server.metrics.record(latency, ok=True, batch=batch)
        return outputs, latency

    @staticmethod
    def _v2_outputs(request: dict[str, Any], model: LoadedModel) -> list[tuple[str, bool]]:
        """Which outputs to return, and whether each goes as binary data."""
        params = request.get("parameters")
        default_binary = isinstance(params, dict) and params.get("binary_data_output") is True
        asked = request.get("outputs")
        if asked is None:
            return [(s.name, default_binary) for s in model.outputs]
        names = {s.name for s in model.outputs}
        if not isinstance(asked, list):
            raise _HttpError(400, "bad_request", "outputs must be a list")
        wanted = []
        for item in asked:
            if not isinstance(item, dict) or item.get("name") not in names:
                raise _HttpError(400, "bad_request", f"the model has no output {item!r}")
            item_params = item.get("parameters")
            binary = default_binary
            if isinstance(item_params, dict) and "binary_data" in item_params:
                binary = item_params["binary_data"] is True
            wanted.append((str(item["name"]), binary))
        return wanted

    def _metrics(self) -> None:
        exporter = self.server.exporter
        if exporter is None:
            raise _HttpError(404, "not_found", "no endpoint /metrics")
        self._send_bytes(200, exporter.render(), exporter.content_type)

    def _health(self) -> None:
        live = self.server.holder.current()
        self._send(200, {"status": "no_model" if live is None else "ok"})


class HttpAddressError(ConfigError, OSError):
    """The inference endpoint cannot listen on its address: taken, or not ours to bind."""

    code = "http_address"

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if cause.errno == errno.EADDRINUSE:
            why = (
                f"port {port} is already in use (another agent?); give each agent its own "
                "[http] port (or EDGEFLEET_AGENT_HTTP_PORT)"
            )
        else:
            why = cause.strerror or str(cause)
        super().__init__(f"cannot serve inference on {where}: {why}")
        self.errno = cause.errno


class InferenceServer:
    """Serves the model in a :class:`ModelHolder` over HTTP on a background thread."""

    def __init__(
        self,
        holder: ModelHolder,
        metrics: ServingMetrics,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        *,
        allow_remote: bool = False,
        poll_interval: float = 0.2,
        token: str | None = None,
        exporter: PrometheusExporter | None = None,
    ) -> None:
        """Configure the server; nothing is bound until :meth:`start`.

        Args:
            port: 0 picks a free port; read it from :attr:`port` after start.
            allow_remote: permit a non-loopback ``host``. The endpoint has no
                authentication, so exposing it is an explicit decision.
            poll_interval: how often the serving loop checks for :meth:`stop`.
            token: when set, ``/v1/infer``, ``/v1/model`` and ``/metrics``
                need ``Authorization: Bearer <token>`` (``/healthz`` stays open).
            exporter: what ``GET /metrics`` serves; by default the serving
                metrics and the active model's name and version (the agent
                passes one that also knows installs, refusals and the
                model's variant and runtime).

        Raises:
            ConfigError: ``host`` is not a loopback address and ``allow_remote``
                is false, ``max_body_bytes`` is not positive, or ``token`` is
                empty or not printable ASCII (it must fit an HTTP header).
        """
        if not allow_remote and not _is_loopback(host):
            raise ConfigError(
                f"refusing to serve inference on non-loopback address {host!r}; "
                "pass allow_remote=True to expose the unauthenticated endpoint"
            )
        if max_body_bytes < 1:
            raise ConfigError("max_body_bytes must be positive")
        if token is not None and (
            not token or not token.isascii() or not token.isprintable() or " " in token
        ):
            raise ConfigError(
                "the inference token must be non-empty printable ASCII without spaces"
            )
        self._token = token
        self.holder = holder
        self.metrics = metrics
        self.exporter = exporter or PrometheusExporter(metrics, model=lambda: _model_info(holder))
        self.host = host
        self._port = port
        self.max_body_bytes = max_body_bytes
        self._poll = poll_interval
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the socket and serve on a daemon thread.

        Raises:
            RuntimeError: already started.
            HttpAddressError: the address cannot be bound (an ``OSError`` and
                a ``ConfigError``); the message names the address and port.
        """
        if self._httpd is not None:
            raise RuntimeError("server already started")
        cls = _Server6 if ":" in self.host else _Server
        try:
            httpd = cls(
                (self.host, self._port),
                self.holder,
                self.metrics,
                self.max_body_bytes,
                self._token,
                self.exporter,
            )
        except OSError as exc:
            raise HttpAddressError(self.host, self._port, exc) from exc
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": self._poll},
            name="edgefleet-inference-http",
            daemon=True,
        )
        self._thread.start()
        log.info("inference endpoint listening on %s", self.url)

    def stop(self) -> None:
        """Stop accepting requests and close the socket; idempotent.

        Requests already being handled run on in their daemon threads.
        """
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = self._thread = None

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8123``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"
