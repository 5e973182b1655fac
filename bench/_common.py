"""Shared pieces of the MQTT benchmarks: our own Mosquitto, PostgreSQL schemas, reporting.

Not a benchmark itself; the scripts beside it import it (``bench/`` is on
``sys.path`` when a script there runs). The Mosquitto and PostgreSQL helpers
are the tests' own (``tests/support``), so a benchmark runs the broker exactly
as the tests do. :func:`run_controller` is the controller process the MQTT
benchmarks share: its CPU and RSS are then its own.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgefleet.controller.config import ServiceSettings
    from edgefleet.controller.service import ControllerService
    from edgefleet.shared.link import BrokerSettings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks run from a checkout: reach tests.support
    sys.path.append(str(ROOT))

from tests.support import (  # noqa: E402 - needs ROOT on sys.path
    MosquittoProcess,
    find_mosquitto,
    mosquitto_version,
)
from tests.support import postgres_schema as _postgres_schema  # noqa: E402

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


def run_controller(
    db_url: str,
    repo: str,
    broker: BrokerSettings,
    commands: Any,
    replies: Any,
    handle: Callable[[ControllerService, tuple[Any, ...]], tuple[Any, ...] | None],
    settings: ServiceSettings | None = None,
) -> None:
    """Run a ``ControllerService`` in this (benchmark child) process until ``("stop",)``.

    Replies ``("started",)`` once connected; then each command but ``stop``
    goes to ``handle``, whose answer (unless None) is put on ``replies``. On
    the way out it replies ``("stopped", cpu_s, maxrss_bytes, rejected)``:
    this process's user+system CPU, its peak RSS and the controller's
    rejection counters.

    Args:
        db_url: the registry (already migrated by the parent).
        repo: the TUF repository directory (the parent no longer writes it).
        broker: where and how to connect.
        commands, replies: multiprocessing queues.
        handle: answers one command, in this process.
        settings: default ``ServiceSettings`` with a client id of this pid.
    """
    import logging

    from edgefleet.controller.config import ServiceSettings
    from edgefleet.controller.registry import Registry
    from edgefleet.controller.service import ControllerService
    from edgefleet.controller.trust import TrustRepository

    raise_nofile()
    logging.basicConfig(level=logging.ERROR)
    registry = Registry(db_url, migrate=False)
    service = ControllerService(
        registry,
        TrustRepository.open(Path(repo)),
        broker,
        settings or ServiceSettings(client_id=f"bench-controller-{os.getpid()}"),
    )
    service.start()
    replies.put(("started",))
    try:
        while (cmd := commands.get())[0] != "stop":
            answer = handle(service, cmd)
            if answer is not None:
                replies.put(answer)
    finally:
        service.stop()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        rejected = dict(service.rejected())
        registry.close()
        replies.put(("stopped", usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, rejected))


class RssWatch:
    """A process's peak RSS, sampled every ``period_s`` in a thread (psutil).

    ``timeline`` keeps one ``(seconds since start, rss)`` sample every
    ``timeline_s``: whether memory levels off or keeps growing.
    """

    def __init__(self, pid: int, period_s: float = 0.2, timeline_s: float = 5.0) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self._errors: tuple[type[BaseException], ...] = (psutil.Error,)
        self.period_s = period_s
        self.timeline_s = timeline_s
        self.peak = 0
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def _run(self) -> None:
        t0 = time.monotonic()
        next_mark = t0
        while not self._stop.is_set():
            with contextlib.suppress(*self._errors):
                rss = self.rss()
                self.peak = max(self.peak, rss)
                if time.monotonic() >= next_mark:
                    self.timeline.append((time.monotonic() - t0, rss))
                    next_mark += self.timeline_s
            self._stop.wait(self.period_s)

    def __enter__(self) -> RssWatch:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def mosquitto(workdir: Path) -> MosquittoProcess:
    """Our Mosquitto for a benchmark (not started): no connection limit, errors logged only."""
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    return MosquittoProcess.anonymous(
        binary,
        workdir,
        "max_connections -1\nlog_type error\nlog_type warning\n",
        open_files=65536,
    )


def mosquitto_release() -> str:
    """The Mosquitto version line for the report."""
    binary = find_mosquitto()
    return mosquitto_version(binary) if binary else "mosquitto (not installed)"


def postgres_schema(base: str) -> contextlib.AbstractContextManager[str]:
    """A fresh schema on ``base`` for one run, dropped afterwards; yields its URL."""
    return _postgres_schema(base, prefix="bench")


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
