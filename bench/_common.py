"""Shared pieces of the MQTT benchmarks: our own Mosquitto, PostgreSQL schemas, reporting.

Not a benchmark itself; ``bench/ingest.py`` and ``bench/rollout_fleet.py``
import it (``bench/`` is on ``sys.path`` when a script there runs).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu_model()} ({os.cpu_count()} cores), {mem_gib:.0f} GiB, {platform.machine()}, "
        f"Python {platform.python_version()}"
    )


def raise_nofile(want: int = 65536) -> int:
    """Raise this process's open-file limit as far as allowed; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "mosquitto"
    first = out.splitlines()[0] if out else "mosquitto"
    return first.strip()


class Mosquitto:
    """A Mosquitto we start on a free loopback port (the system one on 1883 is left alone)."""

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.version = mosquitto_version(binary)
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\nmax_connections -1\n"
            f"log_dest file {workdir / 'mosquitto.log'}\nlog_type error\nlog_type warning\n"
            f"{extra_config}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        def _limits() -> None:
            raise_nofile(65536)

        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_limits,  # noqa: PLW1509 - only setrlimit, before exec
        )
        if not _wait_port(self.port):
            self.stop()
            raise RuntimeError(f"mosquitto did not start; see {self.workdir / 'mosquitto.log'}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def postgres_schema(base: str) -> Iterator[str]:
    """A fresh schema on ``base`` for one run, dropped afterwards; yields its URL."""
    import sqlalchemy as sa

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def write_section(path: Path, heading: str, body: list[str]) -> None:
    """Replace (or append) the ``heading`` section of BENCHMARKS.md; other sections stay."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = "\n".join([heading, "", *body]).rstrip() + "\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    """A Markdown table; columns in ``right`` are right-aligned."""
    right = right or set()
    out = ["| " + " | ".join(headers) + " |"]
    out.append("|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|")
    out.extend("| " + " | ".join(r) + " |" for r in rows)
    return out
