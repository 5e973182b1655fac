"""A Mosquitto started with *the* production configuration, plus CA helpers.

The broker's ``mosquitto.conf`` and ACL come from
``edgefleet.controller.mosquitto_config`` - the same renderer that produced
``deploy/mosquitto-tls.conf`` - with only paths, port, persistence and log
destination changed for the test.

Mosquitto started as root drops to the ``mosquitto`` user before it reads its
certificates (verified with 2.0.11), so when the tests run as root the broker's
files live in a directory owned by that user, exactly as in production.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.controller.broker import free_port
from edgefleet.controller.ca import (
    CONTROLLER_COMMON_NAME,
    CertificateAuthority,
    write_private_file,
    write_public_file,
)
from edgefleet.controller.mosquitto_config import (
    MosquittoPaths,
    render_acl,
    render_mosquitto_conf,
)
from edgefleet.shared.link import BrokerSettings, MqttLink
from tests.conftest import require_mosquitto
from tests.support import MosquittoProcess


def key_and_csr(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """What an agent does on the device: a fresh P-256 key and a CSR for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def issue_device_files(ca: CertificateAuthority, device_id: str, out: Path) -> dict[str, str]:
    """A device key (0600), its certificate from ``ca``, and ``ca``'s certificate, as files."""
    k, csr = key_and_csr(device_id)
    write_private_file(out / "key.pem", key_pem(k))
    write_public_file(out / "cert.pem", ca.issue_device_cert(csr, device_id))
    write_public_file(out / "ca.pem", ca.cert_pem)
    return {
        "ca_file": str(out / "ca.pem"),
        "cert_file": str(out / "cert.pem"),
        "key_file": str(out / "key.pem"),
    }


class TlsBroker:
    """Mosquitto on a free loopback port with the production TLS config and ACL."""

    def __init__(
        self, ca: CertificateAuthority, client_dir: Path, *, log_denials: bool = True
    ) -> None:
        binary = require_mosquitto()
        self.ca = ca
        self.client_dir = client_dir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-mosq-"))
        certs = self.dir / "certs"
        server = ca.issue_server_cert(["localhost", "127.0.0.1"])
        write_public_file(certs / "ca.pem", ca.cert_pem)
        write_public_file(certs / "broker.pem", server.cert_pem)
        write_private_file(certs / "broker.key", server.key_pem)
        self.copy_crl()
        paths = MosquittoPaths(
            cert_dir=str(certs),
            acl_file=str(self.dir / "edgefleet.acl"),
            port=self.port,
            bind_address="127.0.0.1",
            persistence=False,
            log_file=str(self.dir / "mosquitto.log"),
            log_denials=log_denials,
        )
        write_public_file(self.dir / "edgefleet.acl", render_acl().encode())
        self.config = self.dir / "mosquitto.conf"
        write_public_file(self.config, render_mosquitto_conf(paths).encode())
        self._own_files()
        self.controller = self._client_files(CONTROLLER_COMMON_NAME, service=True)
        self.process = MosquittoProcess(binary, self.config, self.port, self.dir / "mosquitto.log")

    def _own_files(self) -> None:
        if os.geteuid() != 0:
            return
        user = pwd.getpwnam("mosquitto")
        for path in [self.dir, *self.dir.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)

    def copy_crl(self) -> None:
        write_public_file(self.dir / "certs" / "crl.pem", self.ca.crl_file.read_bytes())

    def _client_files(self, name: str, *, service: bool = False) -> BrokerSettings:
        out = self.client_dir / name
        if not service:
            return self.settings(**issue_device_files(self.ca, name, out))
        pair = self.ca.issue_client_cert(name)
        write_private_file(out / "key.pem", pair.key_pem)
        write_public_file(out / "cert.pem", pair.cert_pem)
        write_public_file(out / "ca.pem", self.ca.cert_pem)
        return self.settings(
            ca_file=str(out / "ca.pem"),
            cert_file=str(out / "cert.pem"),
            key_file=str(out / "key.pem"),
        )

    def service_client(self, common_name: str) -> BrokerSettings:
        """A service's key and client certificate (the CLI's, say), as ``broker-config`` makes."""
        return self._client_files(common_name, service=True)

    def device(self, device_id: str) -> BrokerSettings:
        """Enroll-equivalent for tests: a device key, CSR and certificate from the CA."""
        return self._client_files(device_id)

    def settings(self, **tls_files: str | None) -> BrokerSettings:
        return BrokerSettings(
            host="localhost",
            port=self.port,
            tls=True,
            connect_timeout_s=5,
            reconnect_min_delay_s=1,
            reconnect_max_delay_s=2,
            **tls_files,  # type: ignore[arg-type]
        )

    def start(self) -> None:
        self.process.start()

    def hup(self) -> None:
        """SIGHUP: mosquitto re-reads its configuration, including ``crlfile``."""
        self.process.hup()

    def log(self) -> str:
        return self.process.log()

    def stop(self) -> None:
        self.process.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


@pytest.fixture
def tls_broker(ca: CertificateAuthority, tmp_path: Path) -> Iterator[TlsBroker]:
    broker = TlsBroker(ca, tmp_path / "clients")
    broker.start()
    try:
        yield broker
    finally:
        broker.cleanup()


class Recorder:
    """Collects every message a link receives on a filter."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._cond:
            self.messages.append((topic, payload, retained))
            self._cond.notify_all()

    def payloads(self) -> list[bytes]:
        with self._cond:
            return [p for _t, p, _r in self.messages]

    def wait_for(self, payload: bytes, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while payload not in [p for _t, p, _r in self.messages]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


def connect(settings: BrokerSettings, client_id: str) -> MqttLink:
    link = MqttLink(settings, client_id)
    link.start(wait=True)
    return link
