"""One agent fetching a bundle through Mosquitto, against raw paho moving the same bytes.

Everything runs on a Mosquitto this script starts on a free loopback port. A
server process holds the bytes (``--mb`` MB of random data) and runs, on
command:

- the controller's real :class:`TransferServer` behind an :class:`MqttLink`,
  answering the agent's ``FileRequest`` messages with framed blocks
  (``--block-size`` bytes, QoS 1), pumped again whenever paho frees budget,
  as the controller service does;
- a raw paho publisher that publishes the same bytes in the same block size,
  QoS 1, to a topic one raw paho subscriber (in this process) reads: the
  baseline, "raw unicast".

This process is the agent side: :class:`MqttFetcher` over an
:class:`MqttLink` with the agent's default :class:`TransferSettings`
(window of 16 blocks, or ``--window``), writing the partial download to a temp directory as
the agent does (fdatasync included), then reading it back and checking its
SHA-256. Its wall time and this process's CPU seconds are measured per run.

With ``--against REV`` (default ``main``) the fetcher of that git revision
(``git show REV:agent/fetcher.py``, loaded as a temp module) is measured too,
in the same run, interleaved with the others: before/after on one machine
state.

    python bench/fetch_throughput.py                  # 50 MB, 3 rounds, writes BENCHMARKS.md
    python bench/fetch_throughput.py --mb 10 --rounds 1 --no-write
    python bench/fetch_throughput.py --against ''     # this tree only

Target (issue 11): one agent at >= 0.5x raw unicast throughput.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import multiprocessing as mp
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from _common import ROOT, machine_line, mosquitto, mosquitto_release, table, write_section

SECTION = "## Agent fetch throughput"
MB = 1_000_000
RAW_TOPIC = "bench/raw"
DEVICE = "fetch-bench"
PATH = "targets/bench.bin"
BLOCK_SIZE = [64 * 1024]  # the agent's block size, set from --block-size

_ctx = mp.get_context("spawn")


# --------------------------------------------------------------------------- server process
def _server(port: int, size: int, block_size: int, commands: Any, replies: Any) -> None:
    """Controller transfer server and raw publisher, in their own process."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefleet.controller.transfer import TransferServer
    from edgefleet.protocols.messages import FileRequest
    from edgefleet.protocols.topics import Channel, DeviceTopic
    from edgefleet.shared.link import BrokerSettings, MqttLink

    data = os.urandom(size)
    settings = BrokerSettings(host="127.0.0.1", port=port, connect_timeout_s=10)

    class Source:
        def read_file(self, rel_path: str) -> bytes | None:
            return data if rel_path == PATH else None

    link = MqttLink(settings, "bench-controller")
    wake = threading.Event()
    pending: list[FileRequest] = []
    lock = threading.Lock()
    server = TransferServer(
        Source(),
        lambda t, p, done: link.publish(t, p, qos=1, on_sent=done),
        on_capacity=wake.set,
    )

    def on_request(_t: str, payload: bytes, _r: bool) -> None:
        with lock:
            pending.append(FileRequest.decode(payload))
        wake.set()

    def worker() -> None:  # the controller's transfer worker: submit, pump, sleep
        while True:
            wake.wait()
            wake.clear()
            with lock:
                batch, pending[:] = list(pending), []
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
        if cmd == "stop":
            break
        if cmd == "raw":
            view = memoryview(data)
            infos = [
                raw.publish(RAW_TOPIC, bytes(view[i : i + block_size]), qos=1)
                for i in range(0, size, block_size)
            ]
            for info in infos:
                info.wait_for_publish(60)
            replies.put(("raw-sent",))
        elif cmd == "stats":
            replies.put(("stats", server.blocks_sent))
    raw.loop_stop()
    raw.disconnect()
    link.stop()


