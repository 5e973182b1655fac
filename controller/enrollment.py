"""Device enrollment: one-time tokens and the HTTPS endpoint that redeems them.

Why HTTPS and not an MQTT enrollment topic: see ``docs/adr/0005-enrollment.md``.
In short, the broker then never needs a listener that admits clients without a
certificate.

Flow::

    operator:  edgefleet device token gw-1 --out DIR    -> DIR/enrollment.json
               (token, URL, the CA certificate; copied to the device with agent.toml)
    agent:     generates its key (never leaves the device), builds a CSR with CN=gw-1,
               POST https://controller:8443/v1/enroll {"token", "csr_pem"}
               (server certificate checked against the CA from the token file)
    server:    token known, unused, unexpired, for gw-1? -> sign the CSR, mark used
               <- {"device_id", "certificate", "ca_chain", "broker", "tuf_root"}

The token store keeps only SHA-256 hashes of tokens: reading the store (a
backup, a debug copy) does not let anyone enroll.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edgefleet.controller.ca import (
    CertificateAuthority,
    CertificateError,
    write_private_file,
    write_public_file,
)
from edgefleet.controller.errors import TrustError
from edgefleet.protocols.errors import EdgefleetError, TopicError
from edgefleet.protocols.topics import validate_device_id
from edgefleet.shared.durable import file_lock

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ENROLL_PATH",
    "EnrollmentError",
    "EnrollmentLimits",
    "EnrollmentServer",
    "TokenStore",
    "token_file_document",
]

log = logging.getLogger(__name__)

ENROLL_PATH = "/v1/enroll"
DEFAULT_TTL_S = 24 * 3600
MAX_BODY_BYTES = 64 * 1024
DRAIN_MAX_BYTES = 1024 * 1024
DEFAULT_HOST = "127.0.0.1"
"""Loopback only unless the operator chooses an address: see README "Production setup"."""
DEFAULT_PORT = 8443
TOKEN_FILE_KIND = "edgefleet-enrollment/v1"  # noqa: S105 - a format tag, not a secret


class EnrollmentError(EdgefleetError):
    """An enrollment was refused. ``reason`` is a stable code, ``status`` the HTTP status."""

    code = "enrollment"

    def __init__(self, reason: str, message: str, status: int = HTTPStatus.FORBIDDEN) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    device_id: str
    expires_at: float
    used_at: float | None


class TokenStore:
    """One-time, expiring enrollment tokens in ``<home>/enrollment/tokens.json``.

    Every read-modify-write holds an ``fcntl`` lock, so the CLI creating a
    token and the server redeeming one (in another process) cannot lose each
    other's update, and two concurrent redemptions of one token cannot both win.
    """

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self._clock = clock
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self._file = directory / "tokens.json"

    def create(self, device_id: str, ttl_s: float = DEFAULT_TTL_S) -> str:
        """A new token for ``device_id``; only its hash is stored.

        Raises:
            EnrollmentError: invalid device id or non-positive TTL.
        """
        try:
            validate_device_id(device_id)
        except TopicError as exc:
            raise EnrollmentError("bad_request", str(exc), HTTPStatus.BAD_REQUEST) from None
        if ttl_s <= 0:
            raise EnrollmentError("bad_request", "token TTL must be positive", 400)
        token = secrets.token_urlsafe(32)
        with self._locked() as tokens:
            now = self._clock()
            # Forget tokens that expired long ago, so the file does not grow forever.
            for key in [k for k, v in tokens.items() if v["expires_at"] < now - 7 * 86400]:
                del tokens[key]
            tokens[_hash(token)] = {
                "device_id": device_id,
                "expires_at": now + ttl_s,
                "used_at": None,
                "created_at": now,
            }
        return token

    @contextlib.contextmanager
    def redeem(self, token: str) -> Iterator[str]:
        """Check ``token`` and yield its device id; mark it used if the block succeeds.

        The lock is held for the whole block (signing one certificate), so a
        token is used at most once even under concurrent requests. If the block
        raises (say, the CSR is malformed), the token stays unused: a client bug
        should not burn the operator's token.

        Raises:
            EnrollmentError: the token is unknown (401), used (403) or expired (403).
        """
        if not isinstance(token, str) or not token:
            raise EnrollmentError("unknown_token", "no enrollment token", 401)
        key = _hash(token)
        with self._locked() as tokens:
            entry = tokens.get(key)
            if entry is None:
                raise EnrollmentError("unknown_token", "unknown enrollment token", 401)
            if entry["used_at"] is not None:
                raise EnrollmentError(
                    "used_token",
                    f"enrollment token for {entry['device_id']} was already used; "
                    "create a new one with `edgefleet device token`",
                )
            if entry["expires_at"] <= self._clock():
                raise EnrollmentError(
                    "expired_token",
                    f"enrollment token for {entry['device_id']} has expired; "
                    "create a new one with `edgefleet device token`",
                )
            yield str(entry["device_id"])
            entry["used_at"] = self._clock()

    def info(self, token: str) -> TokenInfo | None:
        with self._locked() as tokens:
            entry = tokens.get(_hash(token))
        if entry is None:
            return None
        return TokenInfo(entry["device_id"], entry["expires_at"], entry["used_at"])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        with file_lock(self.directory / ".lock"):
            try:
                tokens: dict[str, dict[str, Any]] = json.loads(self._file.read_text())["tokens"]
            except FileNotFoundError:
                tokens = {}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise TrustError(f"token store {self._file} is unreadable: {exc}") from exc
            before = json.dumps(tokens, sort_keys=True)
            yield tokens
            if json.dumps(tokens, sort_keys=True) != before:
                write_private_file(self._file, json.dumps({"tokens": tokens}, indent=1).encode())


def token_file_document(
    device_id: str, token: str, url: str, ca_pem: bytes, expires_at: float
) -> dict[str, Any]:
    """What the device receives out of band: enough to authenticate the controller.

    The CA certificate is included (not just a fingerprint) so the agent can
    verify the enrollment server's TLS certificate with the stdlib alone.
    """
    return {
        "kind": TOKEN_FILE_KIND,
        "device_id": device_id,
        "token": token,
        "url": url,
        "ca_pem": ca_pem.decode(),
        "expires_at": expires_at,
    }


@dataclass(frozen=True)
class DeviceBroker:
    """The broker address handed to devices (what *they* dial, not the controller)."""

    host: str
    port: int = 8883

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "tls": True}


@dataclass(frozen=True)
class EnrollmentLimits:
    """What one client (or a crowd of them) may cost the enrollment endpoint.

    The endpoint faces the network before any device has a certificate, so
    every connection is potentially hostile. Each bound is enforced before the
    connection costs more than a dict lookup, and every refusal is counted
    (:attr:`EnrollmentServer.refusals`, the ``on_refusal`` hook) and logged.

    Attributes:
        handshake_timeout_s: the TLS handshake must finish within this, and
            every later read or write of the request must make progress
            within it, or the connection is closed (``handshake_timeout`` /
            a timed-out request). An idle TCP connection thus holds a worker
            for at most this long.
        max_connections: connections being handshaken or served at once,
            over all clients; more are closed on accept (``too_many_connections``).
        per_source_connections: the same, per source IP, so one host cannot
            take every slot (``too_many_connections_from_source``).
        per_source_rate: connections a source may open per second, sustained
            (a token bucket; ``rate_limited``) ...
        per_source_burst: ... and at once, after being quiet.
        max_sources: source IPs remembered by the token buckets; a spoofed
            flood of addresses cannot grow the table past this.
    """

    handshake_timeout_s: float = 10.0
    max_connections: int = 64
    per_source_connections: int = 8
    per_source_rate: float = 2.0
    per_source_burst: int = 20
    max_sources: int = 10_000


class _SourceLimiter:
    """Per-source token buckets and connection counts, plus the global count.

    Called from the accept loop (``admit``) and the workers (``release``);
    everything is O(1) under one lock, so a flood costs the accept loop no
    more than accepting and closing.
    """

    def __init__(self, limits: EnrollmentLimits, clock: Callable[[], float]) -> None:
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, at)
        self._active: Counter[str] = Counter()
        self._total = 0

    def admit(self, source: str) -> str | None:
        """Take a connection slot for ``source``; the refusal reason if there is none."""
        limits = self._limits
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(source, (float(limits.per_source_burst), now))
            tokens = min(
                float(limits.per_source_burst), tokens + (now - at) * limits.per_source_rate
            )
            if source not in self._buckets and len(self._buckets) >= limits.max_sources:
                self._forget_idle_sources(now)
            if tokens < 1.0:
                self._buckets[source] = (tokens, now)
                return "rate_limited"
            # Every attempt spends a token, admitted or not: a source that
            # hammers a full server is rate limited like any other flood.
            self._buckets[source] = (tokens - 1.0, now)
            if self._total >= limits.max_connections:
                return "too_many_connections"
            if self._active[source] >= limits.per_source_connections:
                return "too_many_connections_from_source"
            self._active[source] += 1
            self._total += 1
            return None

    def release(self, source: str) -> None:
        with self._lock:
            self._total -= 1
            self._active[source] -= 1
            if self._active[source] <= 0:
                del self._active[source]

    @property
    def active(self) -> int:
        with self._lock:
            return self._total

    def _forget_idle_sources(self, now: float) -> None:
        """Drop buckets that have refilled (they hold no state worth keeping).

        If a flood of distinct sources keeps every bucket partly drained, the
        oldest half is dropped anyway: forgetting a bucket only forgives its
        source, it never refuses anyone.
        """
        limits = self._limits
        full = [
            src
            for src, (tokens, at) in self._buckets.items()
            if src not in self._active
            and tokens + (now - at) * limits.per_source_rate >= limits.per_source_burst
        ]
        for src in full:
            del self._buckets[src]
        if len(self._buckets) >= limits.max_sources:
            oldest = sorted(self._buckets.items(), key=lambda kv: kv[1][1])
            for src, _ in oldest[: len(oldest) // 2]:
                del self._buckets[src]


class _EnrollmentHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` whose accept loop never waits for a client.

    The listening socket stays plain TCP: a TLS-wrapped listening socket does
    the handshake inside ``accept()``, so one client that connects and sends
    nothing stops every other enrollment (issue 9, item 3). Here the accept
    loop only asks the :class:`_SourceLimiter` for a slot; the handshake runs
    in the connection's worker thread under a timeout.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        owner: EnrollmentServer,
        context: ssl.SSLContext,
    ) -> None:
        self.owner = owner
        self.context = context
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        source = str(client_address[0])
        reason = self.owner.limiter.admit(source)
        if reason is None:
            return True
        self.owner.refused_connection(reason, source)
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner.limiter.release(str(client_address[0]))

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            # No thread was started (out of threads): give the slot back here;
            # the caller closes the socket.
            self.owner.limiter.release(str(client_address[0]))
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the worker: the TLS handshake, bounded in time, then the HTTP request."""
        source = str(client_address[0])
        request.settimeout(self.owner.limits.handshake_timeout_s)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except TimeoutError:
            self.owner.refused_connection("handshake_timeout", source)
            return
        except (ssl.SSLError, OSError):
            self.owner.refused_connection("handshake_failed", source)
            return
        try:
            super().finish_request(tls, client_address)  # the HTTP request, over TLS
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def service_actions(self) -> None:
        """Between accept polls: report the connection refusals counted meanwhile."""
        self.owner.flush_refusals()


