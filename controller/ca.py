"""The controller's certificate authority: who may talk to the broker at all.

Every MQTT client of a production fleet (each agent, the controller, the
broker itself) holds a certificate issued here. Mosquitto requires one
(``require_certificate true``), takes the client's identity from its common
name (``use_identity_as_username true``) and confines it with ACL patterns on
that name, so a device's certificate CN *is* its device id. Cutting a device
off is a revocation plus a new CRL file the broker reads.

Layout of ``<home>/ca/`` (directory 0700)::

    ca.key       the CA's private key (0600, refused when group/others can read it)
    ca.pem       the self-signed CA certificate (what brokers and agents trust)
    index.json   every certificate issued: serial, CN, role, expiry, revocation
    crl.pem      the current certificate revocation list
    .lock        fcntl lock: the enrollment server and the CLI may write at once

Keys are ECDSA P-256: every OpenSSL that Mosquitto and Python link against
supports it in TLS 1.2 and 1.3, which is not true of Ed25519 certificates
(Mosquitto 2.0 on OpenSSL 1.1 clients, many embedded TLS stacks).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.controller.errors import KeyPermissionError, TrustError
from edgefleet.protocols.errors import TopicError
from edgefleet.protocols.topics import validate_device_id
from edgefleet.shared.durable import InsecureFileError, atomic_write, file_lock, read_private

__all__ = [
    "CLI_COMMON_NAME",
    "CONTROLLER_COMMON_NAME",
    "RESERVED_PREFIX",
    "CertificateAuthority",
    "CertificateError",
    "IssuedCert",
    "KeyAndCert",
]

CONTROLLER_COMMON_NAME = "edgefleet-controller"
"""The controller's CN; the ACL grants this user everything under ``edgefleet/v1/``."""

CLI_COMMON_NAME = "edgefleet-cli"
"""The CLI's CN, distinct from ``serve``'s: the broker makes the CN the client id
(``use_username_as_clientid``), so a CLI holding the controller's certificate
would disconnect the running controller. The ACL lets it publish desired
states and the outbox marker only."""

RESERVED_PREFIX = "edgefleet-"
"""Device ids may not start with this: CNs of that form belong to services
(controller, broker). A device named ``edgefleet-controller`` would otherwise
get the controller's ACL rights."""

CA_VALIDITY = timedelta(days=3650)
DEVICE_VALIDITY = timedelta(days=365)
SERVER_VALIDITY = timedelta(days=365)
CRL_VALIDITY = timedelta(days=30)
"""A CRL past its ``next_update`` makes OpenSSL refuse *every* client, so the
CRL must be re-written (``edgefleet ca crl``, or any revocation) well before."""

_MIN_RSA_BITS = 2048


class CertificateError(TrustError):
    """A CSR or certificate request was refused (bad signature, wrong CN, weak key)."""

    code = "certificate"


@dataclass(frozen=True)
class IssuedCert:
    """One entry of the CA's index."""

    serial: int
    common_name: str
    role: str  # "device", "client", "server"
    not_after: datetime
    revoked_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": str(self.serial),
            "common_name": self.common_name,
            "role": self.role,
            "not_after": self.not_after.isoformat(),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IssuedCert:
        revoked = d.get("revoked_at")
        return cls(
            serial=int(d["serial"]),
            common_name=str(d["common_name"]),
            role=str(d["role"]),
            not_after=datetime.fromisoformat(d["not_after"]),
            revoked_at=None if revoked is None else datetime.fromisoformat(revoked),
        )


@dataclass(frozen=True)
class KeyAndCert:
    """A private key generated here (for the broker or the controller) and its certificate."""

    key_pem: bytes
    cert_pem: bytes


