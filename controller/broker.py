"""The embedded MQTT broker (amqtt) for one-machine setups, the demo and tests.

amqtt is asyncio-native; we run it on an event loop in a daemon thread so the
rest of edgefleet (paho clients, SQLAlchemy, http.server) stays synchronous.
It binds to loopback on a free port by default: port 1883 is usually taken
by a system Mosquitto, and an embedded broker must never be reachable from
the network by accident.

Production fleets use a real broker (``deploy/mosquitto.conf``): amqtt keeps
everything in memory and, as measured, drops QoS 1 messages queued for an
offline persistent session - which our protocol never relies on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from typing import Any

from edgefleet.protocols.errors import BrokerError

__all__ = ["EmbeddedBroker", "check_port_free", "free_port"]

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _bind_error(host: str, port: int, exc: OSError) -> BrokerError:
    if exc.errno == errno.EADDRINUSE:
        return BrokerError(
            f"cannot start the embedded MQTT broker on {host}:{port}: port {port} is already "
            "in use (another broker?); choose another with --broker-port"
        )
    return BrokerError(
        f"cannot start the embedded MQTT broker on {host}:{port}: {exc.strerror or exc}"
    )


def check_port_free(host: str, port: int) -> None:
    """Refuse, with a sentence naming the address, a port something already listens on.

    amqtt reports a taken port as a traceback from deep in asyncio; binding
    first (with ``SO_REUSEADDR``, as asyncio does, so a port in ``TIME_WAIT``
    passes) turns that into one line.

    Raises:
        BrokerError: the address cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BrokerError(f"cannot resolve broker host {host!r}: {exc.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            raise _bind_error(host, port, exc) from None


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` in a background thread.

    Use as a context manager, or call :meth:`start`/:meth:`stop`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 15.0) -> None:
        """Start listening.

        Raises:
            BrokerError: amqtt is not installed, the port is taken (the
                message names it), or the broker failed to start.
        """
        try:
            import amqtt.broker  # noqa: F401
        except ImportError as exc:
            raise BrokerError(
                "the embedded broker needs amqtt: pip install 'edgefleet[embedded-broker]'"
            ) from exc
        check_port_free(self.host, self.port)
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise BrokerError(f"embedded broker did not start within {timeout_s:g}s")
        error = self._error
        if isinstance(error, OSError):  # lost a race for the port after check_port_free
            raise _bind_error(self.host, self.port, error) from None
        if error is not None:
            raise BrokerError(f"embedded broker failed to start: {error}") from error
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)

    def _run(self) -> None:
        from amqtt.broker import Broker

        # amqtt logs every packet at INFO; keep our logs readable.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        config = {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}
            },
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

        async def boot() -> None:
            self._broker = Broker(config, loop=loop)
            await self._broker.start()

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:  # noqa: BLE001 - reported to start() on the caller thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
        try:
            fut.result(timeout_s)
        except Exception:  # shutting down anyway; amqtt may complain about dead sessions
            log.debug("embedded broker shutdown raised", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._broker = None
