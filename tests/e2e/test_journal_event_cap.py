"""The agent's event journal meets the controller's per-device event cap (issue 9, items 2 and 6).

Two bounds meet here. The agent keeps every event until the controller
acknowledges its ``seq`` (``agent/journal.py``); the controller keeps at most
``max_events_per_device`` rows per device, dropping that device's oldest
(``controller/registry/events.py``). A device over its cap must still get
its acknowledgements, or its agent would replay the dropped events forever
(and each replay would be stored and dropped again); and one device over
its cap must never cost a healthy device an event.

Through the real path: Mosquitto, the real controller service on SQLite,
real agents; the controller reaches the broker through a TCP forwarder the
test can cut, so events pile up in an agent's journal as they would during
an outage, and arrive together when it is back.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.controller.registry.counters import device_rejected_name
from edgefleet.protocols.messages import Event, EventKind
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings, MqttLink
from tests.conftest import require_mosquitto
from tests.e2e.harness import Harness, wait_for
from tests.support.mosquitto import MosquittoProcess
from tests.support.tcpcut import CuttableLink

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

CAP = 12


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerSettings]:
    """A broker of this test's own: floods of 100 KB events, and journals of a
    thousand, from one test must not still be in flight through the next."""
    with MosquittoProcess.anonymous(require_mosquitto(), tmp_path_factory.mktemp("mq")) as proc:
        yield proc.settings


@pytest.fixture
def cut(mosquitto: BrokerSettings) -> Iterator[CuttableLink]:
    link = CuttableLink(mosquitto.port)
    try:
        yield link
    finally:
        link.close()


@pytest.fixture
def capped(mosquitto: BrokerSettings, cut: CuttableLink, tmp_path: Path) -> Iterator[Harness]:
    """The controller, with a per-device cap of ``CAP`` events, behind ``cut``."""
    via_cut = dataclasses.replace(mosquitto, port=cut.port)
    h = Harness(
        tmp_path, via_cut, f"sqlite:///{tmp_path / 'registry.db'}", max_events_per_device=CAP
    )
    try:
        yield h
    finally:
        h.close()


def stored_marks(h: Harness, device_id: str) -> list[int]:
    """The ``n`` each stored event of the device carried (see ``emit``), oldest first."""
    out = []
    for e in reversed(h.registry.events_for(device_id, limit=10_000)):
        extra: dict[str, Any] = (e.detail or {}).get("extra", {})
        out.append(int(extra["n"]))
    return out


def counter(h: Harness, name: str) -> int:
    h.service.flush_rejections()
    return h.registry.counters().get(name, 0)


def test_a_device_over_its_cap_still_gets_its_events_acknowledged(
    capped: Harness, cut: CuttableLink
) -> None:
    h = capped
    device_id = h.enroll("chatty")
    agent = h.start_agent(h.agent_config("chatty", event_resend_s=1.0))
    assert agent.link.wait_connected(10)
    wait_for(lambda: h.service.link.connected, 10, "the controller")

    # While the controller is away, the agent journals 4x its cap of events.
    cut.cut()
    wait_for(lambda: not h.service.link.connected, 10, "the controller to notice the cut")
    total = 4 * CAP
    for n in range(total):
        agent._emit(EventKind.DOWNLOAD_STARTED, None, n=n)
    assert agent.journal.pending() == total
    cut.restore()

    # They arrive together; the controller keeps the newest CAP and drops the
    # rest - but it has received all of them, so the agent must be told.
    wait_for(lambda: agent.journal.pending() == 0, 30, "the journal to be acknowledged")
    assert agent.journal.acked == total
    dropped = counter(h, device_rejected_name(device_id, "event_cap"))
    assert dropped == total - CAP
    assert stored_marks(h, device_id) == list(range(total - CAP, total))

    # No endless replay: over several resend periods nothing is stored or
    # dropped again.
    time.sleep(3.5)
    assert counter(h, device_rejected_name(device_id, "event_cap")) == dropped
    assert stored_marks(h, device_id) == list(range(total - CAP, total))

    # Events after that are stored and acknowledged as usual.
    agent._emit(EventKind.INSTALLED, None, n=total)
    wait_for(lambda: agent.journal.acked == total + 1, 15, "the next event's ack")
    assert stored_marks(h, device_id)[-1] == total


def test_a_replay_of_events_dropped_by_the_cap_is_not_stored_again(
    capped: Harness, mosquitto: BrokerSettings
) -> None:
    """A device (or an agent that missed its ack) replays numbered events the cap dropped."""
    h = capped
    device_id = h.enroll("replayer")
    device = MqttLink(mosquitto, f"raw-{device_id}")
    device.start(wait=True)
    try:
        topic = str(DeviceTopic(device_id, Channel.EVENTS))
        total = 3 * CAP

        def send(seqs: range) -> None:
            for seq in seqs:
                event = Event(
                    device_id,
                    EventKind.DOWNLOAD_STARTED,
                    journal="cd" * 8,
                    seq=seq,
                    extra={"n": seq - 1},
                )
                assert device.publish(topic, event.encode(), qos=1, wait_s=5)

        send(range(1, total + 1))
        wait_for(lambda: stored_marks(h, device_id)[-1:] == [total - 1], 15, "the events")
        dropped = counter(h, device_rejected_name(device_id, "event_cap"))
        assert dropped == total - CAP
        send(range(1, total + 1))  # the whole journal again
        time.sleep(2.0)
        assert stored_marks(h, device_id) == list(range(total - CAP, total))
        assert counter(h, device_rejected_name(device_id, "event_cap")) == dropped
    finally:
        device.stop()


def test_a_device_flooding_events_costs_a_healthy_device_none(
    capped: Harness, mosquitto: BrokerSettings, cut: CuttableLink
) -> None:
    h = capped
    flooder = h.enroll("flooder")
    healthy = h.enroll("healthy")
    agent = h.start_agent(h.agent_config("healthy", event_resend_s=1.0))
    assert agent.link.wait_connected(10)
    raw = MqttLink(mosquitto, f"raw-{flooder}")
    raw.start(wait=True)
    try:
        topic = str(DeviceTopic(flooder, Channel.EVENTS))
        for round_ in range(3):
            # The flooder sends 3x its cap, numbered and not, with a big
            # unknown field; the healthy agent emits a few events meanwhile.
            for i in range(3 * CAP):
                numbered = i % 2 == 0
                event = Event(
                    flooder,
                    EventKind.INSTALL_FAILED,
                    journal="ef" * 8 if numbered else None,
                    seq=round_ * 3 * CAP + i + 1 if numbered else None,
                    extra={"junk": "x" * 100_000},
                )
                raw.publish(topic, event.encode(), qos=1)
                if i % CAP == 0:
                    agent._emit(EventKind.DOWNLOAD_STARTED, None, n=round_ * 10 + i // CAP)
            if round_ == 1:  # and once the controller is away for a moment
                cut.cut()
                wait_for(lambda: not h.service.link.connected, 10, "the cut")
                agent._emit(EventKind.INSTALL_FAILED, None, n=99)
                cut.restore()
                # The controller's session is clean (design.md: MQTT 3.1.1), so
                # what the raw flooder publishes before the controller is back
                # and subscribed is lost: only journaled events are replayed.
                # The healthy journal's acknowledgement shows it is back.
                # (Without this wait, in about 1 run of 3 every flooder event
                # was published into that gap, and none was ever dropped.)
                wait_for(lambda: agent.journal.pending() == 0, 30, "the controller to be back")
        wait_for(lambda: agent.journal.pending() == 0, 30, "the healthy journal's acks")
        sent = agent.journal.acked
        marks = stored_marks(h, healthy)
        assert len(marks) == sent
        assert sorted(marks) == sorted([r * 10 + k for r in range(3) for k in range(3)] + [99])
        assert counter(h, device_rejected_name(healthy, "event_cap")) == 0
        # The flooder kept at most its cap, and what it lost is counted. Its
        # 100 KB events are published without waiting, so the controller may
        # still be storing them when the healthy journal is acknowledged.
        wait_for(
            lambda: counter(h, device_rejected_name(flooder, "event_cap")) > 0,
            30,
            "the flooder's dropped events to be counted",
        )
        assert len(h.registry.events_for(flooder, limit=10_000)) <= CAP
    finally:
        raw.stop()


def test_a_journal_that_overflowed_while_the_controller_was_away_is_acknowledged(
    capped: Harness, cut: CuttableLink, mosquitto: BrokerSettings
) -> None:
    """The agent keeps at most 1000 unacknowledged events and drops its oldest beyond.

    The numbers it dropped never reach the controller, so the controller's
    mark (the highest ``seq`` stored without a gap) could not pass them, and
    the agent replayed its whole journal every ``event_resend_s`` for ever.
    A journal that drops events now continues under a new id, renumbered.
    """
    h = capped
    device_id = h.enroll("overflow")
    # Only the controller is cut off: the agent talks to the broker directly,
    # so what it publishes meanwhile reaches the broker and nobody else.
    agent = h.start_agent(h.agent_config("overflow", event_resend_s=1.0, broker=mosquitto))
    assert agent.link.wait_connected(10)
    cut.cut()
    wait_for(lambda: not h.service.link.connected, 10, "the controller to notice the cut")
    total = 1010
    for n in range(total):
        agent._emit(EventKind.DOWNLOAD_STARTED, None, n=n)
    assert agent.journal.dropped == total - 1000
    # Let the broker take every one of them (QoS 1 messages of one client go
    # in order, so the marker's ack means all of them arrived) while the
    # controller is still away: events 1-10 then exist nowhere but in the past.
    assert agent.link.publish(f"test/flush/{device_id}", b"", qos=1, wait_s=30)
    cut.restore()
    wait_for(lambda: agent.journal.pending() == 0, 15, "the journal to be acknowledged")
    # The newest events arrived (the cap keeps the newest of them), and the
    # replay stops: nothing more is sent once everything is acknowledged.
    assert stored_marks(h, device_id)[-1] == total - 1
    assert agent.journal.due(everything=True) == []
