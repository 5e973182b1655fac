"""Why one inference took 31.6 s during a model switch: the listen backlog (issue 9, item 10).

Two experiments against the agent's real inference server (``agent/serving.py``)
serving a real ONNX model:

1. ``switch``: 50 concurrent clients, each opening a new connection per request
   (the endpoint speaks HTTP/1.0 and closes after every answer), while the
   model is loaded, smoke-run and swapped every 0.5 s. Reports the latency
   distribution and the kernel's ``ListenOverflows`` counter.
2. ``stall``: the same server whose accept loop stops for ``--stall-s``
   seconds (what a starved serving thread looks like to the kernel) while
   ``--burst`` clients connect. Connections beyond the accept queue have
   their SYNs dropped, and Linux retransmits a SYN after 1, 2, 4, 8 and 16 s:
   a connection then completes 1, 3, 7, 15 or 31 s after it started. The
   script prints how many connects completed in each of those bands, for the
   old backlog (64) and the new one.

Run: ``nice -n 10 python bench/serving_backlog.py switch --backlog 64 --seconds 60``
and ``python bench/serving_backlog.py stall --backlog 64 --stall-s 33``.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from edgefleet.agent import serving  # noqa: E402
from edgefleet.agent.metrics import ServingMetrics  # noqa: E402
from edgefleet.agent.serving import InferenceServer, ModelHolder  # noqa: E402
from edgefleet.protocols.messages import ModelRef  # noqa: E402
from edgefleet.shared.runtime import LoadedModel, OnnxRuntimeBackend  # noqa: E402
from tests.e2e.harness import wide_model  # noqa: E402

BANDS = (0.0, 0.9, 2.9, 6.9, 14.9, 30.9)  # lower edges: 0, 1, 3, 7, 15, 31 s


def listen_overflows() -> int:
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            row = dict(zip(head.split()[1:], values.split()[1:], strict=True))
            return int(row["ListenOverflows"])
    return -1


def serve(backlog: int, model: LoadedModel) -> InferenceServer:
    serving._Server.request_queue_size = backlog  # the knob this script measures
    holder = ModelHolder()
    holder.swap(model, ModelRef("wide", "1", 1, "t"))
    server = InferenceServer(holder, ServingMetrics(), poll_interval=0.2)
    server.start()
    return server


def switch(backlog: int, seconds: float, clients: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    paths = []
    for i, hidden in enumerate((4096, 8192)):
        path = tmp / f"m{i}.onnx"
        path.write_bytes(wide_model(hidden=hidden, seed=i))
        paths.append(path)
    backend = OnnxRuntimeBackend()
    server = serve(backlog, backend.load(paths[0]))
    body = json.dumps({"inputs": {"features": [[0.5] * 16] * 8}}).encode()
    latencies: list[float] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                # Always our own http://127.0.0.1:<port>.
                req = urllib.request.Request(server.url + "/v1/infer", data=body)  # noqa: S310
                with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
                    resp.read()
                latencies.append(time.monotonic() - started)
            except OSError as exc:
                errors.append(type(exc).__name__)

    before = listen_overflows()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    switches, switch_s = 0, []
    end = time.monotonic() + seconds
    sample = {"features": np.full((1, 16), 0.5, np.float32)}
    while time.monotonic() < end:
        started = time.monotonic()
        model = backend.load(paths[switches % 2])  # load
        model.run(sample)  # smoke test
        server.holder.swap(model, ModelRef("wide", str(switches), switches, "t"))
        switch_s.append(time.monotonic() - started)
        switches += 1
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(120)
    server.stop()
    latencies.sort()
    n = len(latencies)
    print(
        f"switch backlog={backlog} clients={clients} seconds={seconds:g} requests={n} "
        f"errors={len(errors)} switches={switches} slowest_switch_s={max(switch_s):.2f}"
    )
    print(
        f"  p50={latencies[n // 2]:.3f}s p99={latencies[int(n * 0.99)]:.3f}s "
        f"max={latencies[-1]:.3f}s over_0.9s={sum(x > 0.9 for x in latencies)} "
        f"ListenOverflows+={listen_overflows() - before}"
    )


def stall(backlog: int, stall_s: float, burst: int) -> None:
    tmp = Path(tempfile.mkdtemp()) / "m.onnx"
    tmp.write_bytes(wide_model(hidden=256))
    server = serve(backlog, OnnxRuntimeBackend().load(tmp))
    port = server.port
    httpd = server._httpd
    assert httpd is not None
    httpd.shutdown()  # the accept loop stops; the socket keeps listening
    before = listen_overflows()
    sel = selectors.DefaultSelector()
    started = time.monotonic()
    socks = []
    for _ in range(burst):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_WRITE)
        socks.append(s)
    done: list[float] = []
    accepted = False
    deadline = started + stall_s + 35.0
    while len(done) < burst and time.monotonic() < deadline:
        if not accepted and time.monotonic() - started >= stall_s:
            accepted = True  # the loop runs again: drain the queue
            threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
            ).start()
        for key, _ in sel.select(timeout=0.05):
            sel.unregister(key.fileobj)
            done.append(time.monotonic() - started)
    counts = [0] * len(BANDS)
    for t in done:
        counts[max(i for i, edge in enumerate(BANDS) if t >= edge)] += 1
    labels = ("<1s", "1-3s", "3-7s", "7-15s", "15-31s", ">=31s")
    print(
        f"stall backlog={backlog} stall_s={stall_s:g} burst={burst} connected={len(done)} "
        f"ListenOverflows+={listen_overflows() - before}"
    )
    bands = ", ".join(f"{lab}: {c}" for lab, c in zip(labels, counts, strict=True))
    print("  connect time: " + bands)
    print(f"  slowest connect: {max(done):.2f}s" if done else "  none connected")
    for s in socks:
        s.close()
    httpd.shutdown()
    httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("switch", "stall"))
    parser.add_argument("--backlog", type=int, default=serving._BACKLOG)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--stall-s", type=float, default=33.0)
    parser.add_argument("--burst", type=int, default=150)
    args = parser.parse_args()
    if args.experiment == "switch":
        switch(args.backlog, args.seconds, args.clients)
    else:
        stall(args.backlog, args.stall_s, args.burst)


if __name__ == "__main__":
    main()
