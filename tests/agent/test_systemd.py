"""systemd notifications from a real agent process to a real unix datagram socket.

The test plays systemd's part: it binds the ``NOTIFY_SOCKET`` (a path, or an
abstract ``@name``) and starts the agent with ``WATCHDOG_USEC``, as systemd
does for ``Type=notify`` with ``WatchdogSec=``. The agent connects to a real
broker. A stalled agent (its lock taken and never released, as in a
deadlock) must stop pinging the watchdog, so that systemd would restart it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.daemon import MIN_STALL_S, READY_WITHOUT_BROKER_S
from edgefleet.agent.systemd import SystemdNotifier, watchdog_interval_s
from edgefleet.shared.link import BrokerSettings

AGENT_PROCESS = Path(__file__).parent / "agent_process.py"


class Systemd:
    """The receiving end of NOTIFY_SOCKET: every datagram, with when it came."""

    def __init__(self, abstract: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sd-"))  # short: AF_UNIX paths max 107 bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"edgefleet-test-{secrets.token_hex(6)}"
            self.sock.bind(b"\0" + name.encode())
            self.env_value = "@" + name
        else:
            path = self.dir / "notify"
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def poll(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().split("\n"):
                self.received.append((time.monotonic(), line))

    def wait_for(self, line_start: str, timeout_s: float) -> float:
        """When a line starting with ``line_start`` arrived (waiting up to ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for at, line in self.received:
                if line.startswith(line_start):
                    return at
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {line_start!r} within {timeout_s}s: {self.lines()}")
            self.poll(0.2)

    def lines(self, start: str = "") -> list[str]:
        return [line for _, line in self.received if line.startswith(start)]

    def count(self, line: str, after: float = 0.0, before: float = float("inf")) -> int:
        return sum(1 for at, got in self.received if got == line and after <= at < before)


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest) -> Iterator[Systemd]:
    s = Systemd(abstract=request.param == "abstract")
    yield s
    s.close()


def start_agent(
    tmp: Path, broker: BrokerSettings, systemd: Systemd, watchdog_usec: int, **spec: object
) -> subprocess.Popen[bytes]:
    root = tmp / "root.json"
    root.write_text("{}")
    spec_file = tmp / "agent.json"
    spec_file.write_text(
        json.dumps(
            {
                "device_id": f"sd-{secrets.token_hex(3)}",
                "state_dir": str(tmp / "state"),
                "trust_root": str(root),
                "broker": dataclasses.asdict(broker),
                **spec,
            }
        )
    )
    env = {**os.environ, "NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": str(watchdog_usec)}
    env.pop("WATCHDOG_PID", None)
    log = (tmp / "agent.log").open("wb")
    return subprocess.Popen(
        [sys.executable, str(AGENT_PROCESS), str(spec_file)], env=env, stdout=log, stderr=log
    )


def test_ready_watchdog_and_stopping(
    tmp_path: Path, embedded_broker: BrokerSettings, systemd: Systemd
) -> None:
    agent = start_agent(tmp_path, embedded_broker, systemd, watchdog_usec=1_000_000)
    try:
        ready_at = systemd.wait_for("READY=1", 60)
        [status] = [s for s in systemd.lines("STATUS=serving") if "connected" in s]
        assert status.endswith("; connected"), status
        systemd.poll(3.0)
        # WATCHDOG_USEC=1s: a ping every 0.5 s, so about 6 in 3 s.
        assert systemd.count("WATCHDOG=1", after=ready_at) >= 4, systemd.lines()
        assert systemd.lines("STATUS=unhealthy") == []
        agent.send_signal(signal.SIGTERM)
        systemd.wait_for("STOPPING=1", 30)
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)


def test_a_stalled_agent_stops_pinging_the_watchdog(
    tmp_path: Path, embedded_broker: BrokerSettings, systemd: Systemd
) -> None:
    agent = start_agent(
        tmp_path, embedded_broker, systemd, watchdog_usec=1_000_000, stall_after_s=4.0
    )
    try:
        ready_at = systemd.wait_for("READY=1", 60)
        unhealthy_at = systemd.wait_for("STATUS=unhealthy", 60)
        assert systemd.count("WATCHDOG=1", after=ready_at, before=unhealthy_at) >= 2
        [why] = systemd.lines("STATUS=unhealthy")
        assert "loop has not run" in why, why
        systemd.poll(4.0)  # eight ping intervals: systemd (1 s timeout) would have restarted it
        assert systemd.count("WATCHDOG=1", after=unhealthy_at) == 0, systemd.lines()
        assert agent.poll() is None  # hung, not dead: only the watchdog can tell
    finally:
        agent.kill()
        agent.wait(10)


def test_notifier_is_a_no_op_without_a_socket() -> None:
    assert not SystemdNotifier({}).notify("READY=1")
    assert not SystemdNotifier({"NOTIFY_SOCKET": "relative/path"}).enabled
    assert not SystemdNotifier({"NOTIFY_SOCKET": "@"}).enabled


def test_a_failed_send_is_counted_not_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert not notifier.notify("WATCHDOG=1")
    assert not notifier.notify("WATCHDOG=1")
    assert (notifier.sent, notifier.failed) == (0, 2)
    notifier.close()


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None


def test_the_unit_asks_for_notifications_the_agent_sends() -> None:
    unit = (Path(__file__).parents[2] / "deploy" / "edgefleet-agent.service").read_text()
    service = unit.split("[Service]", 1)[1].split("[Install]", 1)[0]
    settings = dict(
        line.split("=", 1)
        for line in service.splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    watchdog_s = float(settings["WatchdogSec"])
    # The agent stops pinging after a stall of max(MIN_STALL_S, WatchdogSec);
    # a watchdog shorter than that stall allowance would kill healthy agents.
    assert watchdog_s >= MIN_STALL_S
    # READY=1 may wait READY_WITHOUT_BROKER_S for the broker: start must not time out first.
    assert float(settings["TimeoutStartSec"]) > READY_WITHOUT_BROKER_S
