"""One wrapper around a ``mosquitto`` process that a test or benchmark owns.

It is started on a free loopback port from a config file the caller wrote
(the system Mosquitto on 1883, if any, is left alone), and stopped with
SIGTERM, then SIGKILL. :meth:`MosquittoProcess.anonymous` writes the plain
config the MQTT tests and benchmarks use; the TLS tests render the
production config and pass its path.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from edgefleet.controller.broker import free_port
from edgefleet.shared.link import BrokerSettings

__all__ = ["MosquittoProcess", "find_mosquitto", "mosquitto_version", "wait_for_port"]

_FALLBACK_BINARY = Path("/usr/sbin/mosquitto")  # Debian's path, often not on PATH


def find_mosquitto() -> str | None:
    """The ``mosquitto`` binary, or ``None`` when it is not installed."""
    binary = shutil.which("mosquitto")
    if binary is not None:
        return binary
    return str(_FALLBACK_BINARY) if _FALLBACK_BINARY.exists() else None


def mosquitto_version(binary: str) -> str:
    """The first line of ``mosquitto -h`` ("mosquitto version 2.0.11"), for reports."""
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "mosquitto"
    return out.splitlines()[0].strip() if out else "mosquitto"


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> bool:
    """Poll until something accepts TCP connections on ``host:port``; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class MosquittoProcess:
    """A Mosquitto we start, from a config file we wrote, on a port we chose.

    Args:
        binary: the ``mosquitto`` executable (see :func:`find_mosquitto`).
        config: its config file; it must listen on 127.0.0.1:``port``.
        port: the listener port, polled to know the broker is up.
        log_file: where the config sends the broker's log, for error messages.
        open_files: raise the broker's open-file limit to this many (a
            benchmark connects thousands of clients); ``None`` keeps ours.
    """

    def __init__(
        self,
        binary: str,
        config: Path,
        port: int,
        log_file: Path,
        *,
        open_files: int | None = None,
    ) -> None:
        self.binary = binary
        self.config = config
        self.port = port
        self.log_file = log_file
        self.open_files = open_files
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def anonymous(
        cls,
        binary: str,
        workdir: Path,
        extra_config: str = "",
        *,
        open_files: int | None = None,
    ) -> MosquittoProcess:
        """A plain broker on a free port: anonymous clients, no persistence, log in ``workdir``."""
        port = free_port()
        log_file = workdir / "mosquitto.log"
        config = workdir / "mosquitto.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"set_tcp_nodelay true\nlog_dest file {log_file}\n{extra_config}"
        )
        return cls(binary, config, port, log_file, open_files=open_files)

    def __enter__(self) -> MosquittoProcess:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def settings(self) -> BrokerSettings:
        """How a plain (non-TLS) client reaches this broker."""
        return BrokerSettings(host="127.0.0.1", port=self.port, connect_timeout_s=10)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> None:
        """Start the broker and wait until it accepts connections.

        Raises:
            RuntimeError: it did not listen within 10 s (it is stopped again).
        """
        open_files = self.open_files

        def _limits() -> None:
            if open_files is None:
                return
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            target = open_files if hard == resource.RLIM_INFINITY else min(open_files, hard)
            if soft < target:
                with contextlib.suppress(ValueError, OSError):  # best effort, as ulimit -n
                    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))

        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_limits,  # noqa: PLW1509 - only setrlimit, before exec
        )
        if not wait_for_port("127.0.0.1", self.port):
            self.stop()
            raise RuntimeError(f"mosquitto did not start; see {self.log_file}")

    def hup(self) -> None:
        """SIGHUP: mosquitto re-reads its configuration, including ``crlfile``."""
        assert self.proc is not None, "not started"
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # the reload is logged only at log_type information

    def log(self) -> str:
        """The broker's log so far ("" when there is none)."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate the broker (SIGKILL after 5 s); harmless when not running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
