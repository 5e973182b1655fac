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
    assert run(home, "init").exit_code == 0
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
    # The broker binds client ids to certificates; the CLI never connects to
    # it (it goes through serve), so no certificate is made for it.
    assert "use_username_as_clientid true" in conf
    assert not (out / "cli").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "certs",
        "controller",
        "edgefleet.acl",
        "mosquitto.conf",
    ]

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


def test_revoked_devices_and_per_device_refusals_are_visible(tmp_path: Path) -> None:
    """Issue 9 item 9: a revoked device showed only as offline; refusals had no device."""
    from edgefleet.controller.registry import Registry, sqlite_url
    from tests.security.conftest import key_and_csr

    home = tmp_path / "home"
    assert run(home, "init").exit_code == 0
    assert run(home, "ca", "init").exit_code == 0
    assert run(home, "device", "enroll", "gw-1", "--out", str(tmp_path / "e1")).exit_code == 0
    assert run(home, "device", "enroll", "gw-2", "--out", str(tmp_path / "e2")).exit_code == 0
    authority = CertificateAuthority.open(home / "ca")
    for device in ("gw-1", "gw-2"):
        authority.issue_device_cert(key_and_csr(device)[1], device)
    assert run(home, "device", "revoke", "gw-1").exit_code == 0

    registry = Registry(sqlite_url(home / "registry.db"))
    try:
        registry.bump_counter("transfer_refused.gw-2.rate", 7)
        registry.bump_counter("agent_rejected.gw-2.signature", 2)
        registry.bump_counter("rejected.enrollment_rate_limited", 3)
    finally:
        registry.close()

    result = run(home, "devices", "--json")
    rows = {r["id"]: r for r in json.loads(result.output)}
    assert rows["gw-1"]["revoked"] is True and rows["gw-2"]["revoked"] is False
    table = run(home, "devices").output
    assert [line.split()[1] for line in table.splitlines() if line.startswith("gw-1")] == [
        "revoked"
    ]

    status = json.loads(run(home, "status", "--json").output)
    assert status["by_device"] == {
        "gw-2": {"transfer_refused": {"rate": 7}, "refused_by_agent": {"signature": 2}}
    }
    assert status["rejected"]["enrollment_rate_limited"] == 3
    text = run(home, "status").output
    assert "overloads and refusals by device" in text and "transfer_refused" in text

    events = run(home, "device", "events", "gw-2").output
    assert "transfer_refused: rate=7" in events and "refused_by_agent: signature=2" in events
    assert "none" in run(home, "device", "events", "gw-1").output


def test_enroll_server_binds_loopback_unless_told_otherwise() -> None:
    """Issue 9 item 3: the endpoint listened on 0.0.0.0 by default."""
    from edgefleet.controller.cli.security import enroll_server
    from edgefleet.controller.enrollment import DEFAULT_HOST, EnrollmentServer

    listen = next(p for p in enroll_server.params if p.name == "listen")
    assert listen.default == "127.0.0.1:8443"
    assert listen.envvar == "EDGEFLEET_ENROLL_LISTEN"
    assert DEFAULT_HOST == "127.0.0.1"
    assert EnrollmentServer.__init__.__kwdefaults__["host"] == "127.0.0.1"
