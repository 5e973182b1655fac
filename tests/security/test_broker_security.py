"""The production Mosquitto configuration, attacked: certificates, ACL, CRL.

Each refusal test has a positive control next to it (a legitimate client that
does get on, or a legitimate subscriber that does receive), so a test cannot
pass just because nothing works.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgefleet.controller.ca import CertificateAuthority
from edgefleet.controller.mosquitto_config import MosquittoPaths, render_acl, render_mosquitto_conf
from edgefleet.protocols.errors import BrokerError
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings, MqttLink
from tests.security.conftest import Recorder, TlsBroker, connect, issue_device_files

pytestmark = pytest.mark.mosquitto

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
QUIET_S = 1.0  # how long "nothing arrives" is watched after a later message did arrive


def topic(device_id: str, channel: Channel) -> str:
    return str(DeviceTopic(device_id, channel))


def test_deploy_files_are_the_rendered_production_config() -> None:
    assert (DEPLOY / "mosquitto-tls.conf").read_text() == render_mosquitto_conf(MosquittoPaths())
    assert (DEPLOY / "edgefleet.acl").read_text() == render_acl()


def test_client_without_certificate_is_refused(tls_broker: TlsBroker) -> None:
    # Control: a device with a certificate from our CA gets on.
    connect(tls_broker.device("gw-ok"), "ok").stop()

    no_cert = tls_broker.settings(ca_file=str(tls_broker.ca.ca_file))
    with pytest.raises(BrokerError):
        connect(no_cert, "anonymous")
    plain = BrokerSettings(host="127.0.0.1", port=tls_broker.port, connect_timeout_s=3)
    with pytest.raises(BrokerError):
        connect(plain, "plaintext")
    assert "certificate" in tls_broker.log() or "SSL" in tls_broker.log()


def test_certificate_from_another_ca_is_refused(tls_broker: TlsBroker, tmp_path: Path) -> None:
    rogue_ca = CertificateAuthority.init(tmp_path / "rogue-ca")
    # Same CN as a real device, signed by the wrong CA; the client itself still
    # trusts the real broker (our CA), so only the broker's check can refuse it.
    files = issue_device_files(rogue_ca, "gw-a", tmp_path / "rogue")
    files["ca_file"] = str(tls_broker.ca.ca_file)
    forged = tls_broker.settings(**files)
    connect(tls_broker.device("gw-a"), "real").stop()  # control: the real gw-a gets on
    with pytest.raises(BrokerError):
        connect(forged, "forged")


def _subscribed(recorder: Recorder, link: MqttLink, topic_name: str) -> None:
    """Wait until ``link``'s last subscription is live: publish markers until one comes back.

    ``link`` must be allowed to publish and read ``topic_name``, and must have
    subscribed to it last (a client's packets are handled in order).
    """
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        marker = f"sub-marker-{time.monotonic_ns()}".encode()
        assert link.publish(topic_name, marker, qos=1, wait_s=5)
        if recorder.wait_for(marker, 0.2):
            return
    raise AssertionError(f"subscription to {topic_name} never became active")


def _own_channel_works(
    tls_broker: TlsBroker, controller: MqttLink, device: MqttLink, device_id: str
) -> Recorder:
    """Subscribe ``device`` to its desired topic and prove a controller message arrives.

    Mosquitto handles one client's packets in order, so once a marker
    arrives, every SUBSCRIBE the device sent earlier is in effect.
    """
    got = Recorder()
    device.subscribe(topic(device_id, Channel.DESIRED), got)
    # The SUBSCRIBE travels on the device's connection, the marker on the
    # controller's: repeat the marker until one arrives after the SUBACK.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        marker = f"marker-{time.monotonic_ns()}".encode()
        assert controller.publish(topic(device_id, Channel.DESIRED), marker, qos=1, wait_s=5)
        if got.wait_for(marker, 0.2):
            return got
    raise AssertionError(f"control failed: {device_id} cannot read its own desired topic")


def test_device_cannot_read_another_devices_topics(tls_broker: TlsBroker) -> None:
    controller = connect(tls_broker.controller, "controller")
    a = connect(tls_broker.device("gw-a"), "agent-a")
    b = connect(tls_broker.device("gw-b"), "agent-b")
    try:
        # A retained desired state for B exists before A snoops.
        retained = b'{"retained": "for gw-b only"}'
        assert controller.publish(
            topic("gw-b", Channel.DESIRED), retained, qos=1, retain=True, wait_s=5
        )
        snooped = Recorder()
        for filt in (
            topic("gw-b", Channel.DESIRED),
            topic("gw-b", Channel.FILE_BLOCKS),
            topic("gw-b", Channel.REPORTED),
            "edgefleet/v1/devices/+/desired",
            "edgefleet/v1/#",
            "#",
        ):
            a.subscribe(filt, snooped)
        _own_channel_works(tls_broker, controller, a, "gw-a")

        # Live traffic for B: B receives it (control), A does not.
        b_got = _own_channel_works(tls_broker, controller, b, "gw-b")
        assert retained in b_got.payloads()
        secret = b"blocks for gw-b"
        assert controller.publish(topic("gw-b", Channel.FILE_BLOCKS), secret, qos=1, wait_s=5)
        ctl_got = Recorder()
        controller.subscribe(topic("gw-b", Channel.REPORTED), ctl_got)
        _subscribed(ctl_got, controller, topic("gw-b", Channel.REPORTED))
        report = b'{"reported": "by gw-b"}'
        assert b.publish(topic("gw-b", Channel.REPORTED), report, qos=1, wait_s=5)
        assert ctl_got.wait_for(report), "control failed: the controller missed gw-b's report"

        time.sleep(QUIET_S)
        leaked = [t for t, _p, _r in snooped.messages if "/gw-a/" not in t]
        assert leaked == [], f"gw-a read another device's messages: {leaked}"
    finally:
        for link in (a, b, controller):
            link.stop()


def test_device_cannot_publish_on_another_devices_topics(tls_broker: TlsBroker) -> None:
    controller = connect(tls_broker.controller, "controller")
    a = connect(tls_broker.device("gw-a"), "agent-a")
    b = connect(tls_broker.device("gw-b"), "agent-b")
    try:
        b_got = _own_channel_works(tls_broker, controller, b, "gw-b")
        ctl_got = Recorder()
        for ch in (Channel.REPORTED, Channel.STATUS, Channel.EVENTS, Channel.FILE_REQUEST):
            controller.subscribe(DeviceTopic.wildcard(ch), ctl_got)
        controller.subscribe(topic("gw-a", Channel.DESIRED), ctl_got)
        _subscribed(ctl_got, controller, topic("gw-a", Channel.DESIRED))

        # gw-a forges a desired state for gw-b, reports as gw-b, and writes its own desired.
        forged = b'{"forged": "desired by gw-a"}'
        a.publish(topic("gw-b", Channel.DESIRED), forged, qos=1, wait_s=5)
        a.publish(topic("gw-b", Channel.REPORTED), b"forged report", qos=1, wait_s=5)
        a.publish(topic("gw-b", Channel.STATUS), b"offline", qos=1, retain=True, wait_s=5)
        a.publish(topic("gw-a", Channel.DESIRED), b"self-desired", qos=1, wait_s=5)
        # Control: what gw-a may publish does arrive, after the forgeries.
        own = b"own report by gw-a"
        a.publish(topic("gw-a", Channel.REPORTED), own, qos=1, wait_s=5)
        assert ctl_got.wait_for(own), "control failed: gw-a cannot publish its own report"
        later = b"real desired for gw-b"
        assert controller.publish(topic("gw-b", Channel.DESIRED), later, qos=1, wait_s=5)
        assert b_got.wait_for(later)

        time.sleep(QUIET_S)
        assert forged not in b_got.payloads()
        assert b"forged report" not in ctl_got.payloads()
        assert b"offline" not in ctl_got.payloads()
        assert b"self-desired" not in ctl_got.payloads()
    finally:
        for link in (a, b, controller):
            link.stop()


def test_revoked_device_is_refused(tls_broker: TlsBroker) -> None:
    victim = tls_broker.device("gw-stolen")
    other = tls_broker.device("gw-fine")
    connect(victim, "stolen-1").stop()  # control: it could connect before
    held = connect(victim, "stolen-held")  # a session open while it is revoked

    revoked = tls_broker.ca.revoke("gw-stolen")
    assert [r.common_name for r in revoked] == ["gw-stolen"]
    tls_broker.copy_crl()
    tls_broker.hup()

    with pytest.raises(BrokerError):
        connect(victim, "stolen-2")
    connect(other, "fine").stop()  # everyone else is unaffected
    # Documented limit (docs/security.md): SIGHUP checks new handshakes only.
    assert held.connected

    # A restart drops every session; the revoked device cannot come back.
    tls_broker.stop()
    tls_broker.start()
    time.sleep(3)  # paho retries every 1-2 s (reconnect delays of TlsBroker.settings)
    assert not held.connected
    held.stop()
    with pytest.raises(BrokerError):
        connect(victim, "stolen-3")
    connect(other, "fine-2").stop()


def _log_lines(broker: TlsBroker, *needles: str, timeout_s: float = 5.0) -> list[str]:
    """Broker log lines containing every one of ``needles`` (waits up to ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = broker.process.log_file.read_text(errors="replace")
        found = [line for line in text.splitlines() if all(n in line for n in needles)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_acl_denials_are_in_the_broker_log(tls_broker: TlsBroker) -> None:
    """Issue 9 item 9: at the shipped log levels a denied publish left no trace.

    The line names the certificate's CN, whatever client id the device sent
    (``use_username_as_clientid``): a device cannot blame another.
    """
    controller = connect(tls_broker.controller, "controller")
    a = connect(tls_broker.device("gw-a"), "gw-innocent")
    try:
        got = Recorder()
        controller.subscribe(topic("gw-a", Channel.REPORTED), got)
        _subscribed(got, controller, topic("gw-a", Channel.REPORTED))
        a.publish(topic("gw-b", Channel.DESIRED), b"forged", qos=1, wait_s=5)
        a.publish(topic("gw-a", Channel.REPORTED), b"after", qos=1, wait_s=5)
        assert got.wait_for(b"after")
        forged_topic = topic("gw-b", Channel.DESIRED)
        denied = _log_lines(tls_broker, "Denied PUBLISH", f"'{forged_topic}'")
        assert denied, "the broker did not log the denied publish"
        assert all(" from gw-a (" in line for line in denied), denied
        assert not _log_lines(tls_broker, "gw-innocent", timeout_s=0)
    finally:
        for link in (a, controller):
            link.stop()


def test_without_debug_logging_subscription_probes_are_still_logged(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """``MosquittoPaths(log_denials=False)``: no per-message lines, yet read probes show.

    Mosquitto logs denied publishes only at debug level (with every packet,
    about four lines per message); a fleet too big for that renders the
    config without it. Mosquitto accepts a subscription to another device's
    topics and filters each delivery, so it is never logged as a denial; but
    ``log_type subscribe`` logs every subscription with its filter, so a
    device subscribing to other devices' topics is still seen.
    """
    broker = TlsBroker(ca, tmp_path / "clients", log_denials=False)
    broker.start()
    try:
        assert "log_type debug" not in broker.config.read_text()
        controller = connect(broker.controller, "controller")
        a = connect(broker.device("gw-a"), "gw-a")
        got = Recorder()
        snooped = Recorder()
        a.subscribe(topic("gw-b", Channel.DESIRED), snooped)
        controller.subscribe(topic("gw-a", Channel.REPORTED), got)
        _subscribed(got, controller, topic("gw-a", Channel.REPORTED))
        for i in range(20):
            assert a.publish(topic("gw-a", Channel.REPORTED), f"r{i}".encode(), qos=1, wait_s=5)
        assert got.wait_for(b"r19")
        probes = _log_lines(broker, "gw-a 1 " + topic("gw-b", Channel.DESIRED))
        assert probes, "the probing subscription was not logged"
        assert not _log_lines(broker, "PUBLISH", timeout_s=0), "per-message lines were logged"
        for link in (a, controller):
            link.stop()
    finally:
        broker.cleanup()
