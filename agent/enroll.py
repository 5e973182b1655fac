"""First-start enrollment and the private-key permission check.

On its first start a device has only an enrollment token file (from
``edgefleet device token``): a one-time token, the enrollment URL and the CA
certificate. :func:`prepare_identity` then

1. generates the device's private key *on the device* (``identity/device.key``,
   0600; it never leaves),
2. sends a CSR (CN = device id) with the token to the controller over HTTPS,
   checking the server's certificate against the CA from the token file,
3. writes what comes back - client certificate, CA chain, broker address, TUF
   root - atomically into ``<state_dir>/identity/``, the certificate last,
   because its presence is what "enrolled" means.

Every later start finds the certificate and just uses it. Before any start the
private key's mode is checked: a key readable by group or others is refused,
since anyone who can read it can be this device on the broker.

Only the stdlib (urllib, ssl) and ``cryptography`` are used: the agent stays
small and never imports the controller. ``cryptography`` and urllib are
imported only when enrolling (the first start): an enrolled agent never loads
them for this (about 10 MB of RSS on x86-64; see BENCHMARKS.md, "Agent
footprint").
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.protocols.errors import ConfigError
from edgefleet.shared.durable import atomic_write
from edgefleet.shared.link import BrokerSettings

if TYPE_CHECKING:
    import urllib.error

__all__ = [
    "EnrollmentFailedError",
    "EnrollmentSettings",
    "Identity",
    "check_private_key_file",
    "enroll",
    "prepare_identity",
]

log = logging.getLogger(__name__)

ENROLL_PATH = "/v1/enroll"
TOKEN_FILE_KIND = "edgefleet-enrollment/v1"  # noqa: S105 - a format tag, not a secret
MAX_RESPONSE_BYTES = 1024 * 1024


class EnrollmentFailedError(ConfigError):
    """Enrollment could not complete; the message says why and what to do."""

    code = "enrollment_failed"


@dataclass(frozen=True)
class EnrollmentSettings:
    """The agent config's ``[enrollment]`` table.

    ``token_file`` is the JSON file ``edgefleet device token`` wrote; ``url``
    overrides the URL in it (e.g. when the device reaches the controller
    through another name).
    """

    token_file: Path
    url: str | None = None
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Identity:
    """The files enrollment leaves in ``<state_dir>/identity/``."""

    directory: Path

    @property
    def key_file(self) -> Path:
        return self.directory / "device.key"

    @property
    def cert_file(self) -> Path:
        return self.directory / "device.pem"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def root_file(self) -> Path:
        return self.directory / "root.json"

    @property
    def broker_file(self) -> Path:
        return self.directory / "broker.json"

    @property
    def enrolled(self) -> bool:
        return self.cert_file.exists()


def check_private_key_file(path: Path) -> None:
    """Refuse a private key that group or others may read, write or execute.

    Raises:
        ConfigError: the file is missing, a symlink, or has group/other bits set.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read private key {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"private key {path} must be a regular file, not a link")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"private key {path} has mode {mode:04o}: group/others can read it, so "
            f"anyone on this machine could impersonate the device. Refusing to start; "
            f"fix with: chmod 600 {path}"
        )


def prepare_identity(
    device_id: str,
    state_dir: Path,
    broker: BrokerSettings,
    trust_root: Path | None,
    enrollment: EnrollmentSettings | None,
) -> tuple[BrokerSettings, Path | None]:
    """Enroll if needed and return the broker settings and trust root to use.

    Without ``enrollment`` the configured settings are returned unchanged
    (after the key check). With it, host/port/TLS files come from enrollment
    and the other ``[broker]`` knobs (keepalive, timeouts) from the config.

    Raises:
        EnrollmentFailedError: the controller refused or could not be reached.
        ConfigError: the key file is readable by others, or the token file is bad.
    """
    if enrollment is not None:
        identity = Identity(state_dir / "identity")
        if not identity.enrolled:
            enroll(device_id, identity, enrollment)
        broker = _enrolled_broker(identity, broker)
        if trust_root is None:
            trust_root = identity.root_file
    if broker.key_file is not None:
        check_private_key_file(Path(broker.key_file))
    return broker, trust_root


