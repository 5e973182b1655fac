"""Losing the controller's connection loses no event; nothing is stored or published twice.

Issue 9, items 2 and 6, through the real path: Mosquitto with the production
TLS config, the real controller service, a real agent (or a device link)
with its own certificate. The controller reaches the broker through a TCP
forwarder the test can cut, so only *its* connection drops - what the
session takeover in the issue did - while devices stay connected.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.protocols.messages import ErrorInfo, Event, EventKind
from edgefleet.protocols.topics import Channel, DeviceTopic
from tests.e2e.harness import Harness, wait_for
from tests.security.conftest import Recorder, TlsBroker, connect
from tests.support.tcpcut import CuttableLink

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


@pytest.fixture
def cut(tls_broker: TlsBroker) -> Iterator[CuttableLink]:
    link = CuttableLink(tls_broker.port)
    try:
        yield link
    finally:
        link.close()


@pytest.fixture
def harness(tls_broker: TlsBroker, cut: CuttableLink, tmp_path: Path) -> Iterator[Harness]:
    """The controller service, connected to the TLS broker through ``cut``."""
    via_cut = dataclasses.replace(tls_broker.controller, port=cut.port)
    h = Harness(tmp_path, via_cut, f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        yield h
    finally:
        h.close()


def _reconnect_controller(harness: Harness, cut: CuttableLink, down_s: float = 0.0) -> None:
    """Cut the controller's connection, keep it down ``down_s``, and wait until it is back."""
    before = cut.accepted
    cut.cut()
    wait_for(lambda: not harness.service.link.connected, 10, "the controller to notice the cut")
    time.sleep(down_s)
    cut.restore()
    wait_for(lambda: cut.accepted > before, 15, "the controller to reconnect")
    wait_for(lambda: harness.service.link.connected, 15, "the controller to be connected")


def test_events_sent_while_the_controller_is_away_are_stored_once(
    harness: Harness, tls_broker: TlsBroker, cut: CuttableLink
) -> None:
    device_id = harness.enroll("journal")
    config = harness.agent_config("journal", event_resend_s=1.0).with_overrides(
        broker=tls_broker.device(device_id)
    )
    agent = harness.start_agent(config)
    assert agent.link.wait_connected(10)

    # Control: an event sent while the controller listens is stored and acknowledged.
    agent._emit(EventKind.DOWNLOAD_STARTED, None)
    wait_for(lambda: len(harness.registry.events_for(device_id)) == 1, 15, "the first event")
    wait_for(lambda: agent.journal.pending() == 0, 15, "the first event's ack")

    cut.cut()
    wait_for(lambda: not harness.service.link.connected, 10, "the controller to notice the cut")
    agent._emit(EventKind.DOWNLOAD_STARTED, None)
    agent._emit(EventKind.INSTALL_FAILED, None, ErrorInfo("transfer_timeout", "no blocks"))
    agent._emit(EventKind.REJECTED, None, ErrorInfo("release_rollback", "older release"))
    time.sleep(2.5)  # the agent re-sends (event_resend_s=1) into the void meanwhile
    assert agent.journal.pending() == 3, "events were forgotten without an acknowledgement"
    cut.restore()

    wait_for(lambda: agent.journal.pending() == 0, 30, "the controller to acknowledge all")
    time.sleep(2.5)  # any further replay would arrive now
    stored = harness.registry.events_for(device_id)
    assert sorted(e.kind for e in stored) == sorted(
        ["download_started", "download_started", "install_failed", "rejected"]
    )
    assert [e.error.code for e in stored if e.kind == "install_failed"] == ["transfer_timeout"]
    assert agent.journal.acked == 4


