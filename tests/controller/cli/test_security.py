"""The security commands (``ca``, ``broker-config``, ``device token|revoke``), with real files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from cryptography import x509

from edgefleet.agent.config import load_agent_config
from edgefleet.controller.ca import CertificateAuthority
from edgefleet.controller.enrollment import TokenStore
from tests.controller.cli.runner import run_in_home as run


def test_ca_broker_config_token_and_revoke(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run(home, "device", "revoke", "gw-1")
    assert result.exit_code == 1 and "edgefleet ca init" in result.output

    result = run(home, "ca", "init", "--json")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((home / "ca" / "ca.key").stat().st_mode) == 0o600

    out = tmp_path / "broker"
    result = run(home, "broker-config", "--hostname", "mqtt.example.net", "--out", str(out))
    assert result.exit_code == 0, result.output
    conf = (out / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "crlfile /etc/mosquitto/certs/crl.pem" in conf
    assert "user edgefleet-controller" in (out / "edgefleet.acl").read_text()
    assert stat.S_IMODE((out / "certs" / "broker.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "controller" / "controller.key").stat().st_mode) == 0o600
    controller = x509.load_pem_x509_certificate(
        (out / "controller" / "controller.pem").read_bytes()
    )
    assert controller.subject.rfc4514_string() == "CN=edgefleet-controller"
    # The CLI gets its own identity: the broker binds client ids to certificates.
    assert "use_username_as_clientid true" in conf
    assert stat.S_IMODE((out / "cli" / "cli.key").stat().st_mode) == 0o600
    cli_cert = x509.load_pem_x509_certificate((out / "cli" / "cli.pem").read_bytes())
    assert cli_cert.subject.rfc4514_string() == "CN=edgefleet-cli"
    assert "user edgefleet-cli" in (out / "edgefleet.acl").read_text()

    device_dir = tmp_path / "gw-1"
    result = run(home, "device", "token", "gw-1", "--url", "http://plain", "--out", str(device_dir))
    assert result.exit_code == 2 and "https://" in result.output
    result = run(
        home,
        "device",
        "token",
        "gw-1",
        "--url",
        "https://ctl.example.net:8443",
        "--ttl-s",
        "600",
        "--out",
        str(device_dir),
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert result.exit_code == 0, result.output
    token_doc = json.loads((device_dir / "enrollment.json").read_text())
    assert stat.S_IMODE((device_dir / "enrollment.json").stat().st_mode) == 0o600
    assert token_doc["url"] == "https://ctl.example.net:8443"
    assert token_doc["ca_pem"].encode() == CertificateAuthority.open(home / "ca").cert_pem
    info = TokenStore(home / "enrollment").info(token_doc["token"])
    assert info is not None and info.device_id == "gw-1" and info.used_at is None
    config = load_agent_config(device_dir / "agent.toml")
    assert config.enrollment is not None
    assert config.enrollment.token_file == (device_dir / "enrollment.json").resolve()

    result = run(home, "device", "revoke", "gw-1")
    assert result.exit_code == 1 and "no unrevoked certificate" in result.output
    result = run(
        home,
        "device",
        "revoke",
        "edgefleet-controller",
        "--crl-out",
        str(out / "certs" / "crl.pem"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    crl = x509.load_pem_x509_crl((out / "certs" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(controller.serial_number) is not None
