"""systemd's service notifications (``sd_notify``), spoken directly over its socket.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET``: a unix datagram
socket, either a path or, starting with ``@``, an abstract-namespace name.
Each datagram is newline-separated ``KEY=value`` assignments; the agent sends

- ``READY=1`` once it serves and is connected to its broker (or, offline,
  after a bounded wait: see :mod:`edgefleet.agent.daemon`),
- ``WATCHDOG=1`` from its main loop while that loop and its worker loops are
  healthy, at half the ``WATCHDOG_USEC`` systemd passes with ``WatchdogSec=``
  (a hung agent stops pinging and systemd restarts it),
- ``STOPPING=1`` when it begins to shut down,
- ``STATUS=...`` lines for ``systemctl status``.

No dependency: this is the whole protocol as far as the agent uses it (no
file-descriptor passing). Without ``NOTIFY_SOCKET`` (not under systemd, or
``Type=simple``) every call is a no-op. A send that fails is logged and
counted, never raised: notifications must not take the agent down.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

__all__ = ["SystemdNotifier", "watchdog_interval_s"]

log = logging.getLogger(__name__)


def _address(raw: str | None) -> str | bytes | None:
    """The socket address for ``NOTIFY_SOCKET``, or ``None`` if unset or unusable."""
    if not raw:
        return None
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + raw[1:].encode()  # the abstract namespace: a leading NUL byte
    if raw.startswith("/"):
        return raw
    log.warning("ignoring NOTIFY_SOCKET %r: neither an absolute path nor @abstract", raw)
    return None


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to send ``WATCHDOG=1``: half of systemd's ``WATCHDOG_USEC``, in seconds.

    ``None`` when no watchdog is asked for: ``WATCHDOG_USEC`` is unset or not a
    positive integer, or ``WATCHDOG_PID`` names another process (the
    variables were inherited from a parent that systemd watches).
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class SystemdNotifier:
    """Sends notifications to ``NOTIFY_SOCKET``; a no-op without one.

    Args:
        environ: where to read ``NOTIFY_SOCKET`` (default: the process's
            environment).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET"))
        self.sent = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify."""
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; returns whether it was sent."""
        if self.address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.sendto(payload, self.address)
            except OSError as exc:
                self.failed += 1
                # Once loudly; a watchdog ping every few seconds must not flood the log.
                level = logging.WARNING if self.failed == 1 else logging.DEBUG
                log.log(
                    level, "sd_notify to %r failed (%d so far): %s", self.address, self.failed, exc
                )
                return False
            self.sent += 1
            return True

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
