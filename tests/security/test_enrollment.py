"""Enrollment over real HTTPS: the agent's client against the controller's server."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import stat
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from edgefleet.agent.enroll import (
    EnrollmentFailedError,
    EnrollmentSettings,
    Identity,
    enroll,
    prepare_identity,
)
from edgefleet.controller.ca import CertificateAuthority
from edgefleet.controller.enrollment import (
    DeviceBroker,
    EnrollmentLimits,
    EnrollmentServer,
    TokenStore,
    token_file_document,
)
from edgefleet.protocols.errors import ConfigError
from edgefleet.shared.link import BrokerSettings
from tests.security.conftest import key_and_csr

ROOT = b'{"signed": {"_type": "root"}, "signatures": []}'


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(ca: CertificateAuthority, tmp_path: Path, clock: Clock) -> Iterator[EnrollmentServer]:
    refusals: list[str] = []
    srv = EnrollmentServer(
        ca,
        TokenStore(tmp_path / "enrollment", clock=clock),
        lambda: ROOT,
        DeviceBroker("mqtt.example.net", 8883),
        port=0,
        on_refusal=lambda reason, n: refusals.extend([reason] * n),
    )
    srv.hook_calls = refusals  # type: ignore[attr-defined]
    srv.start()
    yield srv
    srv.stop()


def token_file(
    server: EnrollmentServer, device_id: str, tmp_path: Path, ttl_s: float = 600
) -> EnrollmentSettings:
    token = server.tokens.create(device_id, ttl_s)
    doc = token_file_document(device_id, token, server.url, server.ca.cert_pem, 0)
    path = tmp_path / f"{device_id}-enrollment.json"
    path.write_text(json.dumps(doc))
    return EnrollmentSettings(token_file=path, timeout_s=10)


def post(server: EnrollmentServer, body: Any) -> tuple[int, dict[str, Any]]:
    context = ssl.create_default_context(cadata=server.ca.cert_pem.decode())
    request = urllib.request.Request(
        f"{server.url}/v1/enroll",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_first_start_enrolls_with_a_key_generated_on_the_device(
    server: EnrollmentServer, tmp_path: Path
) -> None:
    settings = token_file(server, "gw-1", tmp_path)
    state = tmp_path / "state"
    broker, trust_root = prepare_identity(
        "gw-1", state, BrokerSettings(keepalive_s=17), None, settings
    )
    identity = Identity(state / "identity")
    assert stat.S_IMODE(identity.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(identity.directory.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(identity.cert_file.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=gw-1"
    cert.verify_directly_issued_by(server.ca.certificate)
    assert trust_root == identity.root_file and trust_root.read_bytes() == ROOT
    assert (broker.host, broker.port, broker.tls) == ("mqtt.example.net", 8883, True)
    assert broker.key_file == str(identity.key_file)
    assert broker.keepalive_s == 17  # the config's other [broker] knobs are kept
    # The private key never travelled: the server's CA index only knows a certificate.
    assert b"PRIVATE" not in (server.ca.directory / "index.json").read_bytes()

    # A second start does not enroll again (the token is spent) but reuses the identity.
    again, _ = prepare_identity("gw-1", state, BrokerSettings(), None, settings)
    assert again.cert_file == broker.cert_file
    assert server.enrolled["gw-1"] == 1


def test_a_used_token_is_refused(server: EnrollmentServer, tmp_path: Path) -> None:
    settings = token_file(server, "gw-2", tmp_path)
    enroll("gw-2", Identity(tmp_path / "first"), settings)
    with pytest.raises(EnrollmentFailedError, match=r"HTTP 403.*already used"):
        enroll("gw-2", Identity(tmp_path / "second"), settings)
    assert not Identity(tmp_path / "second").enrolled
    assert server.refusals["used_token"] == 1
    assert server.hook_calls == ["used_token"]  # type: ignore[attr-defined]


def test_an_expired_token_is_refused(
    server: EnrollmentServer, tmp_path: Path, clock: Clock
) -> None:
    settings = token_file(server, "gw-3", tmp_path, ttl_s=60)
    clock.now += 61
    with pytest.raises(EnrollmentFailedError, match=r"HTTP 403.*expired"):
        enroll("gw-3", Identity(tmp_path / "id"), settings)
    assert server.refusals["expired_token"] == 1


def test_unknown_token_and_malformed_requests_are_refused(server: EnrollmentServer) -> None:
    _key, csr = key_and_csr("gw-4")
    status, body = post(server, {"token": "not-a-token", "csr_pem": csr.decode()})
    assert (status, body["error"]["code"]) == (401, "unknown_token")
    status, body = post(server, ["not", "an", "object"])
    assert status == 400
    status, body = post(server, {"token": 7, "csr_pem": None})
    assert status == 400
    status, body = post(server, {"x": "y" * 70_000})
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert server.refusals == {"unknown_token": 1, "bad_request": 2, "too_large": 1}


def test_csr_for_another_device_is_refused_and_keeps_the_token(
    server: EnrollmentServer,
) -> None:
    token = server.tokens.create("gw-5")
    _key, csr_other = key_and_csr("gw-6")  # a token for gw-5 must not yield gw-6's identity
    status, body = post(server, {"token": token, "csr_pem": csr_other.decode()})
    assert (status, body["error"]["code"]) == (400, "bad_csr")
    assert "CN=gw-5" in body["error"]["message"]
    info = server.tokens.info(token)
    assert info is not None and info.used_at is None

    _key, csr = key_and_csr("gw-5")
    status, body = post(server, {"token": token, "csr_pem": csr.decode()})
    assert status == 200
    assert base64.b64decode(body["tuf_root"]) == ROOT
    assert body["broker"] == {"host": "mqtt.example.net", "port": 8883, "tls": True}
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert cert.subject.rfc4514_string() == "CN=gw-5"


def test_agent_refuses_an_enrollment_server_it_cannot_authenticate(
    server: EnrollmentServer, tmp_path: Path
) -> None:
    """A man in the middle with a certificate from another CA gets no CSR and no token."""
    imposter_ca = CertificateAuthority.init(tmp_path / "other-ca")
    token = server.tokens.create("gw-7")
    doc = token_file_document("gw-7", token, server.url, imposter_ca.cert_pem, 0)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(EnrollmentFailedError, match="CERTIFICATE_VERIFY_FAILED"):
        enroll("gw-7", Identity(tmp_path / "id"), EnrollmentSettings(path, timeout_s=5))
    info = server.tokens.info(token)
    assert info is not None and info.used_at is None


def test_token_file_for_another_device_is_refused(server: EnrollmentServer, tmp_path: Path) -> None:
    settings = token_file(server, "gw-8", tmp_path)
    with pytest.raises(ConfigError, match="is for 'gw-8'"):
        enroll("gw-9", Identity(tmp_path / "id"), settings)


def test_token_store_keeps_only_hashes(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "enrollment")
    token = store.create("gw-10", 60)
    raw = (tmp_path / "enrollment" / "tokens.json").read_text()
    assert token not in raw
    assert stat.S_IMODE((tmp_path / "enrollment" / "tokens.json").stat().st_mode) == 0o600
    with store.redeem(token) as device_id:
        assert device_id == "gw-10"
    with pytest.raises(Exception, match="already used"), store.redeem(token):
        pass


def idle_sockets(server: EnrollmentServer, count: int, source: str) -> list[socket.socket]:
    """``count`` TCP connections from ``source`` that never send a byte (no ClientHello)."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", server.port))
        socks.append(sock)
    return socks


