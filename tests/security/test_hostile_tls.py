"""Issue 9's hostile device, through the real path.

Every test here runs Mosquitto with the generated production TLS config and
ACL (``tests/security/conftest.py``), the real :class:`ControllerService`
with its own certificate, and an attacker holding one enrolled device's own
valid certificate - exactly how the issue's attacks were made. Each test
asserts both the defence and what an operator sees: a counter per device and
reason in ``edgefleet status``, a row in ``edgefleet devices``, or a line in
the broker log.

The same defences are also tested on amqtt and plain Mosquitto in
``tests/e2e`` (faster to debug); these prove that the TLS identity, the ACL
and the client-id binding do not change the outcome.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.fetcher import TransferSettings
from edgefleet.controller.ca import CONTROLLER_COMMON_NAME
from edgefleet.controller.catalog import register_model
from edgefleet.controller.cli import cli
from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.protocols.errors import BrokerError
from edgefleet.protocols.framing import BlockFrame, FrameKind
from edgefleet.protocols.messages import FileRequest
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings, MqttLink
from tests.e2e.harness import MODEL, Harness, wait_for, wide_model
from tests.e2e.test_hostile_input import send_hostile_values_and_check
from tests.e2e.test_transfer_flood import paho_queued_bytes, target_path
from tests.security.conftest import TlsBroker, connect

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def harness(tls_broker: TlsBroker, tmp_path: Path) -> Iterator[Harness]:
    """The real controller service, connected with ``serve``'s certificate."""
    h = Harness(tmp_path, tls_broker.controller, f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        yield h
    finally:
        h.close()


def edgefleet(home: Path, harness: Harness, *args: str) -> str:
    """``edgefleet --home HOME --database-url URL ARGS...`` as an operator types it."""
    result = CliRunner().invoke(
        cli,
        ["--home", str(home), "--database-url", harness.registry.url, *args],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return result.output


def tls_agent_config(
    harness: Harness, tls_broker: TlsBroker, name: str, **overrides: Any
) -> AgentConfig:
    """An agent config for device ``name`` holding its own certificate."""
    device_id = harness.device_id(name)
    return harness.agent_config(name, **overrides).with_overrides(
        broker=tls_broker.device(device_id)
    )


# --------------------------------------------------------------------- item 1: transfers
class TlsFlood:
    """Publishes ``rate`` file requests a second with the flooding device's own certificate.

    Each asks for blocks [0, 64) of ``path`` under a new request id, as the
    attacker in issue 9 did; the refusals the controller answers with
    arrive on the device's own block topic, which the ACL lets it read.
    """

    def __init__(
        self, harness: Harness, settings: BrokerSettings, device_id: str, path: str, rate: float
    ) -> None:
        self.harness = harness
        self.device_id = device_id
        self.path = path
        self.interval = 1.0 / rate
        self.refusals: list[BlockFrame] = []
        self.sent = 0
        self.max_queued = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.link = MqttLink(settings, device_id)  # the broker makes it the CN anyway
        self.link.subscribe(str(DeviceTopic(device_id, Channel.FILE_BLOCKS)), self._on_frame)
        self.link.start(wait=True)
        self.topic = str(DeviceTopic(device_id, Channel.FILE_REQUEST))
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_frame(self, _topic: str, payload: bytes, _retained: bool) -> None:
        frame = BlockFrame.decode(payload)
        if frame.kind is FrameKind.ERROR:
            with self._lock:
                self.refusals.append(frame)

    def statuses(self) -> set[int]:
        with self._lock:
            return {f.status for f in self.refusals}

    def request(self, block_size: int) -> None:
        request = FileRequest(
            self.device_id, secrets.token_hex(16), self.path, block_size, ((0, 64),)
        )
        self.link.publish(self.topic, request.encode(), qos=1)
        self.sent += 1

    def _run(self) -> None:
        controller = self.harness.service.link
        bound = ServiceSettings().transfer_total_inflight_bytes
        while not self._stop.is_set():
            self.request(64 * KiB)
            queued = paho_queued_bytes(controller)
            self.max_queued = max(self.max_queued, queued)
            if queued > 4 * bound:
                return  # unbounded already: stop before the machine runs out of memory
            self._stop.wait(self.interval)

    def __enter__(self) -> TlsFlood:
        self._thread.start()
        return self

    def halt(self) -> None:
        """Stop flooding; the link stays up for single requests."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __exit__(self, *_exc: object) -> None:
        self.halt()
        self.link.stop()


def test_a_file_request_flood_is_refused_with_retry_after_counted_and_bounded(
    harness: Harness, tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """Item 1: 50 requests/s of 4 MiB each from one device's certificate; another installs."""
    h = harness
    big = h.register("1.0", wide_model(65536))  # ~5 MB: a request for [0, 64) asks 4 MiB
    attacker = h.enroll("gw-flood")
    legit = h.enroll("gw-legit")
    agent = h.start_agent(
        tls_agent_config(
            h, tls_broker, "gw-legit", transfer=TransferSettings(request_timeout_s=5.0)
        )
    )
    assert agent.link.wait_connected(10)
    flood_settings = tls_broker.device(attacker)
    with TlsFlood(h, flood_settings, attacker, target_path(h, big), rate=50) as flood:
        time.sleep(1.0)
        h.deploy("1.0", "gw-legit")
        h.wait_active(agent, "1.0", timeout_s=60)
        flood.halt()
        # The other flood: 1 MiB blocks, refused before the file is read
        # (a refusal frame goes to one device at most every 0.25 s).
        for _ in range(3):
            time.sleep(0.3)
            flood.request(1 * MiB)
        wait_for(lambda: 400 in flood.statuses(), 10, "a refusal of 1 MiB blocks")
    # Bounded: the controller's MQTT client never held more than its budget
    # (plus one 64 KiB frame: a budget is checked before a frame is added).
    bound = ServiceSettings().transfer_total_inflight_bytes + 65 * KiB
    assert flood.sent >= 50
    assert flood.max_queued <= bound, f"controller queued {flood.max_queued} bytes"
    assert h.service.transfers.peak_inflight_bytes <= bound
    # Refused with something to back off on: 429 + retry-after (rate), 400 (block size).
    assert flood.statuses() <= {400, 429, 503} and 429 in flood.statuses()
    assert all((f.retry_after_s or 0) > 0 for f in flood.refusals if f.status == 429)
    # What the operator sees: counted per device and reason; the legitimate device never.
    h.service.flush_rejections()
    counters = h.registry.counters()
    assert counters.get(f"transfer_refused.{attacker}.rate", 0) >= 1
    assert counters.get(f"transfer_refused.{attacker}.block_size", 0) >= 1
    assert counters.get("rejected.transfer_rate", 0) >= 1
    assert not any(k.startswith(f"transfer_refused.{legit}.") for k in counters)
    status = json.loads(edgefleet(tmp_path / "cli", h, "status", "--json"))
    shown = status["by_device"][attacker]["transfer_refused"]
    assert shown["rate"] >= 1 and shown["block_size"] >= 1
    assert "transfer_refused" not in status["by_device"].get(legit, {})
    assert "transfer_refused: " in edgefleet(tmp_path / "cli", h, "device", "events", attacker)


# ------------------------------------------------------------- items 5 and 6: values, storage
def test_poisoned_telemetry_and_events_from_a_devices_own_certificate_are_bounded(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """Items 5, 6: 2^63-1 counts, lies, year 9999, invented reasons, 250 KB fields, floods.

    The same checks as ``tests/e2e/test_hostile_input.py``, sent by the device
    itself with its own certificate: the ACL lets it write its own telemetry
    and events, so the controller's bounds are all that stands in the way.
    """
    harness = Harness(
        tmp_path,
        tls_broker.controller,
        f"sqlite:///{tmp_path / 'registry.db'}",
        max_events_per_device=5,
    )
    try:
        device_id = harness.enroll("gw-v")
        attacker = connect(tls_broker.device(device_id), device_id)
        try:
            send_hostile_values_and_check(harness, attacker, "gw-v", tmp_path / "cli")
        finally:
            attacker.stop()
    finally:
        harness.close()


# ------------------------------------------------------------------ item 2: identity
def test_client_id_takeover_of_the_controller_or_a_device_is_refused(
    harness: Harness, tls_broker: TlsBroker
) -> None:
    """Item 2: a device reconnecting as ``edgefleet-controller`` or as another device.

    Before ``use_username_as_clientid``, each connect kicked the victim off
    the broker (the controller 30 times a minute; a device flapped offline
    through its Last Will). Now the broker gives the attacker its own CN as
    client id: the real controller and the victim agent stay connected, the
    registry never sees the victim offline, and the broker log names the
    attacker by its certificate.
    """
    victim = harness.enroll("victim")
    evil = harness.enroll("evil")
    agent = harness.start_agent(tls_agent_config(harness, tls_broker, "victim"))
    wait_for(lambda: harness.summary("victim").online, 15, "the victim online")
    offline_seen: list[float] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(0.05):
            if not harness.summary("victim").online:
                offline_seen.append(time.monotonic())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stolen_ids = (
            CONTROLLER_COMMON_NAME,
            harness.service.link.client_id,
            victim,
            agent.link.client_id,
        )
        for client_id in stolen_ids:
            attacker = connect(tls_broker.device(evil), client_id)
            time.sleep(0.5)
            attacker.stop(clean=False)  # a dropped connection: the attacker's own Will fires
        time.sleep(2.5)  # paho would have reconnected (1-2 s) had anyone been kicked
    finally:
        watching.set()
        watcher.join(timeout=5)
    assert harness.service.link.connected and agent.link.connected
    assert offline_seen == [], "the victim flapped offline"
    assert harness.summary("victim").online
    # The broker log: one connect each for the controller and the victim, and
    # every attempt under the attacker's own identity.
    log = tls_broker.log()
    assert log.count(f"as {CONTROLLER_COMMON_NAME} (") == 1, "the controller was kicked"
    assert log.count(f"as {agent.link.client_id} (") == 0
    assert log.count(f"as {victim} (") == 1, "the victim was kicked"
    assert log.count(f"as {evil} (") == len(stolen_ids)
    # Control: the controller still serves the victim after the attempts.
    harness.register("1.0")
    harness.deploy("1.0", "victim")
    harness.wait_active(agent, "1.0", timeout_s=30)


# ---------------------------------------------------------------- item 9: revocation
def test_a_revoked_device_is_refused_by_the_broker_and_shown_as_revoked(
    harness: Harness, tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """Item 9: a revoked device showed only as "offline".

    The operator's path: ``edgefleet device revoke ID --crl-out <broker's CRL>``
    then a broker restart (a SIGHUP only refuses new handshakes). The revoked
    agent cannot get back on; ``edgefleet devices`` says ``revoked``.
    """
    stolen = harness.enroll("stolen")
    fine = harness.enroll("fine")
    stolen_agent = harness.start_agent(tls_agent_config(harness, tls_broker, "stolen"))
    fine_agent = harness.start_agent(tls_agent_config(harness, tls_broker, "fine"))
    wait_for(lambda: harness.summary("stolen").online and harness.summary("fine").online, 15)
    home = tmp_path  # the CA the broker trusts is home/ca (the ``ca`` fixture)
    assert (home / "ca").is_dir()

    edgefleet(
        home,
        harness,
        "device",
        "revoke",
        stolen,
        "--crl-out",
        str(tls_broker.dir / "certs" / "crl.pem"),
    )
    tls_broker.stop()
    tls_broker.start()
    wait_for(
        lambda: fine_agent.link.connected and harness.service.link.connected,
        20,
        "the other agent and the controller back",
    )
    time.sleep(3.0)  # the revoked agent retries every 1-2 s meanwhile
    assert not stolen_agent.link.connected
    with pytest.raises(BrokerError):  # its certificate, on a new connection
        connect(stolen_agent.config.broker, "stolen-again")
    # The broker logs the refused handshakes, but names no client: the
    # certificate is refused before any MQTT identity exists.
    assert "certificate verify failed" in tls_broker.log()
    # What the operator sees: `revoked`, not merely offline; the other device is online.
    rows = {r["id"]: r for r in json.loads(edgefleet(home, harness, "devices", "--json"))}
    assert rows[stolen]["revoked"] is True
    assert rows[fine]["revoked"] is False
    wait_for(lambda: harness.summary("fine").online, 10, "the other device online again")
    table = edgefleet(home, harness, "devices")
    states = {line.split()[0]: line.split()[1] for line in table.splitlines()[1:] if line.strip()}
    assert states[stolen] == "revoked" and states[fine] == "yes"


# ------------------------------------------------------------- item 4: downgrade guard
def test_an_older_release_is_refused_after_it_left_both_kept_slots(
    harness: Harness, tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """Item 4, over TLS: release 2 ran, then two other models, then release 1 is deployed.

    Only the controller may write a device's desired state (the ACL), so the
    older release arrives as a deploy. The agent refuses it before any
    download from its durable high-water mark, and the operator sees the
    ``rejected`` / ``release_rollback`` event in ``edgefleet device events``.
    """
    h = harness
    first = h.register("1.0", build_demo_model(seed=1))
    h.register("2.0", build_demo_model(seed=2))
    for other in ("e2e-other-b", "e2e-other-c"):
        register_model(
            h.registry, h.repository, build_demo_model(seed=7), name=other, version="1.0"
        )
    device = h.enroll("gw-down")
    agent = h.start_agent(tls_agent_config(h, tls_broker, "gw-down"))
    h.deploy("2.0", "gw-down")
    h.wait_active(agent, "2.0")
    for other in ("e2e-other-b", "e2e-other-c"):
        h.service.deploy(other, "1.0", [device])
        wait_for(
            lambda: agent.active_model is not None and agent.active_model.name == other,  # noqa: B023
            30,
            f"{device} to run {other}",
        )
    kept = {agent.slots.active(), agent.slots.previous()}
    assert MODEL not in {r.model.name for r in kept if r is not None}

    h.deploy("1.0", "gw-down")
    h.wait_error("gw-down", "release_rollback")
    assert agent.active_model is not None and agent.active_model.name == "e2e-other-c"
    # Refused before any byte of the old bundle was requested.
    assert not any(first.bundles[0].sha256 in p for p in agent.fetcher.blocks_by_path)
    wait_for(
        lambda: "release_rollback" in edgefleet(tmp_path / "cli", h, "device", "events", device),
        10,
        "the release_rollback event in `edgefleet device events`",
    )
