"""The certificate authority: key protection, what it signs and what it refuses."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.controller.ca import CertificateAuthority, CertificateError
from edgefleet.controller.errors import KeyPermissionError, TrustError
from tests.security.conftest import key_and_csr


def test_ca_key_is_owner_only_and_the_ca_reopens(ca: CertificateAuthority) -> None:
    assert stat.S_IMODE((ca.directory / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.directory.stat().st_mode) == 0o700
    again = CertificateAuthority.open(ca.directory)
    assert again.cert_pem == ca.cert_pem
    with pytest.raises(TrustError, match="already exists"):
        CertificateAuthority.init(ca.directory)


def test_ca_files_are_synced_with_their_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CA's atomic write used to skip the directory fsync: a power cut could
    # lose ca.key or a revocation even though the write had returned.
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    ca = CertificateAuthority.init(tmp_path / "ca")
    for name in ("ca.key", "ca.pem", "index.json", "crl.pem"):
        file_ino = (ca.directory / name).stat().st_ino
        assert file_ino in synced, name
        assert ca.directory.stat().st_ino in synced[synced.index(file_ino) + 1 :], name


def test_open_refuses_a_ca_key_others_can_read(ca: CertificateAuthority) -> None:
    os.chmod(ca.directory / "ca.key", 0o644)
    with pytest.raises(KeyPermissionError, match="chmod 600"):
        CertificateAuthority.open(ca.directory)


def test_open_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="edgefleet ca init"):
        CertificateAuthority.open(tmp_path / "nothing")


def test_device_certificate_is_a_client_cert_for_that_device(ca: CertificateAuthority) -> None:
    _key, csr = key_and_csr("gw-1")
    cert = x509.load_pem_x509_certificate(ca.issue_device_cert(csr, "gw-1"))
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert [e.common_name for e in ca.issued()] == ["gw-1"]


@pytest.mark.parametrize("device_id", ["gw-2", "edgefleet-controller", "gw/#"])
def test_csr_naming_someone_else_or_a_service_is_refused(
    ca: CertificateAuthority, device_id: str
) -> None:
    _key, csr = key_and_csr("edgefleet-controller" if device_id == "gw-2" else device_id)
    with pytest.raises(CertificateError):
        ca.issue_device_cert(csr, device_id)
    assert ca.issued() == []


def test_csr_with_a_broken_signature_is_refused(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-1")]))
        .sign(key, hashes.SHA256())
    )
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CertificateError, match="signature"):
        ca.issue_device_cert(tampered, "gw-1")
    with pytest.raises(CertificateError, match="not a PEM"):
        ca.issue_device_cert(b"garbage", "gw-1")


def test_weak_keys_are_refused(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP192R1()) if _has_p192() else None
    if key is None:
        pytest.skip("this OpenSSL cannot make P-192 keys")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-1")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CertificateError, match="curve"):
        ca.issue_device_cert(csr.public_bytes(serialization.Encoding.PEM), "gw-1")


def _has_p192() -> bool:
    try:
        ec.generate_private_key(ec.SECP192R1())
    except Exception:
        return False
    return True


def test_server_certificate_names_its_hosts(ca: CertificateAuthority) -> None:
    pair = ca.issue_server_cert(["mqtt.example.net", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.net"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    with pytest.raises(CertificateError):
        ca.issue_server_cert([])


def test_revocation_puts_every_cert_of_the_device_on_the_crl(ca: CertificateAuthority) -> None:
    serials = []
    for _ in range(2):  # re-enrolled once: both certificates must go
        _key, csr = key_and_csr("gw-1")
        serials.append(
            x509.load_pem_x509_certificate(ca.issue_device_cert(csr, "gw-1")).serial_number
        )
    _key, csr = key_and_csr("gw-2")
    kept = x509.load_pem_x509_certificate(ca.issue_device_cert(csr, "gw-2")).serial_number

    revoked = ca.revoke("gw-1")
    assert sorted(r.serial for r in revoked) == sorted(serials)
    crl = x509.load_pem_x509_crl(ca.crl_file.read_bytes())
    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    assert sorted(r.serial_number for r in crl) == sorted(serials)
    assert crl.get_revoked_certificate_by_serial_number(kept) is None
    with pytest.raises(CertificateError, match="no unrevoked"):
        ca.revoke("gw-1")
    assert ca.revoke(str(kept))[0].common_name == "gw-2"  # by serial number too