class EnrollmentServer:
    """The HTTPS enrollment endpoint (stdlib ``http.server`` + ``ssl``).

    Args:
        ca: signs device certificates.
        tokens: the token store.
        root_bytes: returns the current TUF root metadata (a callable, so a
            root rotated while the server runs is what new devices get).
        broker: what to tell devices about the broker.
        hostnames: names/IPs in the server's TLS certificate; devices dial one.
        host, port: where to listen (port 0: pick a free one). The default is
            loopback only: exposing the endpoint to the network is a decision
            (``edgefleet enroll-server --listen 0.0.0.0:8443``).
        limits: connection, rate and time bounds (:class:`EnrollmentLimits`).
        on_refusal: called with the reason code and count of refusals (e.g.
            to bump a registry counter). Refusals of a request are reported at
            once; refusals of a connection (rate limit, connection limits,
            handshake) are summed and reported twice a second from the accept
            loop, so a flood costs one call per reason, not one per
            connection. All refusals are also logged and counted in
            :attr:`refusals`.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        tokens: TokenStore,
        root_bytes: Callable[[], bytes],
        broker: DeviceBroker,
        *,
        hostnames: tuple[str, ...] = ("localhost", "127.0.0.1"),
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        limits: EnrollmentLimits = EnrollmentLimits(),
        on_refusal: Callable[[str, int], None] | None = None,
        on_enrolled: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ca = ca
        self.tokens = tokens
        self.root_bytes = root_bytes
        self.broker = broker
        self.limits = limits
        self.limiter = _SourceLimiter(limits, clock)
        self.refusals: Counter[str] = Counter()
        self.enrolled: Counter[str] = Counter()
        self._on_refusal = on_refusal
        self._on_enrolled = on_enrolled
        self._pending_lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._pending_sources: Counter[tuple[str, str]] = Counter()
        server_dir = tokens.directory / "server"
        pair = ca.issue_server_cert(hostnames)
        write_private_file(server_dir / "server.key", pair.key_pem)
        write_public_file(server_dir / "server.pem", pair.cert_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(server_dir / "server.pem", server_dir / "server.key")
        self._httpd = _EnrollmentHTTPServer((host, port), _make_handler(self), self, context)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        return f"https://{host if isinstance(host, str) else host.decode()}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever, name="enrollment-https", daemon=True
        )
        self._thread.start()

    def serve_forever(self) -> None:
        log.info(
            "enrollment endpoint on %s%s (at most %d connections, %d per source, "
            "%.1f/s per source, %.0f s handshake timeout)",
            self.url,
            ENROLL_PATH,
            self.limits.max_connections,
            self.limits.per_source_connections,
            self.limits.per_source_rate,
            self.limits.handshake_timeout_s,
        )
        try:
            self._httpd.serve_forever(poll_interval=0.5)
        finally:
            self.flush_refusals()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self.flush_refusals()

    @property
    def active_connections(self) -> int:
        """Connections being handshaken or served now."""
        return self.limiter.active

    # ------------------------------------------------------------------ the one operation
    def enroll(self, body: Any) -> dict[str, Any]:
        """Redeem a token for a certificate. Pure request -> response, used by the handler.

        Raises:
            EnrollmentError: malformed request (400), bad token (401/403), or a
                CSR the CA refuses (400).
        """
        if not isinstance(body, dict):
            raise EnrollmentError("bad_request", "expected a JSON object", 400)
        token, csr_pem = body.get("token"), body.get("csr_pem")
        if not isinstance(token, str) or not isinstance(csr_pem, str):
            raise EnrollmentError("bad_request", "'token' and 'csr_pem' must be strings", 400)
        with self.tokens.redeem(token) as device_id:
            try:
                cert = self.ca.issue_device_cert(csr_pem.encode(), device_id)
            except CertificateError as exc:
                raise EnrollmentError("bad_csr", str(exc), 400) from None
            root = self.root_bytes()
        self.enrolled[device_id] += 1
        if self._on_enrolled is not None:
            self._on_enrolled(device_id)
        log.info("enrolled device %s", device_id)
        return {
            "device_id": device_id,
            "certificate": cert.decode(),
            "ca_chain": [self.ca.cert_pem.decode()],
            "broker": self.broker.to_json(),
            "tuf_root": base64.b64encode(root).decode(),
        }

    def refused(self, reason: str, peer: str, message: str) -> None:
        """A request was refused: count, log and report it now."""
        self.refusals[reason] += 1
        log.warning("enrollment refused (%s) from %s: %s", reason, peer, message)
        self._report(reason, 1)

    def refused_connection(self, reason: str, peer: str) -> None:
        """A connection was refused or dropped before its request: count it now, report later.

        Called from the accept loop, so it only touches memory; the log line
        and the ``on_refusal`` call are made by :meth:`flush_refusals`, once
        per reason however many connections a flood opened.
        """
        with self._pending_lock:
            self.refusals[reason] += 1
            self._pending[reason] += 1
            if len(self._pending_sources) < 100 or (reason, peer) in self._pending_sources:
                self._pending_sources[(reason, peer)] += 1

    def flush_refusals(self) -> None:
        """Log and report the connection refusals counted since the last flush."""
        with self._pending_lock:
            pending, self._pending = self._pending, Counter()
            sources, self._pending_sources = self._pending_sources, Counter()
        for reason, count in sorted(pending.items()):
            top = ", ".join(
                f"{src} ({n})" for (why, src), n in sources.most_common() if why == reason
            )
            log.warning("enrollment refused %d connection(s) (%s) from %s", count, reason, top)
            self._report(reason, count)

    def _report(self, reason: str, count: int) -> None:
        if self._on_refusal is not None:
            try:
                self._on_refusal(reason, count)
            except Exception:  # counting must never turn a 4xx into a 500
                log.exception("on_refusal hook failed")


def _make_handler(server: EnrollmentServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgefleet-enroll"
        sys_version = ""
        # Every read and write of the request must make progress within this
        # (StreamRequestHandler sets it on the socket), so a client that
        # stalls mid-request frees its worker too.
        timeout = server.limits.handshake_timeout_s

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.client_address[0], *args)

        def log_error(self, format: str, *args: Any) -> None:
            # http.server reports a request that stalled past ``timeout`` only
            # through this hook ("Request timed out: %r").
            if args and isinstance(args[0], TimeoutError):
                server.refused_connection("request_timeout", str(self.client_address[0]))
            else:
                log.info("%s " + format, self.client_address[0], *args)

        def _reply(self, status: int, doc: dict[str, Any]) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _refuse(self, exc: EnrollmentError) -> None:
            server.refused(exc.reason, self.client_address[0], str(exc))
            self._reply(exc.status, {"error": {"code": exc.reason, "message": str(exc)}})

        def do_GET(self) -> None:
            self._refuse(EnrollmentError("not_found", "only POST /v1/enroll exists", 404))

        def do_POST(self) -> None:
            if self.path != ENROLL_PATH:
                self._refuse(EnrollmentError("not_found", "only POST /v1/enroll exists", 404))
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._refuse(EnrollmentError("bad_request", "Content-Length required", 411))
                return
            if not 0 < length <= MAX_BODY_BYTES:
                if MAX_BODY_BYTES < length <= DRAIN_MAX_BYTES:
                    # Read what the client is still sending, so it sees the 413
                    # instead of a reset; anything bigger is simply cut off.
                    self.rfile.read(length)
                else:
                    self.close_connection = True
                self._refuse(
                    EnrollmentError("too_large", f"body must be 1-{MAX_BODY_BYTES} bytes", 413)
                )
                return
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                self._refuse(EnrollmentError("bad_request", "body is not JSON", 400))
                return
            try:
                response = server.enroll(body)
            except EnrollmentError as exc:
                self._refuse(exc)
                return
            except (TrustError, OSError) as exc:
                log.exception("enrollment failed on the controller side")
                self._reply(500, {"error": {"code": "internal", "message": str(exc)}})
                return
            self._reply(200, response)

    return Handler