def test_an_agent_restart_replays_what_was_not_acknowledged(
    harness: Harness, tls_broker: TlsBroker, cut: CuttableLink
) -> None:
    """The journal is on disk: a crash while the controller is away loses nothing either."""
    device_id = harness.enroll("restart")
    config = harness.agent_config("restart").with_overrides(broker=tls_broker.device(device_id))
    agent = harness.start_agent(config)
    assert agent.link.wait_connected(10)
    cut.cut()
    wait_for(lambda: not harness.service.link.connected, 10, "the controller to notice the cut")
    agent._emit(EventKind.INSTALL_FAILED, None, ErrorInfo("transfer_timeout", "no blocks"))
    agent.stop(clean=False)
    harness.agents.remove(agent)
    cut.restore()
    wait_for(lambda: harness.service.link.connected, 15, "the controller to be back")

    again = harness.start_agent(config)
    wait_for(lambda: again.journal.pending() == 0, 30, "the replayed event's ack")
    assert [e.kind for e in harness.registry.events_for(device_id)] == ["install_failed"]


def test_a_retained_event_is_stored_once(
    harness: Harness, tls_broker: TlsBroker, cut: CuttableLink
) -> None:
    device_id = harness.enroll("retainer")
    device = connect(tls_broker.device(device_id), device_id)
    try:
        topic = str(DeviceTopic(device_id, Channel.EVENTS))
        numbered = Event(device_id, EventKind.INSTALLED, journal="ab" * 8, seq=1).encode()
        plain = Event(device_id, EventKind.ROLLED_BACK).encode()
        assert device.publish(topic, numbered, qos=1, retain=True, wait_s=5)
        assert device.publish(topic, plain, qos=1, retain=True, wait_s=5)
        wait_for(lambda: len(harness.registry.events_for(device_id)) == 2, 15, "both events")

        for _ in range(2):  # each reconnect hands the retained event back
            _reconnect_controller(harness, cut)
            time.sleep(1.5)
        harness.service.flush_rejections()
        stored = harness.registry.events_for(device_id)
        assert sorted(e.kind for e in stored) == ["installed", "rolled_back"]
        # What the operator sees: the unnumbered retained copies, refused and counted.
        assert harness.service.rejected().get("retained_event", 0) >= 2
    finally:
        device.stop()


def test_a_reconnect_publishes_no_unchanged_desired_state(
    harness: Harness, tls_broker: TlsBroker, cut: CuttableLink
) -> None:
    names = ("d1", "d2", "d3")
    ids = [harness.enroll(n) for n in names]
    harness.register("1.0.0")
    harness.deploy("1.0.0", *names)
    watchers = []
    got = Recorder()
    try:
        for device_id in ids:
            link = connect(tls_broker.device(device_id), device_id)
            link.subscribe(str(DeviceTopic(device_id, Channel.DESIRED)), got)
            watchers.append(link)
        wait_for(lambda: len({t for t, _p, _r in got.messages}) == 3, 15, "3 desired states")
        wait_for(lambda: not harness.registry.unpublished_desired(), 15, "all acknowledged")
        time.sleep(1.0)  # the outbox marker follows the states it covers
        before = len(got.messages)

        for _ in range(2):
            _reconnect_controller(harness, cut, down_s=0.5)
            time.sleep(4.0)  # marker wait (2 s) + a maintenance round
        republished = got.messages[before:]
        assert republished == [], f"{len(republished)} unchanged desired states re-published"

        # Control: a broker that lost its retained messages gets them all again.
        for link in watchers:
            link.stop()
        watchers = []
        tls_broker.stop()
        tls_broker.start()  # persistence is off in the test broker: everything is gone
        wait_for(lambda: harness.service.link.connected, 20, "the controller to reconnect")
        fresh = Recorder()
        for device_id in ids:
            link = connect(tls_broker.device(device_id), device_id)
            link.subscribe(str(DeviceTopic(device_id, Channel.DESIRED)), fresh)
            watchers.append(link)
        wait_for(
            lambda: len({t for t, _p, _r in fresh.messages}) == 3, 20, "desired states restored"
        )
    finally:
        for link in watchers:
            link.stop()