def wait_until(condition: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_idle_connections_do_not_delay_a_legitimate_enrollment(
    server: EnrollmentServer, tmp_path: Path
) -> None:
    """Issue 9 item 3: 100 idle sockets (another host) and a device still enrolls at once.

    Before the fix the TLS handshake ran inside ``accept()`` with no timeout,
    so the first idle socket stopped the endpoint for everyone.
    """
    settings = token_file(server, "gw-11", tmp_path)
    socks = idle_sockets(server, 100, "127.0.0.2")
    try:
        started = time.monotonic()
        enroll("gw-11", Identity(tmp_path / "id"), settings)
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, f"enrollment took {elapsed:.1f} s behind 100 idle sockets"
        assert server.enrolled["gw-11"] == 1
        # The idle host holds at most its per-source share of workers; the rest
        # were closed on accept, counted and reported per reason.
        limited = ("too_many_connections_from_source", "rate_limited")
        wait_until(lambda: sum(server.refusals[r] for r in limited) == 92)
        assert server.active_connections == 8
        wait_until(
            lambda: sum(1 for r in server.hook_calls if r in limited) == 92  # type: ignore[attr-defined]
        )
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture
def tight(ca: CertificateAuthority, tmp_path: Path, clock: Clock) -> Iterator[EnrollmentServer]:
    """A server with small bounds and a frozen clock (token buckets never refill)."""
    reported: Counter[str] = Counter()

    def on_refusal(reason: str, count: int) -> None:
        reported[reason] += count

    srv = EnrollmentServer(
        ca,
        TokenStore(tmp_path / "enrollment-tight", clock=clock),
        lambda: ROOT,
        DeviceBroker("mqtt.example.net", 8883),
        port=0,
        limits=EnrollmentLimits(
            handshake_timeout_s=1.0,
            max_connections=6,
            per_source_connections=4,
            per_source_burst=10,
        ),
        on_refusal=on_refusal,
        clock=clock,
    )
    srv.reported = reported  # type: ignore[attr-defined]
    srv.start()
    yield srv
    srv.stop()


def test_connection_and_rate_limits_are_enforced_counted_and_reported(
    tight: EnrollmentServer, tmp_path: Path
) -> None:
    reported: Counter[str] = tight.reported  # type: ignore[attr-defined]
    first = idle_sockets(tight, 12, "127.0.0.2")
    try:
        # Per source: 4 slots; every attempt spends a token of the burst of 10.
        wait_until(
            lambda: (
                tight.refusals["too_many_connections_from_source"] == 6
                and tight.refusals["rate_limited"] == 2
            )
        )
        assert tight.active_connections == 4
        # Overall: 6 slots, so a second host gets the 2 that are left.
        second = idle_sockets(tight, 3, "127.0.0.3")
        wait_until(lambda: tight.refusals["too_many_connections"] == 1)
        assert tight.active_connections == 6
        # The handshake timeout frees every slot: idle clients cost a worker 1 s.
        wait_until(lambda: tight.refusals["handshake_timeout"] == 6, timeout_s=5)
        wait_until(lambda: tight.active_connections == 0)
        # A client that stalls after the handshake is timed out as well.
        context = ssl.create_default_context(cadata=tight.ca.cert_pem.decode())
        with (
            socket.create_connection(("127.0.0.1", tight.port)) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"POST /v1/enroll HTTP/1.1\r\n")  # and then nothing
            tls.settimeout(5)
            assert tls.recv(1024) == b""  # the server gave up on us
        wait_until(lambda: tight.active_connections == 0)
        assert tight.refusals["request_timeout"] == 1
        # A source that used its burst is refused until its bucket refills:
        # 127.0.0.2 spent all 10 tokens, and the clock is frozen.
        with socket.socket() as raw:
            raw.bind(("127.0.0.2", 0))
            raw.settimeout(5)
            raw.connect(("127.0.0.1", tight.port))
            # Closed on accept, before any handshake: an EOF or reset, never a session.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                context.wrap_socket(raw, server_hostname="127.0.0.1")
        wait_until(lambda: tight.refusals["rate_limited"] == 3)
        # ... while another source enrolls.
        post_status, _ = post(tight, {"token": "unknown", "csr_pem": "x"})
        assert post_status == 401
        # Everything refused was reported to the hook, summed per reason.
        wait_until(lambda: reported == tight.refusals)
        assert set(reported) == {
            "too_many_connections_from_source",
            "rate_limited",
            "too_many_connections",
            "handshake_timeout",
            "request_timeout",
            "unknown_token",
        }
        for sock in second:
            sock.close()
    finally:
        for sock in first:
            sock.close()


def test_csr_asking_for_a_ca_certificate_is_refused_with_a_reason(
    server: EnrollmentServer,
) -> None:
    """Issue 9 item 10: CA:TRUE used to be ignored and a client certificate issued."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    token = server.tokens.create("gw-13")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-13")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    status, body = post(server, {"token": token, "csr_pem": csr.decode()})
    assert (status, body["error"]["code"]) == (400, "bad_csr")
    assert "CA:TRUE" in body["error"]["message"]
    assert server.refusals["bad_csr"] == 1
    assert server.hook_calls == ["bad_csr"]  # type: ignore[attr-defined]
    info = server.tokens.info(token)
    assert info is not None and info.used_at is None  # the token is not burnt
    assert not [c for c in server.ca.issued() if c.common_name == "gw-13"]
