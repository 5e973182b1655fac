"""An in-process broker and links to it: the :class:`Link` interface without a network.

Unit tests of the fetcher, the agent daemon and the controller service run
both ends of a conversation in one process. :class:`MemoryBroker` is one
broker (make one per test); :meth:`MemoryBroker.link` makes a
:class:`MemoryLink` bound to it, which implements
:class:`edgefleet.shared.link.Link` the way :class:`MqttLink` does against
Mosquitto or amqtt:

- MQTT 3.1.1 topic filters with ``+`` and ``#`` (:func:`topic_matches`, which
  also keeps wildcards at the first level away from ``$`` topics);
- ``$share/<group>/<filter>`` shared subscriptions: each message goes to one
  connected member of the group, in turn;
- retained messages, handed to every new subscription with ``retained=True``;
  a retained empty payload clears the topic's retained message;
- the Last Will, published when a client goes away without a clean stop:
  ``stop(clean=False)``, :meth:`MemoryBroker.drop` (a network failure, after
  which the link reconnects like paho does) or a client-id takeover;
  :meth:`MemoryBroker.restart` drops everyone without wills and forgets the
  retained messages;
- client-id takeover: a second client with the same id disconnects the first,
  as a broker does;
- QoS 0 and 1 between clients of one broker. Nothing is lost in memory, so
  the difference is what happens while the publisher is offline: QoS 1 is
  kept and sent on the next connect (paho does the same), QoS 0 is dropped.

Threads: each link delivers on its own delivery thread, as paho calls back on
its network thread: handlers and the ``on_connect`` hook never run on the
publisher's thread, a slow handler delays only its own link's messages, and a
handler's exception is logged, not raised. The hook runs after the
subscriptions are renewed and before the retained messages they bring.
Messages reach each link in the order the broker accepted them.

What it does not do: persistent sessions (every connect is a clean session,
which is all our links use), QoS 2, MQTT 5 properties, authentication, ACLs,
TLS, message size limits beyond MQTT's own, and flow control (a link that
never drains its queue grows it). A taken-over link stays disconnected until
``start()`` is called again; paho would reconnect and take the id back.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from edgefleet.protocols.errors import BrokerError
from edgefleet.shared.link import Handler, Will

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MemoryBroker",
    "MemoryLink",
    "split_shared",
    "topic_matches",
    "validate_filter",
    "validate_topic",
]

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 268_435_455
"""The largest payload MQTT 3.1.1's remaining-length field can carry."""

_SHARE_PREFIX = "$share/"


# ---------------------------------------------------------------------- topics
def validate_topic(topic: str) -> None:
    """Refuse a topic a client may not publish to: empty, wildcards or NUL.

    Raises:
        BrokerError: the topic is not a valid MQTT 3.1.1 topic name.
    """
    if not topic:
        raise BrokerError("topic must not be empty")
    if "+" in topic or "#" in topic:
        raise BrokerError(f"cannot publish to a wildcard topic: {topic!r}")
    if "\x00" in topic:
        raise BrokerError("topic must not contain NUL")
    if len(topic.encode()) > 65535:
        raise BrokerError("topic longer than 65535 bytes")


