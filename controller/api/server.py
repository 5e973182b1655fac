"""Runs the management API under uvicorn in a thread of the ``serve`` process.

Same process as the MQTT service, so a deploy through the API is published
by the connection that already holds the broker session, and the API reads
the same registry without a second set of credentials. The listening socket
is bound here, before the thread starts, so an address in use is one clear
error naming it instead of a log line from a background thread.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from edgefleet.controller.api.app import create_app
from edgefleet.controller.config import ApiSettings
from edgefleet.controller.service import ControllerService
from edgefleet.protocols.errors import ConfigError

if TYPE_CHECKING:
    from edgefleet.controller.config import ControllerConfig

__all__ = ["ApiServer", "start_api", "start_configured_api"]

log = logging.getLogger(__name__)


class ApiServer:
    """A running API server; :meth:`stop` ends it and waits for its thread."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, tls: bool) -> None:
        self._server = server
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self.host: str = host
        self.port: int = port
        scheme = "https" if tls else "http"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown}:{port}"
        self._thread = threading.Thread(target=self._run, name="controller-api", daemon=True)
        self.failed: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # reported by start(), kept in .failed
            self.failed = exc
            log.exception("the management API stopped")

    def _start(self, timeout_s: float) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the management API did not start on {self.url}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()
        timer = getattr(self._server.config.app, "state", None)
        if timer is not None and getattr(timer, "query_timer", None) is not None:
            timer.query_timer.close()
            timer.query_timer = None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"API address {host}:{port} is already in use; choose another with "
                "--api-address or [api] address"
            ) from None
        raise ConfigError(f"cannot listen on API address {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def start_api(
    service: ControllerService,
    settings: ApiSettings,
    *,
    ca_dir: Path | None = None,
    timeout_s: float = 10.0,
) -> ApiServer:
    """Serve the API of ``service`` on ``settings.address`` until :meth:`ApiServer.stop`.

    Raises:
        ConfigError: the address is in use or cannot be bound, or the TLS
            certificate or key cannot be loaded.
    """
    app = create_app(service, ca_dir=ca_dir)
    config = uvicorn.Config(
        app,
        ssl_certfile=settings.cert_file,
        ssl_keyfile=settings.key_file,
        log_level="warning",
        lifespan="off",
        access_log=False,
        server_header=False,
    )
    try:
        config.load()
    except (OSError, ssl.SSLError) as exc:
        app.state.query_timer.close()
        raise ConfigError(
            f"cannot load the API's TLS certificate {settings.cert_file} / key "
            f"{settings.key_file}: {exc}"
        ) from None
    try:
        sock = _bind(settings.host, settings.port)
    except ConfigError:
        app.state.query_timer.close()
        raise
    server = ApiServer(uvicorn.Server(config), sock, settings.tls)
    server._start(timeout_s)
    log.info("management API on %s", server.url)
    return server


def start_configured_api(
    service: ControllerService,
    config: ControllerConfig,
    address: str | None = None,
    *,
    disabled: bool = False,
) -> ApiServer | None:
    """What ``serve`` runs: the ``[api]`` table, ``address`` (``--api-address``) overriding it.

    Returns ``None`` when the API is disabled (``--no-api`` or ``enabled = false``).

    Raises:
        ConfigError: as :func:`start_api`, or ``address`` is not ``host:port``.
    """
    settings = config.api if address is None else replace(config.api, address=address)
    if disabled or not settings.enabled:
        return None
    return start_api(service, settings, ca_dir=config.home / "ca")
