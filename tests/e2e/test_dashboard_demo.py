"""``edgefleet demo --dashboard`` as a newcomer runs it: a process, its printout, Ctrl-C.

The command must print a dashboard URL that serves the page and an
operator token the API accepts, keep the fleet running (agents online,
inference traffic arriving), and shut everything down cleanly on SIGINT.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

EDGEFLEET = Path(sys.executable).parent / "edgefleet"


def _lines(stream: IO[str], into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def _get(url: str, token: str | None = None) -> Any:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read().decode()
        return json.loads(body) if "json" in response.headers["content-type"] else body


def test_demo_dashboard_prints_a_working_url_and_token_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    process = subprocess.Popen(
        [str(EDGEFLEET), "demo", "--agents", "2", "--requests", "3", "--dashboard"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    out: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, out), daemon=True).start()
    err: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(process.stderr, err), daemon=True).start()
    try:
        printed = ""
        deadline = time.monotonic() + 240
        while "Ctrl-C" not in printed:
            assert process.poll() is None, f"demo exited early: {list(err.queue)}"
            assert time.monotonic() < deadline, f"no dashboard printed: {printed!r}"
            try:
                printed += out.get(timeout=1)
            except queue.Empty:
                continue
        url = re.search(r"Dashboard: (http://127\.0\.0\.1:\d+/)", printed)
        token = re.search(r"^  (eft_\S+)$", printed, re.MULTILINE)
        assert url and token, printed
        assert 'id="signin"' in _get(url.group(1))
        me = _get(url.group(1) + "api/v1/dashboard/me", token.group(1))
        assert me["role"] == "operator"

        def inferences() -> int:
            fleet = _get(url.group(1) + "api/v1/fleet", token.group(1))
            return int(fleet["inferences"])

        # The fleet keeps running with traffic: the count grows past the demo's own requests.
        first = inferences()
        deadline = time.monotonic() + 60
        while inferences() <= first:
            assert time.monotonic() < deadline, "no inference traffic after the demo"
            time.sleep(0.5)
        fleet = _get(url.group(1) + "api/v1/fleet", token.group(1))
        assert fleet["devices"] == 2 and fleet["online"] == 2

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0
        time.sleep(0.5)  # let the reader threads drain
        assert "stopped" in "".join(err.queue)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
