"""n agents fetching one bundle through fan-out, against raw paho fan-out of the same bytes.

Everything runs on a Mosquitto this script starts on a free loopback port.
A server process holds the bundle (``--mb`` MB of random data under a
content-addressed target path) and runs, on command:

- the controller's real :class:`TransferServer` behind an :class:`MqttLink`
  (fan-out on, the stream waiting for the wave's n devices, as
  ``fanout_gather_devices`` does), pumped whenever paho frees budget, as the
  controller service does;
- a raw paho publisher that publishes the same bytes once, in the same block
  size, QoS 1, to one topic n raw paho subscribers read: the baseline,
  "raw fan-out".

The agents are real :class:`MqttFetcher`s, one :class:`MqttLink` each, in
``--procs`` worker processes (threads inside), writing their partial files
to a temp directory and checking the SHA-256 of what they fetched. All start
at one signal; "time to all complete" runs from it to the last agent's
verified file. Egress is the transfer server's payload bytes sent / bundle.

    python bench/fanout.py                         # 1, 10, 50 agents x 10 MB, writes BENCHMARKS.md
    python bench/fanout.py --agents 10 --mb 10 --no-write

Targets (issue 11): egress <= 1.2x bundle for n >= 10; time to all complete
<= 1.5x raw fan-out of the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import ROOT, machine_line, mosquitto, mosquitto_release, table, write_section

SECTION = "## Fan-out transfer"
MB = 1_000_000
RAW_TOPIC = "bench/fanout-raw"
BLOCK = 64 * 1024
PATH = "targets/bench/" + "ab" * 32 + ".bench.bin"

_ctx = mp.get_context("spawn")


# --------------------------------------------------------------------------- server process
def _server(port: int, size: int, commands: Any, replies: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefleet.controller.transfer import TransferLimits, TransferServer
    from edgefleet.protocols.messages import FileRequest
    from edgefleet.protocols.topics import Channel, DeviceTopic
    from edgefleet.shared.link import BrokerSettings, MqttLink

    data = os.urandom(size)

    class Source:
        def read_file(self, rel_path: str) -> bytes | None:
            return data if rel_path == PATH else None

    link = MqttLink(BrokerSettings(host="127.0.0.1", port=port), "bench-controller")
    wake = threading.Event()
    pending: list[FileRequest] = []
    lock = threading.Lock()
    current: list[TransferServer] = []

    def new_server(devices: int, fanout: bool) -> TransferServer:
        limits = TransferLimits(fanout=fanout, fanout_gather_devices=devices, fanout_gather_s=60.0)
        return TransferServer(
            Source(),
            lambda t, p, done: link.publish(t, p, qos=1, on_sent=done),
            limits,
            on_capacity=wake.set,
        )

    def on_request(_t: str, payload: bytes, _r: bool) -> None:
        with lock:
            pending.append(FileRequest.decode(payload))
        wake.set()

    def worker() -> None:  # the controller's transfer worker: submit, pump, sleep
        while True:
            wake.wait(0.2)
            wake.clear()
            with lock:
                batch, pending[:] = list(pending), []
            server = current[-1] if current else None
            if server is None:
                continue
            for request in batch:
                server.submit(request)
            server.pump()

    link.subscribe(DeviceTopic.wildcard(Channel.FILE_REQUEST), on_request)
    link.start()
    threading.Thread(target=worker, daemon=True).start()
    raw = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-raw-pub")
    raw.max_inflight_messages_set(64)  # as MqttLink
    raw.connect("127.0.0.1", port)
    raw.loop_start()
    replies.put(("ready", hashlib.sha256(data).hexdigest()))
    while True:
        cmd = commands.get()
        if cmd[0] == "stop":
            break
        if cmd[0] == "serve":
            current.append(new_server(cmd[1], cmd[2]))
            replies.put(("serving",))
        elif cmd[0] == "raw":
            view = memoryview(data)
            infos = [
                raw.publish(RAW_TOPIC, bytes(view[i : i + BLOCK]), qos=1)
                for i in range(0, size, BLOCK)
            ]
            for info in infos:
                info.wait_for_publish(120)
            replies.put(("raw-sent",))
        elif cmd[0] == "stats":
            s = current[-1]
            replies.put(("stats", s.bytes_sent, s.stream_bytes_sent, s.peak_inflight_bytes))
    raw.loop_stop()
    raw.disconnect()
    link.stop()


# --------------------------------------------------------------------------- agent processes
def _agents(
    port: int, ids: list[str], size: int, digest: str, workdir: str, go: Any, out: Any
) -> None:
    """Fetchers (one link each) in threads; wait for ``go``, fetch, verify, report end times."""
    from edgefleet.agent.fetcher import URL_PREFIX, MqttFetcher, PartialStore, TransferSettings
    from edgefleet.shared.link import BrokerSettings, MqttLink

    settings = BrokerSettings(host="127.0.0.1", port=port, connect_timeout_s=30)
    fetchers = []
    for device in ids:
        link = MqttLink(settings, f"bench-{device}")
        fetcher = MqttFetcher(
            link,
            device,
            PartialStore(Path(workdir) / device),
            TransferSettings(request_timeout_s=30.0),
        )
        fetcher.expect_length(PATH, size)
        link.subscribe(fetcher.frame_topic, fetcher.on_frame)
        link.start()
        fetchers.append((link, fetcher))
    ends: list[float] = []
    failures: list[str] = []

    def run(fetcher: Any) -> None:
        try:
            h = hashlib.sha256()
            for chunk in fetcher._fetch(URL_PREFIX + PATH):
                h.update(chunk)
            if h.hexdigest() != digest:
                failures.append("digest mismatch")
            ends.append(time.time())
        except Exception as exc:  # noqa: BLE001 - reported, the bench fails below
            failures.append(repr(exc))

    out.put(("ready", len(ids)))
    go.wait()
    cpu0 = time.process_time()
    threads = [threading.Thread(target=run, args=(f,)) for _, f in fetchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = time.process_time() - cpu0
    for link, _ in fetchers:
        link.stop()
    out.put(("done", ends, failures, cpu))


def _raw_subscribers(port: int, count: int, size: int, go: Any, out: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ends: list[float] = []
    subscribed = threading.Semaphore(0)
    clients = []
    for i in range(count):
        got = [0]

        def on_message(_c: Any, _u: Any, msg: Any, got: list[int] = got) -> None:
            got[0] += len(msg.payload)
            if got[0] >= size:
                ends.append(time.time())

        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"bench-raw-sub-{os.getpid()}-{i}",
        )
        c.on_message = on_message
        c.on_subscribe = lambda *_a: subscribed.release()
        c.connect("127.0.0.1", port)
        c.subscribe(RAW_TOPIC, qos=1)
        c.loop_start()
        clients.append(c)
    for _ in range(count):
        subscribed.acquire(timeout=30)
    out.put(("ready", count))
    go.wait()
    cpu0 = time.process_time()
    deadline = time.time() + 300
    while len(ends) < count and time.time() < deadline:
        time.sleep(0.01)
    cpu = time.process_time() - cpu0
    for c in clients:
        c.loop_stop()
        c.disconnect()
    incomplete = [] if len(ends) == count else ["raw subscriber incomplete"]
    out.put(("done", list(ends), incomplete, cpu))


def _split(n: int, procs: int) -> list[int]:
    k = min(n, procs)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _round(
    kind: str,
    port: int,
    n: int,
    procs: int,
    size: int,
    digest: str,
    work: Path,
    commands: Any,
    replies: Any,
    fanout: bool = True,
) -> tuple[float, float]:
    go, out = _ctx.Event(), _ctx.Queue()
    workers = []
    offset = 0
    for i, count in enumerate(_split(n, procs)):
        if kind == "raw":
            p = _ctx.Process(target=_raw_subscribers, args=(port, count, size, go, out))
        else:
            ids = [f"fan-{kind}-{n}-{j}" for j in range(offset, offset + count)]
            d = tempfile.mkdtemp(prefix=f"agents{i}-", dir=work)
            p = _ctx.Process(target=_agents, args=(port, ids, size, digest, d, go, out))
        offset += count
        p.start()
        workers.append(p)
    ready = sum(out.get(timeout=120)[1] for _ in workers)
    assert ready == n
    if kind != "raw":
        commands.put(("serve", n, fanout))
        replies.get(timeout=30)
    t0 = time.time()
    go.set()
    if kind == "raw":
        commands.put(("raw",))
    ends: list[float] = []
    failures: list[str] = []
    cpu = 0.0
    for _ in workers:
        _tag, e, f, c = out.get(timeout=900)
        ends += e
        failures += f
        cpu += c
    if kind == "raw":
        replies.get(timeout=120)
    for p in workers:
        p.join(30)
    if failures:
        raise SystemExit(f"{kind} with {n} agents failed: {failures[:3]}")
    return max(ends) - t0, cpu


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, action="append", help="bundle MB (repeatable; 10)")
    parser.add_argument("--agents", type=int, action="append", help="agents (repeatable; 1 10 50)")
    parser.add_argument("--procs", type=int, default=4, help="agent worker processes")
    parser.add_argument("--unicast", action="store_true", help="also measure fan-out off")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    sizes = args.mb or [10]
    counts = args.agents or [1, 10, 50]
    sys.path.insert(0, str(ROOT))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = mosquitto(work)
        with broker:
            for mb in sizes:
                size = mb * MB
                commands, replies = _ctx.Queue(), _ctx.Queue()
                server = _ctx.Process(target=_server, args=(broker.port, size, commands, replies))
                server.start()
                try:
                    _tag, digest = replies.get(timeout=120)
                    for n in counts:
                        runs: dict[str, list[tuple[float, float, float]]] = {}
                        for _ in range(args.rounds):  # interleaved: one machine state per round
                            for kind in ("raw", "fan", *(["uni"] if args.unicast else [])):
                                wall, cpu = _round(
                                    kind,
                                    broker.port,
                                    n,
                                    args.procs,
                                    size,
                                    digest,
                                    work,
                                    commands,
                                    replies,
                                    fanout=kind != "uni",
                                )
                                sent = peak = 0.0
                                if kind != "raw":
                                    commands.put(("stats",))
                                    _t, sent, _streamed, peak = replies.get(timeout=30)
                                runs.setdefault(kind, []).append((wall, cpu, sent / size, peak))
                        med = {
                            k: [statistics.median(r[i] for r in v) for i in range(4)]
                            for k, v in runs.items()
                        }
                        raw, fan = med["raw"], med["fan"]
                        row = [
                            f"{n} x {mb} MB",
                            f"{raw[0]:.2f}",
                            f"{fan[0]:.2f}",
                            f"{fan[0] / raw[0]:.2f}x",
                            f"{fan[2]:.2f}x",
                            f"{fan[3] / MB:.1f}",
                            f"{raw[1]:.2f}",
                            f"{fan[1]:.2f}",
                        ]
                        if args.unicast:
                            row += [f"{med['uni'][0]:.2f}", f"{med['uni'][2]:.2f}x"]
                        rows.append(row)
                        print(" | ".join(row), flush=True)
                finally:
                    commands.put(("stop",))
                    server.join(30)
                    if server.is_alive():
                        server.kill()
    headers = [
        "agents x bundle",
        "raw fan-out s",
        "fan-out s",
        "time vs raw",
        "egress / bundle",
        "peak in flight MB",
        "raw subscribers CPU s",
        "agents CPU s",
    ]
    if args.unicast:
        headers += ["unicast s", "unicast egress"]
    command = "python bench/fanout.py " + shlex.join(sys.argv[1:])
    body = [
        f"`{command.strip()}` - {machine_line()}; {mosquitto_release()}.",
        "",
        "n real `MqttFetcher`s (one MQTT connection each, in "
        f"{args.procs} worker processes) fetch one bundle (64 KiB blocks, QoS 1) from the real "
        "transfer server with fan-out on, through a Mosquitto the script starts; all start at "
        "one signal, time runs to the last verified file (SHA-256). Raw fan-out: one paho "
        "publisher publishes the same bytes once to a topic n raw paho subscribers read, in "
        "the same run. Egress: payload bytes the transfer server sent / bundle. Unicast: the "
        "same agents with the server's fan-out off (every device its own copy, as before). "
        f"Median of {args.rounds} interleaved rounds; CPU is the agent (or raw subscriber) "
        "processes', summed.",
        "",
        *table(headers, rows, right=set(range(1, len(headers)))),
        "",
        "The machine is shared with several other workers running builds and tests, "
        "so absolute times vary from run to run; the ratios come from one run.",
    ]
    print("\n".join(body))
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
