"""Identity is bound to the client id (issue 9, item 2), through the production Mosquitto config.

Before ``use_username_as_clientid``, a device connecting with the client id
``edgefleet-controller`` (or another device's) disconnected that client, and
again on every reconnect: the controller was kicked 30 times a minute, and a
victim device flapped online/offline through its Last Will. Now the broker
replaces every client id with the certificate's CN, so a device can only
take over its own session.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.controller.ca import CLI_COMMON_NAME, CONTROLLER_COMMON_NAME
from edgefleet.controller.enrollment import DeviceBroker, EnrollmentServer, TokenStore
from edgefleet.protocols.errors import BrokerError
from edgefleet.protocols.topics import OUTBOX_MARKER_TOPIC, Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings, MqttLink
from tests.security.conftest import Recorder, TlsBroker, connect

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


class CountingLink:
    """An MQTT link that counts its successful connects (1 = it was never knocked off)."""

    def __init__(self, settings: BrokerSettings, client_id: str) -> None:
        self.connects = 0
        self._lock = threading.Lock()
        self.link = MqttLink(settings, client_id, on_connect=self._connected)
        self.link.start(wait=True)

    def _connected(self) -> None:
        with self._lock:
            self.connects += 1


def _takeover_attempts(settings: BrokerSettings, client_id: str, times: int) -> None:
    """Connect with ``client_id`` again and again, as the attacker in the issue did."""
    for _ in range(times):
        attacker = connect(settings, client_id)
        time.sleep(0.5)
        attacker.stop()


def test_a_device_cannot_knock_the_controller_off_with_its_client_id(
    tls_broker: TlsBroker,
) -> None:
    controller = CountingLink(tls_broker.controller, "edgefleet-controller")
    try:
        evil = tls_broker.device("gw-evil")
        _takeover_attempts(evil, "edgefleet-controller", 3)
        time.sleep(2.5)  # paho would have reconnected (1-2 s) had it been kicked
        assert controller.link.connected
        assert controller.connects == 1, "the controller was disconnected by a device"
        # What an operator sees: the broker names the attacker by its own identity.
        log = tls_broker.log()
        assert "as gw-evil (" in log
        assert log.count("as edgefleet-controller (") == 1
    finally:
        controller.link.stop()


def test_a_device_cannot_knock_another_device_off(tls_broker: TlsBroker) -> None:
    controller = connect(tls_broker.controller, "edgefleet-controller")
    victim = CountingLink(tls_broker.device("gw-victim"), "gw-victim")
    try:
        status = Recorder()
        controller.subscribe(str(DeviceTopic("gw-victim", Channel.STATUS)), status)
        time.sleep(0.5)
        evil = tls_broker.device("gw-evil")
        for client_id in ("gw-victim", "edgefleet-agent-gw-victim"):
            _takeover_attempts(evil, client_id, 2)
        time.sleep(2.5)
        assert victim.link.connected
        assert victim.connects == 1, "the victim device was disconnected"
        assert b"offline" not in status.payloads(), "the victim's Last Will fired"
    finally:
        victim.link.stop()
        controller.stop()


def test_the_cli_has_its_own_identity_and_only_publishes_desired_states(
    tls_broker: TlsBroker,
) -> None:
    """``serve`` and the CLI hold different certificates; the CLI's ACL is narrow."""
    serve = CountingLink(tls_broker.controller, "edgefleet-controller")
    device = connect(tls_broker.device("gw-1"), "gw-1")
    cli_settings = tls_broker.service_client(CLI_COMMON_NAME)
    try:
        desired = Recorder()
        device.subscribe(str(DeviceTopic("gw-1", Channel.DESIRED)), desired)
        seen_by_serve = Recorder()
        serve.link.subscribe(str(DeviceTopic("gw-1", Channel.REPORTED)), seen_by_serve)
        serve.link.subscribe(OUTBOX_MARKER_TOPIC, seen_by_serve)
        time.sleep(0.5)
        cli = connect(cli_settings, "edgefleet-cli-1234")
        try:
            # Allowed: a desired state and the outbox marker.
            assert cli.publish(str(DeviceTopic("gw-1", Channel.DESIRED)), b"d1", qos=1, wait_s=5)
            assert desired.wait_for(b"d1")
            assert cli.publish(OUTBOX_MARKER_TOPIC, b"m1", qos=1, wait_s=5)
            assert seen_by_serve.wait_for(b"m1")
            # Refused: anything a device says.
            cli.publish(str(DeviceTopic("gw-1", Channel.REPORTED)), b"forged", qos=1, wait_s=5)
            # Control: the device's own report does arrive, after the forgery.
            assert device.publish(str(DeviceTopic("gw-1", Channel.REPORTED)), b"real", qos=1)
            assert seen_by_serve.wait_for(b"real")
            assert b"forged" not in seen_by_serve.payloads()
        finally:
            cli.stop()
        time.sleep(2.5)
        assert serve.link.connected
        assert serve.connects == 1, "the CLI disconnected `serve`"
    finally:
        device.stop()
        serve.link.stop()


def test_the_enrollment_servers_certificate_is_no_broker_identity(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """``enroll-server`` never talks MQTT; its HTTPS certificate cannot be used as a client.

    Checked on the files the real :class:`EnrollmentServer` writes and serves:
    a server certificate (EKU serverAuth only) named after its first
    hostname, never one of the services' client identities.
    """
    server = EnrollmentServer(
        tls_broker.ca,
        TokenStore(tmp_path / "enrollment"),
        lambda: b"{}",
        DeviceBroker("localhost", tls_broker.port),
        hostnames=("enroll.example.net", "127.0.0.1"),
        port=0,
    )
    server.start()
    try:
        server_dir = tmp_path / "enrollment" / "server"
        cert = x509.load_pem_x509_certificate((server_dir / "server.pem").read_bytes())
        (cn,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert cn.value == "enroll.example.net"
        assert cn.value not in {CONTROLLER_COMMON_NAME, CLI_COMMON_NAME}
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
        with pytest.raises(BrokerError):
            connect(
                tls_broker.settings(
                    ca_file=str(tls_broker.ca.ca_file),
                    cert_file=str(server_dir / "server.pem"),
                    key_file=str(server_dir / "server.key"),
                ),
                "edgefleet-enroll",
            )
    finally:
        server.stop()
    connect(tls_broker.device("gw-ok"), "gw-ok").stop()  # control: a client certificate works
