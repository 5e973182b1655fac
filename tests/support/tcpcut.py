"""A TCP forwarder a test can cut: one client's network link, and nobody else's.

The controller reaches the broker through it; :meth:`CuttableLink.cut`
closes every forwarded connection (what a pulled cable or a NAT timeout does
to that one client) and refuses new ones until :meth:`CuttableLink.restore`.
The bytes pass through unchanged, so TLS is end to end between the client
and Mosquitto and the broker sees the client's own certificate.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from edgefleet.controller.broker import free_port

__all__ = ["CuttableLink"]


class CuttableLink:
    """Listen on a free loopback port and forward each connection to ``target_port``."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = free_port()
        self._server = socket.create_server((host, self.port))
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._up = True
        self._closed = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="tcpcut", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                client.close()
                continue
            try:
                upstream = socket.create_connection((self.host, self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every forwarded connection and refuse new ones."""
        with self._lock:
            self._up = False
            sockets, self._open = self._open, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def restore(self) -> None:
        """Accept and forward connections again."""
        with self._lock:
            self._up = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._server.close()