def _enrolled_broker(identity: Identity, base: BrokerSettings) -> BrokerSettings:
    try:
        raw = json.loads(identity.broker_file.read_text())
        return replace(
            base,
            host=str(raw["host"]),
            port=int(raw["port"]),
            tls=bool(raw.get("tls", True)),
            ca_file=str(identity.ca_file),
            cert_file=str(identity.cert_file),
            key_file=str(identity.key_file),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"enrollment state {identity.broker_file} is unusable: {exc}") from None


def _read_token_file(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read enrollment token file {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"enrollment token file {path} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != TOKEN_FILE_KIND:
        raise ConfigError(f"{path} is not an edgefleet enrollment token file")
    for key in ("device_id", "token", "url", "ca_pem"):
        if not isinstance(doc.get(key), str):
            raise ConfigError(f"enrollment token file {path} lacks {key!r}")
    return doc


def enroll(device_id: str, identity: Identity, settings: EnrollmentSettings) -> None:
    """Run the enrollment exchange once and persist the result in ``identity``.

    The private key is created before the request and kept if it fails, so a
    retry (systemd restarts the agent) re-uses the same key.

    Raises:
        EnrollmentFailedError: the controller answered with an error, or could
            not be reached, or answered something unusable.
        ConfigError: the token file is missing or malformed, or is for another device.
    """
    import urllib.error
    import urllib.request

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    doc = _read_token_file(settings.token_file)
    if doc["device_id"] != device_id:
        raise ConfigError(
            f"enrollment token file {settings.token_file} is for {doc['device_id']!r}, "
            f"but this agent is {device_id!r}"
        )
    identity.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(identity.directory, 0o700)
    if identity.key_file.exists():
        check_private_key_file(identity.key_file)
        loaded = serialization.load_pem_private_key(identity.key_file.read_bytes(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{identity.key_file} is not an EC private key")
        key = loaded
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        _atomic_write(
            identity.key_file,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    url = (settings.url or doc["url"]).rstrip("/") + ENROLL_PATH
    if not url.startswith("https://"):
        raise ConfigError(f"enrollment URL must be https://, got {url!r}")
    body = json.dumps(
        {"token": doc["token"], "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode()}
    ).encode()
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=doc["ca_pem"])
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    request = urllib.request.Request(  # noqa: S310 - https only, checked above
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    log.info("enrolling %s at %s", device_id, url)
    try:
        with urllib.request.urlopen(  # noqa: S310 - https only, checked above
            request, timeout=settings.timeout_s, context=context
        ) as response:
            answer = json.loads(response.read(MAX_RESPONSE_BYTES))
    except urllib.error.HTTPError as exc:
        detail = _error_message(exc)
        raise EnrollmentFailedError(
            f"controller refused enrollment of {device_id} (HTTP {exc.code}): {detail}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EnrollmentFailedError(f"cannot enroll at {url}: {reason}") from None
    _store(identity, answer, device_id)
    log.info("enrolled %s; identity in %s", device_id, identity.directory)


def _store(identity: Identity, answer: Any, device_id: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert_pem = answer["certificate"].encode()
        chain = "".join(answer["ca_chain"]).encode()
        root = base64.b64decode(answer["tuf_root"], validate=True)
        broker = answer["broker"]
        broker_doc = {"host": str(broker["host"]), "port": int(broker["port"]), "tls": True}
        cert = x509.load_pem_x509_certificate(cert_pem)
        json.loads(root)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EnrollmentFailedError(
            f"controller sent an unusable enrollment answer: {exc}"
        ) from None
    key_pem = identity.key_file.read_bytes()
    ours = serialization.load_pem_private_key(key_pem, None).public_key()
    if cert.public_key() != ours:
        raise EnrollmentFailedError("the certificate from the controller is not for our key")
    cn = [a.value for a in cert.subject]
    if cn != [device_id]:
        raise EnrollmentFailedError(f"the certificate names {cn}, not {device_id}")
    _atomic_write(identity.ca_file, chain, 0o644)
    _atomic_write(identity.root_file, root, 0o644)
    _atomic_write(identity.broker_file, json.dumps(broker_doc).encode(), 0o644)
    _atomic_write(identity.cert_file, cert_pem, 0o644)  # last: marks "enrolled"


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        doc = json.loads(exc.read(MAX_RESPONSE_BYTES))
        return str(doc["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write via :func:`~edgefleet.shared.durable.atomic_write`; a failure is a ConfigError."""
    try:
        atomic_write(path, data, mode=mode)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
