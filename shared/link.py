"""The one adapter around paho-mqtt, used by the agent and reused by the controller.

paho runs its network loop in a thread of its own and calls back from there.
This module is the only place that knows: callbacks are turned into calls to
handlers registered per topic filter, paho's return codes become
:class:`BrokerError`, and subscriptions are remembered and renewed on every
reconnect (a clean session forgets them, and we do not rely on persistent
sessions - see the design notes on MQTT 3.1.1).

Handlers run on paho's network thread, so they must be quick: decode, check,
enqueue. Anything slow (a database write, an install) blocks every other
message, including the transfer blocks an install is waiting for.

Only MQTT 3.1.1 features are used: QoS 0/1, retained messages, a Last Will.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgefleet.protocols.errors import BrokerError, ConfigError
from edgefleet.shared.settings import settings_from_table

__all__ = ["BrokerSettings", "Handler", "Link", "LinkFactory", "MqttLink", "Will", "mqtt_links"]

log = logging.getLogger(__name__)

# Bound on the topic -> handlers cache (one entry per device and channel seen).
_MAX_ROUTES = 100_000
# Bound on remembered message ids (paho's mids are 16-bit).
_MAX_TRACKED = 65_536

Handler = Callable[[str, bytes, bool], None]
"""``handler(topic, payload, retained)``, called on paho's network thread."""


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to reach the broker. Units are in the field names."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    reconnect_min_delay_s: int = 1
    reconnect_max_delay_s: int = 30

    def __post_init__(self) -> None:
        if not (0 < self.port < 65536):
            raise ConfigError(f"broker port must be 1-65535, got {self.port}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("broker cert_file and key_file must be given together")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BrokerSettings:
        """Build from a ``[broker]`` config table, refusing unknown keys."""
        return settings_from_table(cls, d, section="broker")


@dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes when the link dies without a goodbye."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Link(Protocol):
    """What the agent and the controller need from a broker connection.

    :class:`MqttLink` is the implementation that talks to a real broker;
    :class:`edgefleet.shared.memlink.MemoryLink` is an in-process one for unit
    tests. Code that only publishes and subscribes takes a ``Link``, so it
    cannot come to depend on paho by accident.

    Both call handlers and the ``on_connect`` hook on one thread per link (paho's
    network thread, or the in-memory link's delivery thread), never on the
    caller's; a handler's exception is logged, not raised.
    """

    @property
    def client_id(self) -> str:
        """The MQTT client id; a second connection with the same id replaces this one."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the broker has accepted us and the connection is up now."""
        ...

    def start(self, *, wait: bool = True) -> None:
        """Connect (and keep reconnecting); with ``wait``, block until connected.

        Raises:
            BrokerError: ``wait`` is set and the connection was not made.
        """
        ...

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until connected or ``timeout_s`` passed; returns whether connected."""
        ...

    def stop(self, *, clean: bool = True) -> None:
        """Disconnect; ``clean=False`` drops the link so the broker sends the Last Will."""
        ...

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler``, now and after reconnects."""
        ...

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter`` and tell the broker, so it stops sending its messages.

        A filter that was never subscribed is ignored.
        """
        ...

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
        """Send a message; with ``wait_s``, return whether the broker acknowledged it in time.

        ``on_sent`` is called once, on the link's thread (possibly before
        ``publish`` returns), when the message has left the link: the broker
        acknowledged it (QoS 1) or it was written (QoS 0). The transfer server
        uses it to know how many bytes the client still holds.

        Raises:
            BrokerError: the message was refused outright (``on_sent`` is not called).
        """
        ...


class LinkFactory(Protocol):
    """Makes the :class:`Link` for a role: ``factory(client_id, will=..., on_connect=...)``.

    The agent and the controller service take one so tests can hand them an
    in-memory broker's links (``MemoryBroker.link``) instead of an MQTT client.
    """

    def __call__(
        self,
        client_id: str,
        *,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> Link: ...


def _match_filter(topic_filter: str) -> str:
    """The part of a filter that topics match: ``$share/<group>/`` is not part of it.

    A shared subscription (``$share/<group>/<filter>``, MQTT 5 and Mosquitto
    for 3.1.1 clients too) delivers each message to one member of the group,
    on the topic it was published to.
    """
    if topic_filter.startswith("$share/"):
        _group, sep, rest = topic_filter[len("$share/") :].partition("/")
        if sep:
            return rest
    return topic_filter


class MqttLink:
    """A connected (and reconnecting) MQTT 3.1.1 client with per-filter handlers.

    Args:
        settings: broker address, credentials and TLS files.
        client_id: MQTT client id; brokers disconnect an older session with
            the same id, so it must be unique per process role.
        will: optional Last Will.
        on_connect: called (on paho's thread) after every successful
            connect, after subscriptions are renewed - publish "online" and
            retained state here.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        *,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
        max_inflight: int = 64,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self._on_connect_hook = on_connect
        self._handlers: dict[str, tuple[int, Handler]] = {}
        # topic -> handlers whose filter matches it. paho's topic_matches_sub
        # builds a matcher tree per call; once per filter per message it was
        # most of the controller's receive cost. Cleared when filters change.
        self._routes: dict[str, list[Handler]] = {}
        self._lock = threading.Lock()
        # mid -> on_sent for messages paho still holds (see _track).
        self._sent_lock = threading.Lock()
        self._on_sent: dict[int, Callable[[], None] | None] = {}
        self._sent_early: set[int] = set()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._stopped = False
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        client.max_inflight_messages_set(max_inflight)
        client.reconnect_delay_set(settings.reconnect_min_delay_s, settings.reconnect_max_delay_s)
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            try:
                client.tls_set(
                    ca_certs=settings.ca_file,
                    certfile=settings.cert_file,
                    keyfile=settings.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"cannot load TLS files for the broker: {exc}") from exc
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._client = client

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, wait: bool = True) -> None:
        """Connect in the background; with ``wait``, block until connected.

        Raises:
            BrokerError: ``wait`` is set and the broker refused us or did not
                answer within ``connect_timeout_s``.
        """
        s = self.settings
        try:
            self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot connect to broker {s.host}:{s.port}: {exc}") from exc
        self._client.loop_start()
        if wait and not self.wait_connected(s.connect_timeout_s):
            reason = self._refused or "no answer"
            self.stop()
            raise BrokerError(
                f"could not connect to MQTT broker {s.host}:{s.port} within "
                f"{s.connect_timeout_s:g}s ({reason})"
            )

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, *, clean: bool = True) -> None:
        """Disconnect and stop the network thread.

        With ``clean=False`` the socket is dropped without a DISCONNECT, so
        the broker publishes the Last Will - what a crash or a pulled cable
        looks like. Tests use it to prove the controller sees devices go
        offline.
        """
        self._stopped = True
        if clean:
            self._client.disconnect()
        else:
            sock = self._client.socket()
            if sock is not None:
                try:
                    sock.close()
                except OSError:  # pragma: no cover - already closed
                    pass
        self._client.loop_stop()
        self._connected.clear()

    # ------------------------------------------------------------------ pub/sub
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler``, now and after reconnects."""
        with self._lock:
            self._handlers[topic_filter] = (qos, handler)
            self._routes.clear()
        if self.connected:
            self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter`` and tell the broker (not after reconnects either)."""
        with self._lock:
            if self._handlers.pop(topic_filter, None) is None:
                return
            self._routes.clear()
        if self.connected:
            self._client.unsubscribe(topic_filter)

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
        """Queue a message; with ``wait_s``, wait until the broker acknowledged it.

        ``on_sent`` is called on paho's thread when paho reports the message
        sent (``on_publish``: PUBACK received for QoS 1, written for QoS 0).
        Until then paho holds the payload in memory; this is how a caller
        bounds what it has queued (see ``controller/transfer.py``).

        Returns:
            True once queued (or acknowledged, with ``wait_s``); False when the
            message was not acknowledged in time. A QoS 1 message queued while
            offline is sent after the next reconnect by paho.

        Raises:
            BrokerError: paho refused the message outright (e.g. too large).
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        self._track(info.mid, on_sent)
        if wait_s is None:
            return True
        try:
            info.wait_for_publish(wait_s)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def _track(self, mid: int, on_sent: Callable[[], None] | None) -> None:
        """Remember ``on_sent`` for message ``mid`` until paho reports it sent.

        Every publish is recorded (with ``None`` when nobody waits), because
        paho may report a message sent before ``publish`` returned here: an
        ``on_publish`` for a mid not yet recorded is kept in ``_sent_early``
        and consumed by that publish's own record, so no mark outlives its
        message and a reused mid never matches a stale one. Our lock is never
        held while calling paho: paho calls ``on_publish`` with its own
        message lock held, and ``publish`` takes that lock.
        """
        with self._sent_lock:
            if mid in self._sent_early:
                self._sent_early.discard(mid)
                done_now = True
            else:
                if len(self._on_sent) >= _MAX_TRACKED:
                    # Only unwaited marks of messages paho dropped (QoS 0 offline)
                    # can pile up; waited ones are bounded by their callers.
                    self._on_sent = {m: c for m, c in self._on_sent.items() if c is not None}
                self._on_sent[mid] = on_sent
                done_now = False
        if done_now and on_sent is not None:
            on_sent()

    # ------------------------------------------------------------------ paho callbacks
    def _on_publish(
        self, _client: mqtt.Client, _userdata: Any, mid: int, _reason: Any, _props: Any
    ) -> None:
        with self._sent_lock:
            if mid in self._on_sent:
                callback = self._on_sent.pop(mid)
            else:
                if len(self._sent_early) >= _MAX_TRACKED:
                    self._sent_early.clear()
                self._sent_early.add(mid)
                callback = None
        if callback is not None:
            try:
                callback()
            except Exception:  # a callback bug must not kill paho's network thread
                log.exception("on_sent callback failed")

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            log.warning("broker refused connection: %s", reason)
            return
        # Request/response over MQTT (block transfers) is a train of small
        # packets; with Nagle's algorithm each one can wait for a delayed ACK
        # (40 ms on Linux). paho does not disable it, so we do.
        sock = client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            subs = [(f, q) for f, (q, _h) in self._handlers.items()]
        if subs:
            client.subscribe(subs)
        self._connected.set()
        log.info("connected to %s:%s as %s", self.settings.host, self.settings.port, self.client_id)
        if self._on_connect_hook is not None:
            try:
                self._on_connect_hook()
            except Exception:  # a hook bug must not kill paho's thread
                log.exception("on_connect hook failed")

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._connected.clear()
        if not self._stopped:
            log.warning("lost broker connection (%s); paho will reconnect", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        handlers = self._routes.get(topic)
        if handlers is None:
            with self._lock:
                handlers = [
                    h
                    for f, (_q, h) in self._handlers.items()
                    if mqtt.topic_matches_sub(_match_filter(f), topic)
                ]
                if len(self._routes) >= _MAX_ROUTES:
                    self._routes.clear()
                self._routes[topic] = handlers
        for handler in handlers:
            try:
                handler(topic, bytes(msg.payload), bool(msg.retain))
            except Exception:  # a handler bug must not kill paho's network thread
                log.exception("handler for %s failed", msg.topic)


def mqtt_links(settings: BrokerSettings) -> LinkFactory:
    """The :class:`LinkFactory` of real MQTT links to the broker at ``settings``."""

    def factory(
        client_id: str,
        *,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> Link:
        return MqttLink(settings, client_id, will=will, on_connect=on_connect)

    return factory