def validate_filter(topic_filter: str) -> None:
    """Refuse a filter MQTT 3.1.1 forbids (``a#``, ``a/#/b``, ``a+``, empty).

    Raises:
        BrokerError: the filter is not valid.
    """
    if not topic_filter:
        raise BrokerError("topic filter must not be empty")
    if "\x00" in topic_filter:
        raise BrokerError("topic filter must not contain NUL")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise BrokerError(f"'#' must be a whole, last level: {topic_filter!r}")
        if "+" in level and level != "+":
            raise BrokerError(f"'+' must be a whole level: {topic_filter!r}")


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``$share/<group>/<filter>`` -> ``(group, filter)``; any other filter -> ``(None, filter)``.

    A ``$share/`` filter without a group and a filter is an ordinary filter,
    as :class:`MqttLink` treats it.

    Raises:
        BrokerError: the group name holds a wildcard.
    """
    if topic_filter.startswith(_SHARE_PREFIX):
        group, sep, rest = topic_filter[len(_SHARE_PREFIX) :].partition("/")
        if sep and group and rest:
            if "+" in group or "#" in group:
                raise BrokerError(f"share group must not hold wildcards: {topic_filter!r}")
            return group, rest
    return None, topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` under MQTT 3.1.1 (section 4.7).

    ``+`` matches exactly one level (an empty one too), ``#`` the rest of the
    topic including its parent level (``a/#`` matches ``a``). A filter that
    starts with a wildcard does not match a topic starting with ``$``
    (``$SYS/...``). Pure; the filter is assumed valid (:func:`validate_filter`).
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    want = topic_filter.split("/")
    have = topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


# ---------------------------------------------------------------------- broker
@dataclass
class _Subscription:
    qos: int
    group: str | None
    match: str


@dataclass
class _Session:
    """The broker's view of one connected client."""

    link: MemoryLink
    will: Will | None
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)


@dataclass(frozen=True)
class _Retained:
    payload: bytes
    qos: int