# --------------------------------------------------------------------------- agent side
def _fetcher_module(rev: str) -> ModuleType:
    """``agent/fetcher.py`` as it is at git revision ``rev``, as a temp module."""
    source = subprocess.run(
        ["git", "show", f"{rev}:agent/fetcher.py"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    tmp = Path(tempfile.mkdtemp(prefix="fetcher-")) / "fetcher_at_rev.py"
    tmp.write_bytes(source)
    spec = importlib.util.spec_from_file_location(f"edgefleet_fetcher_{rev}", tmp)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _fetch_once(
    module: ModuleType, port: int, workdir: Path, size: int, digest: str, window: int
) -> tuple[float, float]:
    from edgefleet.shared.link import BrokerSettings, MqttLink

    settings = BrokerSettings(host="127.0.0.1", port=port, connect_timeout_s=10)
    link = MqttLink(settings, f"bench-agent-{os.getpid()}")
    store_dir = Path(tempfile.mkdtemp(prefix="partial-", dir=workdir))
    progress: list[int] = []
    fetcher = module.MqttFetcher(
        link,
        DEVICE,
        module.PartialStore(store_dir),
        module.TransferSettings(block_size_bytes=BLOCK_SIZE[0], window_blocks=window),
        on_progress=lambda _p, done, _t: progress.append(done),
    )
    fetcher.expect_length(PATH, size)  # as the installer does, with TUF's length
    link.subscribe(fetcher.frame_topic, fetcher.on_frame)
    link.start()
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        h = hashlib.sha256()
        for chunk in fetcher._fetch(module.URL_PREFIX + PATH):
            h.update(chunk)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        link.stop()
    if h.hexdigest() != digest:
        raise SystemExit("fetched bytes do not match the bundle")
    return wall, cpu


def _raw_once(port: int, size: int, commands: Any, replies: Any) -> tuple[float, float]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got = [0]
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got[0] += len(msg.payload)
        if got[0] >= size:
            done.set()

    sub = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-raw-sub-{os.getpid()}"
    )
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.subscribe(RAW_TOPIC, qos=1)
    sub.loop_start()
    try:
        if not subscribed.wait(10):
            raise SystemExit("raw subscriber did not subscribe")
        cpu0, t0 = time.process_time(), time.perf_counter()
        commands.put("raw")
        if not done.wait(300):
            raise SystemExit(f"raw subscriber got {got[0]} of {size} bytes")
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        replies.get(timeout=60)  # raw-sent
    finally:
        sub.loop_stop()
        sub.disconnect()
    return wall, cpu


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="bundle size in MB (10^6 bytes)")
    parser.add_argument("--block-size", type=int, default=64 * 1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--window", type=int, action="append", help="agent window in blocks (repeatable; 16)"
    )
    parser.add_argument("--against", default="main", help="git revision to compare; '' for none")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    BLOCK_SIZE[0] = args.block_size

    sys.path.insert(0, str(ROOT))
    import edgefleet.agent.fetcher as current

    windows = args.window or [16]
    modules: list[tuple[str, ModuleType]] = [("this tree", current)]
    if args.against:
        modules.append((f"`{args.against}`", _fetcher_module(args.against)))
    variants = [(f"{name}, window {w}", module, w) for w in windows for name, module in modules]
    size = args.mb * MB
    results: dict[str, list[tuple[float, float]]] = {"raw": []}
    for name, _, _ in variants:
        results[name] = []

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = mosquitto(work)
        with broker:
            commands, replies = _ctx.Queue(), _ctx.Queue()
            server = _ctx.Process(
                target=_server, args=(broker.port, size, args.block_size, commands, replies)
            )
            server.start()
            try:
                tag, digest = replies.get(timeout=120)
                assert tag == "ready"
                for r in range(args.rounds):
                    results["raw"].append(_raw_once(broker.port, size, commands, replies))
                    for name, module, window in variants:
                        results[name].append(
                            _fetch_once(module, broker.port, work, size, digest, window)
                        )
                    print(
                        f"round {r + 1}: "
                        + ", ".join(
                            f"{k} {v[-1][0]:.2f}s wall {v[-1][1]:.2f}s cpu"
                            for k, v in results.items()
                        ),
                        flush=True,
                    )
            finally:
                commands.put("stop")
                server.join(30)
                if server.is_alive():
                    server.kill()

    raw_wall = statistics.median(w for w, _ in results["raw"])
    rows = []
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        label = "raw paho, 1 publisher -> 1 subscriber" if name == "raw" else f"MqttFetcher, {name}"
        rows.append(
            [
                label,
                f"{wall:.2f}",
                f"{size / MB / wall:.0f}",
                f"{cpu:.2f}",
                f"{raw_wall / wall:.2f}x",
            ]
        )
    command = "python bench/fetch_throughput.py " + shlex.join(sys.argv[1:])
    body = [
        f"`{command.strip()}` - {machine_line()}; {mosquitto_release()}.",
        "",
        f"One agent fetches a {args.mb} MB bundle ({args.block_size // 1024} KiB blocks, QoS 1) "
        f"with windows of {'/'.join(map(str, windows))} blocks from the real transfer server "
        "through a Mosquitto the script starts; "
        "raw paho moves the same bytes in the same block size through the same broker in the same "
        f"run. Median of {args.rounds} interleaved rounds. CPU is the agent process's (for raw: "
        "the subscriber's).",
        "",
        *table(
            ["path", "wall s", "MB/s", "agent CPU s", "throughput vs raw"],
            rows,
            right={1, 2, 3, 4},
        ),
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
