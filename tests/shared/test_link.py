"""The paho-based link on real brokers (amqtt and Mosquitto): what the memory link can't prove."""

from __future__ import annotations

import secrets
import threading

from edgefleet.shared.link import BrokerSettings, MqttLink
from tests.e2e.harness import wait_for


class Inbox:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, _retained: bool) -> None:
        with self._lock:
            self.got.append((topic, bytes(payload)))


def test_unsubscribing_stops_the_broker_sending(broker: BrokerSettings) -> None:
    base = f"test/unsub/{secrets.token_hex(4)}"
    inbox = Inbox()
    sub = MqttLink(broker, f"sub-{secrets.token_hex(3)}")
    sub.subscribe(f"{base}/stream/#", inbox)
    sub.subscribe(f"{base}/barrier", inbox)
    pub = MqttLink(broker, f"pub-{secrets.token_hex(3)}")
    sub.start(wait=True)
    pub.start(wait=True)
    try:
        # Retry until the subscription is in place at the broker.
        def arrived() -> bool:
            pub.publish(f"{base}/stream/1", b"a", qos=1, wait_s=5)
            return any(t == f"{base}/stream/1" for t, _ in inbox.got)

        wait_for(arrived, 20, "the first message")
        sub.unsubscribe(f"{base}/stream/#")
        sub.unsubscribe(f"{base}/never")  # never subscribed: ignored

        # UNSUBSCRIBE and the publications travel on ordered connections, but the
        # subscriber's request may reach the broker after our publish: publish
        # until a barrier published after "b" arrives with no "b" before it.
        def quiet_after_barrier() -> bool:
            inbox.got.clear()
            pub.publish(f"{base}/stream/1", b"b", qos=1, wait_s=5)
            pub.publish(f"{base}/barrier", b"", qos=1, wait_s=5)
            wait_for(lambda: any(t.endswith("/barrier") for t, _ in inbox.got), 10, "barrier")
            return all(t.endswith("/barrier") for t, _ in inbox.got)

        wait_for(quiet_after_barrier, 30, "the broker to stop sending")
        # And it stays unsubscribed across a reconnect.
        sub.stop()
        sub.start(wait=True)
        inbox.got.clear()

        def barrier_after_c() -> bool:
            pub.publish(f"{base}/stream/1", b"c", qos=1, wait_s=5)
            pub.publish(f"{base}/barrier", b"", qos=1, wait_s=5)
            return any(t.endswith("/barrier") for t, _ in inbox.got)

        wait_for(barrier_after_c, 20, "the barrier after reconnecting")
        assert not any(t.startswith(f"{base}/stream") for t, _ in inbox.got)
    finally:
        sub.stop()
        pub.stop()