class CertificateAuthority:
    """A small file-backed CA. Open it with :meth:`init`, :meth:`open` or :meth:`open_or_init`."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.directory = directory
        self._key = key
        self.certificate = cert

    # ------------------------------------------------------------------ opening
    @classmethod
    def init(cls, directory: Path, *, common_name: str = "edgefleet CA") -> CertificateAuthority:
        """Create a new CA in ``directory`` (which must not hold one yet).

        Raises:
            TrustError: a CA exists there already, or the files cannot be written.
        """
        if (directory / "ca.key").exists():
            raise TrustError(f"a CA already exists in {directory}")
        _private_dir(directory)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _atomic_write(directory / "ca.key", key_pem, 0o600)
        _atomic_write(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        ca = cls(directory, key, cert)
        with ca._locked():
            ca._write_index([])
            ca._write_crl_locked([])
        return ca

    @classmethod
    def open(cls, directory: Path) -> CertificateAuthority:
        """Open an existing CA, refusing a private key others can read.

        Raises:
            KeyPermissionError: ``ca.key`` is accessible by group or others.
            TrustError: there is no CA in ``directory`` or its files are corrupt.
        """
        key_path = directory / "ca.key"
        if not key_path.exists():
            raise TrustError(f"no CA in {directory}: run `edgefleet ca init` first")
        raw_key = read_private_file(key_path)
        try:
            key = serialization.load_pem_private_key(raw_key, password=None)
            cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        except (OSError, ValueError) as exc:
            raise TrustError(f"cannot load the CA in {directory}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TrustError(f"{key_path} is not an EC private key")
        return cls(directory, key, cert)

    @classmethod
    def open_or_init(cls, directory: Path) -> CertificateAuthority:
        if (directory / "ca.key").exists():
            return cls.open(directory)
        return cls.init(directory)

    # ------------------------------------------------------------------ facts
    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def crl_file(self) -> Path:
        return self.directory / "crl.pem"

    def issued(self) -> list[IssuedCert]:
        """Every certificate this CA issued, oldest first."""
        with self._locked():
            return self._read_index()

    # ------------------------------------------------------------------ issuing
    def issue_device_cert(
        self, csr_pem: bytes, device_id: str, *, validity: timedelta = DEVICE_VALIDITY
    ) -> bytes:
        """Sign a device's CSR: the key stays on the device, only the CSR travels.

        The CSR must be self-signed by the key it carries (proof the requester
        holds the key) and name exactly ``device_id`` as its only CN, because
        the broker's ACL confines a client by that name.

        Returns:
            The PEM client certificate.

        Raises:
            CertificateError: the CSR is malformed, its signature is wrong, its
                CN is not ``device_id``, the id is invalid or reserved, the
                key is too weak, or it asks to be a CA (``basicConstraints
                CA:TRUE``: the certificate issued would not be one, and a
                device that asks for it is refused, not silently downgraded).
        """
        try:
            validate_device_id(device_id)
        except TopicError as exc:
            raise CertificateError(str(exc)) from None
        if device_id.startswith(RESERVED_PREFIX):
            raise CertificateError(
                f"device id {device_id!r} is reserved: ids starting with {RESERVED_PREFIX!r} "
                "name services, and the broker ACL would give it their rights"
            )
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CertificateError(f"not a PEM certificate signing request: {exc}") from None
        try:
            valid = csr.is_signature_valid
        except (InvalidSignature, ValueError):
            valid = False
        if not valid:
            raise CertificateError("the CSR's signature does not match its public key")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or cns[0].value != device_id:
            got = [c.value for c in cns]
            raise CertificateError(f"the CSR must name exactly CN={device_id}, it names {got}")
        _refuse_requested_ca(csr)
        public_key = csr.public_key()
        _check_key_strength(public_key)
        return self._issue(
            device_id,
            public_key,
            role="device",
            validity=validity,
            san=None,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        ).cert_pem

    def issue_client_cert(
        self, common_name: str = CONTROLLER_COMMON_NAME, *, validity: timedelta = SERVER_VALIDITY
    ) -> KeyAndCert:
        """A key and client certificate for a service (the controller) generated here."""
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self._issue(
            common_name,
            key.public_key(),
            role="client",
            validity=validity,
            san=None,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        return KeyAndCert(_key_pem(key), issued.cert_pem)

    def issue_server_cert(
        self, hostnames: Sequence[str], *, validity: timedelta = SERVER_VALIDITY
    ) -> KeyAndCert:
        """A key and TLS server certificate for the broker or the enrollment endpoint.

        Args:
            hostnames: DNS names and IP addresses clients will connect to;
                clients check the name they dialled against these.

        Raises:
            CertificateError: no hostname was given.
        """
        names = [h.strip() for h in hostnames if h.strip()]
        if not names:
            raise CertificateError("a server certificate needs at least one hostname")
        san: list[x509.GeneralName] = []
        for host in names:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                san.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self._issue(
            names[0],
            key.public_key(),
            role="server",
            validity=validity,
            san=san,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
        )
        return KeyAndCert(_key_pem(key), issued.cert_pem)

    # ------------------------------------------------------------------ revocation
    def revoke(self, who: str) -> list[IssuedCert]:
        """Revoke every live certificate of a device (by id) or one by serial number.

        The CRL file is rewritten before this returns; the broker applies it
        on its next restart (see ``docs/security.md``).

        Returns:
            The entries revoked now.

        Raises:
            CertificateError: nothing unrevoked matches ``who``.
        """
        now = _now()
        with self._locked():
            index = self._read_index()
            revoked: list[IssuedCert] = []
            for i, entry in enumerate(index):
                matches = entry.common_name == who or (who.isdigit() and entry.serial == int(who))
                if matches and entry.revoked_at is None:
                    index[i] = IssuedCert(
                        entry.serial, entry.common_name, entry.role, entry.not_after, now
                    )
                    revoked.append(index[i])
            if not revoked:
                raise CertificateError(f"no unrevoked certificate for {who!r}")
            self._write_index(index)
            self._write_crl_locked(index)
        return revoked

    def write_crl(self) -> Path:
        """Re-sign the CRL (new ``next_update``); run it periodically, e.g. weekly."""
        with self._locked():
            self._write_crl_locked(self._read_index())
        return self.crl_file

    # ------------------------------------------------------------------ internals
    def _issue(
        self,
        common_name: str,
        public_key: Any,
        *,
        role: str,
        validity: timedelta,
        san: list[x509.GeneralName] | None,
        usage: x509.ObjectIdentifier,
    ) -> KeyAndCert:
        now = _now()
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(min(now + validity, self.certificate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        entry = IssuedCert(serial, common_name, role, cert.not_valid_after_utc)
        with self._locked():
            index = self._read_index()
            if role == "device" and any(
                e.common_name == common_name and e.role != "device" for e in index
            ):
                raise CertificateError(f"{common_name!r} names a service, not a device")
            index.append(entry)
            self._write_index(index)
        return KeyAndCert(b"", cert.public_bytes(serialization.Encoding.PEM))

    def _write_crl_locked(self, index: list[IssuedCert]) -> None:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - timedelta(minutes=5))
            .next_update(now + CRL_VALIDITY)
        )
        for entry in index:
            if entry.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(entry.serial)
                    .revocation_date(entry.revoked_at)
                    .build()
                )
        crl = builder.sign(self._key, hashes.SHA256())
        _atomic_write(self.crl_file, crl.public_bytes(serialization.Encoding.PEM), 0o644)

    def _read_index(self) -> list[IssuedCert]:
        path = self.directory / "index.json"
        try:
            raw = json.loads(path.read_text())
            return [IssuedCert.from_json(d) for d in raw["issued"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TrustError(f"CA index {path} is unreadable: {exc}") from exc

    def _write_index(self, index: list[IssuedCert]) -> None:
        data = json.dumps({"issued": [e.to_json() for e in index]}, indent=1).encode()
        _atomic_write(self.directory / "index.json", data, 0o600)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        # Re-entrant within one process would need bookkeeping; callers never nest.
        return file_lock(self.directory / ".lock")


# ---------------------------------------------------------------------- helpers
def revoked_device_ids(directory: Path) -> set[str]:
    """Devices whose every certificate is revoked, from the CA index (no key needed).

    ``edgefleet devices`` shows these as revoked rather than merely offline.
    A device enrolled again after its revocation has a live certificate and
    is not in the set. A missing CA (no production setup) revokes nobody.

    Raises:
        TrustError: the index exists but is unreadable.
    """
    path = directory / "index.json"
    try:
        raw = json.loads(path.read_text())
        index = [IssuedCert.from_json(d) for d in raw["issued"]]
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrustError(f"CA index {path} is unreadable: {exc}") from exc
    revoked: set[str] = set()
    live: set[str] = set()
    for entry in index:
        if entry.role == "device":
            (live if entry.revoked_at is None else revoked).add(entry.common_name)
    return revoked - live


def read_private_file(path: Path) -> bytes:
    """Read a private key, refusing it if group or others have any access.

    Raises:
        KeyPermissionError: the mode allows group/other access.
        TrustError: the file cannot be read (or is a symlink).
    """
    try:
        return read_private(path)
    except InsecureFileError as exc:
        raise KeyPermissionError(
            f"key file {path} has mode {exc.mode:04o}; it must be readable by its owner "
            f"only (chmod 600 {path})"
        ) from None
    except OSError as exc:
        raise TrustError(f"cannot open key file {path}: {exc}") from exc


def _refuse_requested_ca(csr: x509.CertificateSigningRequest) -> None:
    """Refuse a CSR that requests CA rights (or certificate signing) for a device.

    The issued certificate never carries them (``_issue`` sets its own
    extensions), but silently ignoring the request hides an attack or a
    misconfigured client from the operator; a refusal names the reason.

    Raises:
        CertificateError: the CSR asks for ``basicConstraints CA:TRUE`` or for
            the ``keyCertSign``/``cRLSign`` key usages; or its extensions are
            unreadable.
    """
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        raise CertificateError(f"the CSR's extensions are unreadable: {exc}") from None
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise CertificateError(
                "the CSR requests a CA certificate (basicConstraints CA:TRUE); "
                "devices get client certificates only"
            )
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise CertificateError(
                "the CSR requests certificate or CRL signing (keyUsage keyCertSign/cRLSign); "
                "devices get client certificates only"
            )


def _check_key_strength(public_key: Any) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1"):
            raise CertificateError(f"EC curve {public_key.curve.name} is not accepted")
        return
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < _MIN_RSA_BITS:
            raise CertificateError(f"RSA key of {public_key.key_size} bits is too weak")
        return
    raise CertificateError(f"key type {type(public_key).__name__} is not accepted")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _private_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write via :func:`~edgefleet.shared.durable.atomic_write`; a failure is a TrustError."""
    try:
        atomic_write(path, data, mode=mode)
    except OSError as exc:
        raise TrustError(f"cannot write {path}: {exc}") from exc


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically write a private key readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data, 0o600)


def write_public_file(path: Path, data: bytes) -> None:
    """Atomically write a certificate or CRL (0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data, 0o644)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)
