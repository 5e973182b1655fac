"""The in-memory broker and link: MQTT 3.1.1 semantics our code relies on, without a network."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.protocols.errors import BrokerError
from edgefleet.shared.link import Link, Will
from edgefleet.shared.memlink import (
    MemoryBroker,
    MemoryLink,
    split_shared,
    topic_matches,
    validate_filter,
)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


class Inbox:
    """A handler that records what it gets, and on which thread."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, bool]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._lock:
            self.got.append((topic, payload, retained))
            self.threads.add(threading.current_thread().name)

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p for _t, p, _r in self.got]


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    with MemoryBroker() as b:
        yield b


# ---------------------------------------------------------------------- topic matching
LEVEL = st.sampled_from(["a", "b", "", "$x", "sport", "ab"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map("/".join).filter(bool)
FILTER = st.builds(
    lambda levels, tail: "/".join(levels + tail),
    st.lists(st.one_of(LEVEL, st.just("+")), min_size=0, max_size=5),
    st.sampled_from([[], ["#"]]),
).filter(bool)


@given(FILTER, TOPIC)
def test_matching_agrees_with_paho(topic_filter: str, topic: str) -> None:
    validate_filter(topic_filter)
    assert topic_matches(topic_filter, topic) == mqtt.topic_matches_sub(topic_filter, topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("sport/tennis/#", "sport/tennis", True),  # '#' includes the parent level
        ("sport/#", "sport/tennis/player1/ranking", True),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),  # '+' matches an empty level
        ("+/+", "/finance", True),
        ("#", "$SYS/uptime", False),  # wildcards first never match '$' topics
        ("+/uptime", "$SYS/uptime", False),
        ("$SYS/#", "$SYS/uptime", True),
        ("a/b", "a/b/c", False),
    ],
)
def test_spec_examples(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize("bad", ["", "a#", "a/#/b", "a+", "a/b+/c", "#/a"])
def test_invalid_filters_are_refused(bad: str) -> None:
    with pytest.raises(BrokerError):
        validate_filter(bad)


def test_shared_filter_parts() -> None:
    assert split_shared("$share/g/a/+/b") == ("g", "a/+/b")
    assert split_shared("a/b") == (None, "a/b")
    assert split_shared("$share/g") == (None, "$share/g")


# ---------------------------------------------------------------------- delivery
def test_it_is_a_link(broker: MemoryBroker) -> None:
    link: Link = broker.link("typed")  # mypy checks MemoryLink against the protocol
    link.start()
    assert link.connected and link.wait_connected(0) and link.client_id == "typed"


def test_qos0_and_qos1_between_clients_on_the_delivery_thread(broker: MemoryBroker) -> None:
    inbox = Inbox()
    sub = broker.link("sub")
    sub.subscribe("devices/+/events", inbox)
    sub.start()
    pub = broker.link("pub")
    pub.start()
    assert pub.publish("devices/gw1/events", b"q0", qos=0)
    assert pub.publish("devices/gw1/events", b"q1", qos=1, wait_s=1.0)
    assert pub.publish("devices/gw1/status", b"other", qos=1)
    wait_for(lambda: len(inbox.got) == 2)
    assert inbox.got == [("devices/gw1/events", b"q0", False), ("devices/gw1/events", b"q1", False)]
    assert inbox.threads == {"memlink-sub"}


def test_each_client_gets_one_copy_for_all_its_matching_handlers(broker: MemoryBroker) -> None:
    first, second = Inbox(), Inbox()
    sub = broker.link("sub")
    sub.subscribe("a/#", first)
    sub.subscribe("a/+", second)
    sub.start()
    pub = broker.link("pub")
    pub.start()
    pub.publish("a/b", b"x", qos=1)
    wait_for(lambda: len(first.got) == 1 and len(second.got) == 1)
    time.sleep(0.05)
    assert first.payloads() == second.payloads() == [b"x"]


def test_retained_messages_reach_new_subscribers_and_empty_clears(broker: MemoryBroker) -> None:
    pub = broker.link("pub")
    pub.start()
    pub.publish("d/gw1/desired", b"v1", qos=1, retain=True)
    pub.publish("d/gw1/desired", b"v2", qos=1, retain=True)  # replaces
    pub.publish("d/gw2/desired", b"w", qos=1, retain=True)
    assert broker.retained("d/gw1/desired") == b"v2"
    inbox = Inbox()
    sub = broker.link("sub")
    sub.subscribe("d/gw1/#", inbox)
    sub.start()
    wait_for(lambda: len(inbox.got) == 1)
    assert inbox.got == [("d/gw1/desired", b"v2", True)]
    pub.publish("d/gw1/desired", b"", qos=1, retain=True)  # clears, and is delivered live
    wait_for(lambda: len(inbox.got) == 2)
    assert inbox.got[1] == ("d/gw1/desired", b"", False)
    assert broker.retained("d/gw1/desired") is None
    late = Inbox()
    other = broker.link("late")
    other.subscribe("d/#", late)
    other.start()
    wait_for(lambda: len(late.got) == 1)
    time.sleep(0.05)
    assert late.got == [("d/gw2/desired", b"w", True)]


def test_subscribing_while_connected_gets_retained_too(broker: MemoryBroker) -> None:
    pub = broker.link("pub")
    pub.start()
    pub.publish("t", b"kept", retain=True)
    inbox = Inbox()
    sub = broker.link("sub")
    sub.start()
    sub.subscribe("t", inbox)
    wait_for(lambda: inbox.got == [("t", b"kept", True)])


def test_last_will_only_on_an_unclean_stop(broker: MemoryBroker) -> None:
    inbox = Inbox()
    watcher = broker.link("watcher")
    watcher.subscribe("status/#", inbox)
    watcher.start()
    will = Will("status/gw1", b"offline", qos=1, retain=True)
    polite = broker.link("gw1", will=will)
    polite.start()
    polite.stop()
    crashed = broker.link("gw1", will=will)
    crashed.start()
    crashed.stop(clean=False)
    wait_for(lambda: len(inbox.got) == 1)
    time.sleep(0.05)
    assert inbox.got == [("status/gw1", b"offline", False)]
    assert broker.retained("status/gw1") == b"offline"


def test_a_second_client_with_the_same_id_takes_over(broker: MemoryBroker) -> None:
    inbox_old, inbox_new, status = Inbox(), Inbox(), Inbox()
    watcher = broker.link("watcher")
    watcher.subscribe("status/+", status)
    watcher.start()
    old = broker.link("gw1", will=Will("status/gw1", b"offline"))
    old.subscribe("cmd", inbox_old)
    old.start()
    new = broker.link("gw1")
    new.subscribe("cmd", inbox_new)
    new.start()
    assert not old.connected and new.connected
    assert broker.clients() == ["gw1", "watcher"]
    watcher.publish("cmd", b"go", qos=1)
    wait_for(lambda: inbox_new.payloads() == [b"go"])
    wait_for(lambda: status.payloads() == [b"offline"])  # the old connection's will
    assert inbox_old.got == []
    # The old link's goodbye must not end the new one's session.
    old.stop(clean=False)
    assert broker.clients() == ["gw1", "watcher"]
    time.sleep(0.05)
    assert status.payloads() == [b"offline"]


def test_shared_subscription_gives_each_message_to_one_member(broker: MemoryBroker) -> None:
    members = [Inbox(), Inbox()]
    for i, inbox in enumerate(members):
        link = broker.link(f"ctl-{i}")
        link.subscribe("$share/controllers/d/+/events", inbox)
        link.start()
    everyone = Inbox()
    plain = broker.link("plain")
    plain.subscribe("d/+/events", everyone)
    plain.start()
    pub = broker.link("gw")
    pub.start()
    for n in range(10):
        pub.publish(f"d/gw{n}/events", str(n).encode(), qos=1)
    wait_for(lambda: len(everyone.got) == 10)
    wait_for(lambda: sum(len(m.got) for m in members) == 10)
    got = sorted(p for m in members for p in m.payloads())
    assert got == sorted(str(n).encode() for n in range(10))
    assert all(m.got for m in members)  # the work is split, not all to one
    # The topic handlers see is the one published to, not the $share filter.
    assert all(t.startswith("d/gw") for m in members for t, _p, _r in m.got)


def test_shared_subscriptions_get_no_retained_messages(broker: MemoryBroker) -> None:
    pub = broker.link("pub")
    pub.start()
    pub.publish("d/gw1/status", b"online", retain=True)
    inbox, plain = Inbox(), Inbox()
    link = broker.link("ctl")
    link.subscribe("$share/g/d/+/status", inbox)
    link.start()
    other = broker.link("other")
    other.subscribe("d/+/status", plain)
    other.start()
    wait_for(lambda: len(plain.got) == 1)
    time.sleep(0.05)
    assert inbox.got == []


def test_handler_errors_are_logged_and_delivery_goes_on(
    broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = Inbox()

    def broken(topic: str, payload: bytes, retained: bool) -> None:
        raise RuntimeError("handler bug")

    sub = broker.link("sub")
    sub.subscribe("x/#", broken)
    sub.subscribe("x/+", inbox)
    sub.start()
    pub = broker.link("pub")
    pub.start()
    with caplog.at_level(logging.ERROR, logger="edgefleet.shared.memlink"):
        assert pub.publish("x/1", b"a", qos=1)
        assert pub.publish("x/2", b"b", qos=1)
        wait_for(lambda: inbox.payloads() == [b"a", b"b"])
    assert sum("handler for x/" in r.getMessage() for r in caplog.records) == 2


def test_a_slow_handler_does_not_block_the_publisher_or_other_clients(
    broker: MemoryBroker,
) -> None:
    release = threading.Event()
    fast = Inbox()

    def stuck(_topic: str, _payload: bytes, _retained: bool) -> None:
        release.wait(5)

    slow = broker.link("slow")
    slow.subscribe("t", stuck)
    slow.start()
    quick = broker.link("quick")
    quick.subscribe("t", fast)
    quick.start()
    pub = broker.link("pub")
    pub.start()
    started = time.monotonic()
    for _ in range(3):
        pub.publish("t", b"m", qos=1, wait_s=1.0)
    wait_for(lambda: len(fast.got) == 3)
    assert time.monotonic() - started < 2.0
    release.set()


def test_on_connect_runs_after_subscriptions_renew_and_again_after_a_drop(
    broker: MemoryBroker,
) -> None:
    inbox = Inbox()
    connects: list[str] = []
    link: MemoryLink

    def on_connect() -> None:
        connects.append(threading.current_thread().name)
        # Publishing to our own subscription works: it was renewed first.
        link.publish("own/status", b"online", qos=1, retain=True)

    link = broker.link("agent", will=Will("own/status", b"offline"), on_connect=on_connect)
    link.subscribe("own/#", inbox)
    link.start(wait=False)
    wait_for(lambda: inbox.payloads() == [b"online"])
    assert broker.drop("agent")  # a network failure: the will, then a reconnect
    wait_for(lambda: len(connects) == 2)
    wait_for(lambda: inbox.payloads()[-1:] == [b"online"])
    assert connects == ["memlink-agent", "memlink-agent"]
    assert b"offline" in inbox.payloads()  # the will went out before the reconnect
    assert link.connected
    assert not broker.drop("nobody")


def test_qos1_waits_for_a_connection_and_qos0_is_dropped_offline(broker: MemoryBroker) -> None:
    inbox = Inbox()
    sub = broker.link("sub")
    sub.subscribe("t", inbox)
    sub.start()
    pub = broker.link("pub")
    assert pub.publish("t", b"lost", qos=0) is True  # paho, too, reports it queued
    assert pub.publish("t", b"kept", qos=1) is True
    assert pub.publish("t", b"acked?", qos=1, wait_s=0.1) is False  # not acknowledged
    time.sleep(0.05)
    assert inbox.got == []
    pub.start()
    wait_for(lambda: inbox.payloads() == [b"kept", b"acked?"])


def test_restart_after_stop_renews_subscriptions(broker: MemoryBroker) -> None:
    inbox = Inbox()
    sub = broker.link("sub")
    sub.subscribe("t", inbox)
    sub.start()
    sub.stop()
    pub = broker.link("pub")
    pub.start()
    pub.publish("t", b"while away", qos=1)
    sub.start()
    pub.publish("t", b"back", qos=1)
    wait_for(lambda: inbox.payloads() == [b"back"])


def test_refuses_what_a_broker_would(broker: MemoryBroker) -> None:
    link = broker.link("x")
    link.start()
    with pytest.raises(BrokerError):
        link.publish("a/+", b"")
    with pytest.raises(BrokerError):
        link.publish("", b"")
    with pytest.raises(BrokerError):
        link.publish("a", b"", qos=2)
    with pytest.raises(BrokerError):
        link.subscribe("a/#/b", Inbox())


def test_unsubscribing_stops_delivery(broker: MemoryBroker) -> None:
    inbox = Inbox()
    sub = broker.link("sub")
    sub.subscribe("t/#", inbox)
    sub.subscribe("barrier", inbox)
    sub.start()
    pub = broker.link("pub")
    pub.start()
    pub.publish("t/1", b"a", qos=1)
    wait_for(lambda: inbox.got == [("t/1", b"a", False)])
    sub.unsubscribe("t/#")
    sub.unsubscribe("never/subscribed")  # ignored
    pub.publish("t/1", b"b", qos=1)
    pub.publish("barrier", b"", qos=1)  # in order after "b": once it is here, "b" would be too
    wait_for(lambda: len(inbox.got) == 2)
    assert inbox.got[1][0] == "barrier"