class MemoryBroker:
    """One in-process MQTT 3.1.1 broker; make one per test.

    All state changes happen under one lock, so every link sees messages in
    the order the broker accepted them; handlers run on the links' own
    threads, never under that lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, _Retained] = {}
        self._turns: dict[tuple[str, str], itertools.count[int]] = {}
        self._links: list[MemoryLink] = []
        self.published = 0

    def __enter__(self) -> MemoryBroker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every link made by :meth:`link` (cleanly: no wills), ending their threads."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.stop()

    def link(
        self,
        client_id: str,
        *,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> MemoryLink:
        """A new, not yet started link to this broker (a :class:`LinkFactory`)."""
        link = MemoryLink(self, client_id, will=will, on_connect=on_connect)
        with self._lock:
            self._links.append(link)
        return link

    # ------------------------------------------------------------------ inspection
    def retained(self, topic: str) -> bytes | None:
        """The retained payload of ``topic``, if any."""
        with self._lock:
            kept = self._retained.get(topic)
        return None if kept is None else kept.payload

    def clients(self) -> list[str]:
        """Ids of the connected clients."""
        with self._lock:
            return sorted(self._sessions)

    # ------------------------------------------------------------------ failures
    def drop(self, client_id: str) -> bool:
        """Cut a client's connection as a network failure would.

        The broker publishes its Last Will; the link notices and reconnects
        on its delivery thread (renewing subscriptions, then its
        ``on_connect`` hook), as paho does. Returns whether it was connected.
        """
        with self._lock:
            session = self._sessions.pop(client_id, None)
            if session is None:
                return False
            self._publish_will(session)
        session.link._lost(reconnect=True)
        return True

    def restart(self) -> None:
        """Lose every connection and every retained message, as a broker restart does.

        No wills are sent (the broker itself went away); every link reconnects
        on its delivery thread, renews its subscriptions and runs its
        ``on_connect`` hook, as paho does.
        """
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            self._retained.clear()
        for session in sessions:
            session.link._lost(reconnect=True)

    # ------------------------------------------------------------------ link side
    def _connect(
        self, link: MemoryLink, will: Will | None, subscriptions: Iterable[tuple[str, int]]
    ) -> None:
        taken_over: MemoryLink | None = None
        with self._lock:
            old = self._sessions.pop(link.client_id, None)
            if old is not None and old.link is not link:
                # Takeover: the older connection is closed without a
                # DISCONNECT from its client, so its will goes out first.
                self._publish_will(old)
                taken_over = old.link
            session = _Session(link, will)
            self._sessions[link.client_id] = session
            link._deliver_connected()
            for topic_filter, qos in subscriptions:
                self._subscribe(session, topic_filter, qos)
        if taken_over is not None:
            log.info("client id %s taken over by a new connection", link.client_id)
            taken_over._lost(reconnect=False)

    def _disconnect(self, link: MemoryLink, *, clean: bool) -> None:
        with self._lock:
            session = self._sessions.get(link.client_id)
            if session is None or session.link is not link:
                return
            del self._sessions[link.client_id]
            if not clean:
                self._publish_will(session)

    def _add_subscription(self, link: MemoryLink, topic_filter: str, qos: int) -> None:
        with self._lock:
            session = self._sessions.get(link.client_id)
            if session is not None and session.link is link:
                self._subscribe(session, topic_filter, qos)

    def _remove_subscription(self, link: MemoryLink, topic_filter: str) -> None:
        with self._lock:
            session = self._sessions.get(link.client_id)
            if session is not None and session.link is link:
                session.subscriptions.pop(topic_filter, None)

    def _accept(self, link: MemoryLink, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        """Take a message from ``link``; False when it is not connected."""
        with self._lock:
            session = self._sessions.get(link.client_id)
            if session is None or session.link is not link:
                return False
            self._route(topic, payload, qos, retain)
            return True

    # ------------------------------------------------------------------ under the lock
    def _subscribe(self, session: _Session, topic_filter: str, qos: int) -> None:
        group, match = split_shared(topic_filter)
        session.subscriptions[topic_filter] = _Subscription(min(qos, 1), group, match)
        if group is not None:
            return  # retained messages are not sent to shared subscriptions
        for topic, kept in self._retained.items():
            if topic_matches(match, topic):
                session.link._enqueue(topic, kept.payload, retained=True)

    def _publish_will(self, session: _Session) -> None:
        will = session.will
        if will is not None:
            self._route(will.topic, will.payload, min(will.qos, 1), will.retain)

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.published += 1
        if retain:
            if payload:
                self._retained[topic] = _Retained(payload, qos)
            else:
                self._retained.pop(topic, None)
        recipients: dict[str, MemoryLink] = {}
        groups: dict[tuple[str, str], list[_Session]] = {}
        for client_id, session in self._sessions.items():
            for sub in session.subscriptions.values():
                if not topic_matches(sub.match, topic):
                    continue
                if sub.group is None:
                    recipients[client_id] = session.link
                else:
                    groups.setdefault((sub.group, sub.match), []).append(session)
        for key, members in groups.items():
            turn = self._turns.setdefault(key, itertools.count())
            chosen = members[next(turn) % len(members)]
            recipients[chosen.link.client_id] = chosen.link
        # One copy per client, whatever number of its filters match (the
        # link hands it to every matching handler, as MqttLink does).
        for link in recipients.values():
            link._enqueue(topic, payload, retained=False)


# ---------------------------------------------------------------------- link
_CONNECTED = object()
_RECONNECT = object()
_STOP = object()


class MemoryLink:
    """A client of a :class:`MemoryBroker`; implements :class:`edgefleet.shared.link.Link`.

    Args:
        broker: the broker it connects to.
        client_id: unique per connected client; a second link with the same
            id takes the connection over.
        will: published by the broker when this link goes away uncleanly.
        on_connect: called on the delivery thread after every connect, after
            subscriptions are renewed.
    """

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        if will is not None:
            validate_topic(will.topic)
        self._broker = broker
        self._client_id = client_id
        self._will = will
        self._on_connect_hook = on_connect
        self._handlers: dict[str, tuple[int, Handler]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stopped = True
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # QoS 1 messages published while offline, sent on the next connect.
        self._pending: list[tuple[str, bytes, bool]] = []

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, wait: bool = True) -> None:
        """Connect and start the delivery thread.

        The connection is made at once (there is no network to wait for), so
        ``wait`` changes nothing; it is accepted for :class:`Link`.
        """
        del wait
        with self._lock:
            if self._thread is None:
                self._inbox = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._deliver_loop, name=f"memlink-{self._client_id}", daemon=True
                )
                self._thread.start()
            self._stopped = False
        self._connect()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def stop(self, *, clean: bool = True) -> None:
        """Disconnect and stop the delivery thread; ``clean=False`` makes the broker send the will.

        Messages not yet handed to handlers are dropped, as paho drops what
        it has not read when its loop stops.
        """
        with self._lock:
            self._stopped = True
            thread, self._thread = self._thread, None
        self._broker._disconnect(self, clean=clean)
        self._connected.clear()
        if thread is not None:
            self._inbox.put(_STOP)
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    # ------------------------------------------------------------------ pub/sub
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler``, now and after reconnects.

        Raises:
            BrokerError: the filter is not valid MQTT 3.1.1 (a broker
                would refuse the subscription).
        """
        _group, match = split_shared(topic_filter)
        validate_filter(match)
        with self._lock:
            self._handlers[topic_filter] = (qos, handler)
        if self.connected:
            self._broker._add_subscription(self, topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter`` and drop the broker's subscription."""
        with self._lock:
            if self._handlers.pop(topic_filter, None) is None:
                return
        self._broker._remove_subscription(self, topic_filter)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        wait_s: float | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> bool:
        """Hand a message to the broker.

        ``on_sent`` is called as soon as the broker took the message or it was
        kept for the next connect (this link holds nothing in flight).

        Returns:
            True when the broker took it (or, without ``wait_s``, when a QoS 1
            message was kept to be sent on the next connect); False when
            offline and ``wait_s`` is given.

        Raises:
            BrokerError: invalid topic, QoS or payload size.
        """
        validate_topic(topic)
        if qos not in (0, 1, 2):
            raise BrokerError(f"publish to {topic} failed: invalid QoS {qos}")
        if qos == 2:
            raise BrokerError("the in-memory link does not implement QoS 2")
        data = bytes(payload)
        if len(data) > MAX_PAYLOAD_BYTES:
            raise BrokerError(
                f"publish to {topic} failed: payload of {len(data)} bytes is too large"
            )
        if self.connected and self._broker._accept(self, topic, data, qos, retain):
            if on_sent is not None:
                on_sent()
            return True
        if qos == 1:
            with self._lock:
                self._pending.append((topic, data, retain))
        if on_sent is not None:
            on_sent()
        return wait_s is None

    # ------------------------------------------------------------------ broker side
    def _connect(self) -> None:
        with self._lock:
            subs = [(f, q) for f, (q, _h) in self._handlers.items()]
        self._broker._connect(self, self._will, subs)
        self._connected.set()
        with self._lock:
            pending, self._pending = self._pending, []
        for topic, data, retain in pending:
            self.publish(topic, data, qos=1, retain=retain)

    def _deliver_connected(self) -> None:
        """Called under the broker lock, before retained messages are queued."""
        self._inbox.put(_CONNECTED)

    def _enqueue(self, topic: str, payload: bytes, *, retained: bool) -> None:
        self._inbox.put((topic, payload, retained))

    def _lost(self, *, reconnect: bool) -> None:
        self._connected.clear()
        if reconnect:
            self._inbox.put(_RECONNECT)
        else:
            log.warning("%s: connection taken over by another client", self._client_id)

    # ------------------------------------------------------------------ delivery thread
    def _deliver_loop(self) -> None:
        inbox = self._inbox
        while True:
            item = inbox.get()
            if item is _STOP:
                return
            if item is _RECONNECT:
                if not self._stopped:
                    log.warning("%s lost the in-memory broker; reconnecting", self._client_id)
                    self._connect()
                continue
            if item is _CONNECTED:
                self._run_hook()
                continue
            assert isinstance(item, tuple)
            topic, payload, retained = item
            self._dispatch(topic, payload, retained)

    def _run_hook(self) -> None:
        if self._on_connect_hook is None:
            return
        try:
            self._on_connect_hook()
        except Exception:  # like MqttLink: a hook bug must not kill the thread
            log.exception("on_connect hook failed")

    def _dispatch(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._lock:
            handlers = [
                h
                for f, (_q, h) in self._handlers.items()
                if topic_matches(split_shared(f)[1], topic)
            ]
        for handler in handlers:
            try:
                handler(topic, payload, retained)
            except Exception:  # like MqttLink: a handler bug must not kill delivery
                log.exception("handler for %s failed", topic)
