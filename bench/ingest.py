"""Telemetry ingestion: points stored per second by one controller vs a raw paho subscriber.

Every run uses a Mosquitto this script starts on a free loopback port and one
registry database (a SQLite file, or a fresh PostgreSQL schema dropped
afterwards) with ``--devices`` enrolled devices. Then, at the same time:

- ``--publishers`` processes, one paho client each, publish valid
  ``Telemetry`` messages (what ``Agent.telemetry()`` sends, QoS 0 like the
  agent) for those devices for ``--seconds`` as fast as the broker takes them
  (each client waits until every 200th message left its socket);
- a *raw* paho subscriber process on ``edgefleet/v1/devices/+/telemetry``
  counts what it receives: the baseline;
- a real ``ControllerService`` (default ``ServiceSettings``) in its own
  process receives the same messages and stores them in the registry.

A rate is messages / (time from the first publish to the last message
received or stored), so a controller that falls behind and drains its
backlog after the publishers stop is charged for the drain. The stored count
is checked against ``SELECT count(*)`` at the end.

    python bench/ingest.py                  # SQLite and PostgreSQL, writes BENCHMARKS.md
    python bench/ingest.py --quick          # shorter, print only
    python bench/ingest.py --db sqlite --qos 0 --qos 1 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import psutil
from _common import (
    DEFAULT_PG_URL,
    ROOT,
    machine_line,
    mosquitto,
    mosquitto_release,
    postgres_schema,
    table,
    write_section,
)

SECTION = "## Telemetry ingestion"
TOPIC_FILTER = "edgefleet/v1/devices/+/telemetry"
WAIT_EVERY = 200  # a publisher waits until every n-th message has left its socket

_ctx = mp.get_context("spawn")


def device_ids(n: int) -> list[str]:
    return [f"bench-dev-{i:05d}" for i in range(n)]


AT_FIELD = b'{"at":'


def telemetry_payloads(ids: list[str]) -> list[tuple[str, bytes]]:
    """(topic, payload without its ``at``) of one valid telemetry window per device.

    Each message gets the time it is published as its ``at`` (:func:`stamped`),
    like an agent's successive windows: the presence tracker sees windows
    that do not overlap (1 ms windows), and every row is a distinct window.
    """
    from edgefleet.protocols.messages import LatencySummary, ModelRef, Telemetry
    from edgefleet.protocols.topics import Channel, DeviceTopic

    out = []
    for i, device_id in enumerate(ids):
        point = Telemetry(
            device_id=device_id,
            window_s=0.001,
            requests=100 + i % 50,
            errors=i % 3,
            latency_ms=LatencySummary(p50=1.2, p95=3.4, p99=5.6),
            model=ModelRef("bench-mlp", "1.0.0", 1, "bench-mlp/generic/fp32/bundle.tar"),
            rss_bytes=48_000_000 + i,
            cpu_percent=3.5,
            rejected={},
            at=0.0,
        )
        # Keys are sorted, so "at" comes first; the publisher stamps it.
        payload = point.encode()
        assert payload.startswith(AT_FIELD + b"0.0,")
        out.append((str(DeviceTopic(device_id, Channel.TELEMETRY)), payload[len(AT_FIELD) + 3 :]))
    return out


def stamped(rest: bytes, at: float) -> bytes:
    """A payload of ``telemetry_payloads`` with its window ending at ``at``."""
    return AT_FIELD + repr(at).encode() + rest


# --------------------------------------------------------------------------- processes
def _publisher(
    port: int,
    index: int,
    messages: list[tuple[str, bytes]],
    qos: int,
    seconds: float,
    ready: Any,
    go: Any,
    sent: Synchronized[int],
    pub_cpu: Synchronized[float],
    rate: float = 0.0,
) -> None:
    """Publish for ``seconds``: as fast as the broker takes them, or ``rate`` msg/s."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-pub-{index}-{os.getpid()}",
        protocol=mqtt.MQTTv311,
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    ready.set()
    go.wait()
    n = 0
    start = time.monotonic()
    deadline = start + seconds
    count = len(messages)
    try:
        while time.monotonic() < deadline:
            if rate > 0:
                # Paced: catch up to rate x elapsed, then sleep a little.
                due = int(rate * (time.monotonic() - start))
                if due - n < WAIT_EVERY:
                    time.sleep(0.002)
                    continue
            info = None
            at = time.time()
            for _ in range(WAIT_EVERY):
                topic, rest = messages[n % count]
                info = client.publish(topic, stamped(rest, at), qos=qos)
                n += 1
            assert info is not None
            info.wait_for_publish(10)
    finally:
        with sent.get_lock():
            sent.value += n
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with pub_cpu.get_lock():
            pub_cpu.value += usage.ru_utime + usage.ru_stime
        client.disconnect()
        client.loop_stop()


def _raw_subscriber(
    port: int,
    ready: Any,
    count: Synchronized[int],
    last_t: Synchronized[float],
) -> None:
    """The baseline: a plain paho client that only counts messages."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    n = 0

    def on_message(_c: Any, _u: Any, _msg: Any) -> None:
        nonlocal n
        n += 1

    def on_connect(c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        c.subscribe(TOPIC_FILTER, qos=1)

    def on_subscribe(*_a: Any) -> None:
        ready.set()

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-raw-{os.getpid()}",
        protocol=mqtt.MQTTv311,
    )
    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        seen = 0
        while True:  # killed by the parent
            time.sleep(0.02)
            if n != seen:
                seen = n
                count.value = n
                last_t.value = time.monotonic()
    finally:
        client.loop_stop()


def _controller(
    db_url: str,
    port: int,
    workdir: str,
    settings_kw: dict[str, Any],
    ready: Any,
    stop: Any,
    stored: Synchronized[int],
    last_t: Synchronized[float],
    backlog: Synchronized[int],
    result_q: Any,
    profile: str,
    workers: int = 0,
) -> None:
    """A real controller in its own process, so its CPU and RSS are its own.

    With ``workers``, telemetry is stored by that many ingest worker
    processes (``serve --ingest-workers``), children of this one.
    """
    import logging

    from edgefleet.controller.config import ServiceSettings
    from edgefleet.controller.ingest import IngestWorkers
    from edgefleet.controller.registry import Registry
    from edgefleet.controller.service import ControllerService
    from edgefleet.controller.trust import TrustRepository
    from edgefleet.shared.link import BrokerSettings

    logging.basicConfig(level=logging.ERROR)
    registry = Registry(db_url, migrate=False)
    repository = TrustRepository.init(Path(workdir) / "repository")
    broker = BrokerSettings(host="127.0.0.1", port=port)
    settings = ServiceSettings(client_id=f"bench-controller-{os.getpid()}", **settings_kw)
    pool = None
    if workers:
        pool = IngestWorkers(
            workers,
            database_url=db_url,
            repository_root=repository.root,
            broker=broker,
            settings=settings,
        )
        pool.start()
    service = ControllerService(
        registry, repository, broker, settings, ingest_telemetry=pool is None
    )
    profiler: Any = None
    if profile == "cprofile":
        import cProfile

        profiler = cProfile.Profile()
    service.start()
    spy = None
    if profile == "py-spy":
        import subprocess

        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(os.getpid()), "--format", "raw", "--threads",
             "--rate", "200", "--output", str(Path(workdir) / "controller.pyspy.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)
    if profiler is not None:
        # Profile the ingest worker only: wrap _store (where the time goes).
        original = service._store

        def profiled(batch: Any) -> None:
            profiler.enable()
            try:
                original(batch)
            finally:
                profiler.disable()

        service._store = profiled  # type: ignore[method-assign]
    if pool is not None:
        # Ready once every worker runs its service (connected and subscribed).
        if not pool.wait_ready(180):
            raise RuntimeError("ingest workers did not start")
        time.sleep(1.0)  # SUBACKs
    ready.set()
    peak = 0
    seen = 0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    while not stop.wait(0.02):
        q = service._ingest.qsize()
        peak = max(peak, q)
        backlog.value = q
        n = service.ingested + (sum(pool.ingested()) if pool is not None else 0)
        if n != seen:
            seen = n
            stored.value = n
            last_t.value = time.monotonic()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    children_cpu = 0.0
    if pool is not None:
        pool.stop()
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        children_cpu = kids.ru_utime + kids.ru_stime
    if spy is not None:
        import signal

        spy.send_signal(signal.SIGINT)
        spy.wait(30)
        print(f"py-spy stacks: {Path(workdir) / 'controller.pyspy.txt'}", flush=True)
    service.stop()
    if profiler is not None:
        import pstats

        out = Path(workdir) / "ingest.pstats"
        profiler.dump_stats(out)
        pstats.Stats(str(out)).sort_stats("cumulative").print_stats(35)
    registry.close()
    result_q.put(
        {
            "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
            "workers_cpu_s": children_cpu,
            "maxrss_kb": cpu1.ru_maxrss,
            "peak_backlog": peak,
            "rejected": dict(service._rejected),
        }
    )


# --------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    db: str
    qos: int
    seconds: float
    published: int
    raw: int
    raw_s: float
    stored: int
    stored_s: float
    rows: int
    controller_cpu_s: float
    controller_rss_mb: float
    peak_backlog: int
    raw_cpu_s: float
    broker_cpu_s: float
    publishers_cpu_s: float
    rate: float = 0.0
    workers: int = 0
    drain_s: float = 0.0
    workers_cpu_s: float = 0.0

    @property
    def raw_rate(self) -> float:
        return self.raw / self.raw_s if self.raw_s > 0 else 0.0

    @property
    def stored_rate(self) -> float:
        return self.rows / self.stored_s if self.stored_s > 0 else 0.0

    @property
    def ratio(self) -> float:
        return self.stored_rate / self.raw_rate if self.raw_rate else 0.0


def _prepare_db(db_url: str, ids: list[str]) -> None:
    from edgefleet.controller.registry import Registry

    registry = Registry(db_url)
    try:
        for device_id in ids:
            registry.enroll_device(device_id, hardware_class="generic")
    finally:
        registry.close()


def _count_rows(db_url: str) -> int:
    import sqlalchemy as sa

    from edgefleet.controller.registry import Registry

    registry = Registry(db_url, migrate=False)
    try:
        with registry.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM telemetry")).scalar_one())
    finally:
        registry.close()


def _stop(proc: Any, timeout_s: float = 10.0) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout_s)


def run_once(
    db: str,
    db_url: str,
    *,
    qos: int,
    seconds: float,
    publishers: int,
    devices: int,
    workdir: Path,
    settings_kw: dict[str, Any],
    profile: str = "",
    rate: float = 0.0,
    workers: int = 0,
) -> RunResult:
    ids = device_ids(devices)
    _prepare_db(db_url, ids)
    messages = telemetry_payloads(ids)
    with mosquitto(workdir) as broker:
        stop = _ctx.Event()
        c_ready, r_ready = _ctx.Event(), _ctx.Event()
        stored = _ctx.Value("q", 0)
        stored_t = _ctx.Value("d", 0.0)
        backlog = _ctx.Value("q", 0)
        raw = _ctx.Value("q", 0)
        raw_t = _ctx.Value("d", 0.0)
        sent = _ctx.Value("q", 0)
        pub_cpu = _ctx.Value("d", 0.0)
        result_q = _ctx.Queue()
        go = _ctx.Event()
        controller = _ctx.Process(
            target=_controller,
            args=(
                db_url, broker.port, str(workdir), settings_kw, c_ready, stop,
                stored, stored_t, backlog, result_q, profile, workers,
            ),
            name="controller",
        )  # fmt: skip
        subscriber = _ctx.Process(
            target=_raw_subscriber, args=(broker.port, r_ready, raw, raw_t), name="raw"
        )
        pubs = []
        pub_ready = []
        for i in range(publishers):
            ev = _ctx.Event()
            share = messages[i::publishers]
            pubs.append(
                _ctx.Process(
                    target=_publisher,
                    args=(
                        broker.port,
                        i,
                        share,
                        qos,
                        seconds,
                        ev,
                        go,
                        sent,
                        pub_cpu,
                        rate / publishers,
                    ),
                    name=f"publisher-{i}",
                )
            )
            pub_ready.append(ev)
        procs = [controller, subscriber, *pubs]
        try:
            controller.start()
            subscriber.start()
            if not c_ready.wait(60) or not r_ready.wait(30):
                raise RuntimeError("controller or raw subscriber did not start")
            for p in pubs:
                p.start()
            for ev in pub_ready:
                if not ev.wait(30):
                    raise RuntimeError("a publisher did not connect")
            time.sleep(0.5)
            watched = {
                "raw": psutil.Process(subscriber.pid),
                "broker": psutil.Process(broker.pid),
            }
            cpu_before = {k: sum(p.cpu_times()[:2]) for k, p in watched.items()}
            t0 = time.monotonic()
            go.set()
            for p in pubs:
                p.join(seconds + 60)
            pub_end = time.monotonic()
            # Drain: wait until neither count moves and the controller's queue is empty.
            deadline = time.monotonic() + max(120.0, 10 * seconds)
            last = (-1, -1)
            quiet_since = time.monotonic()
            while time.monotonic() < deadline:
                now = (raw.value, stored.value)
                # Worker processes report their counts in steps and have no
                # visible backlog: short of everything, wait longer for one.
                quiet_s = 2.0 if stored.value >= sent.value else 10.0
                if now != last or backlog.value:
                    last, quiet_since = now, time.monotonic()
                elif time.monotonic() - quiet_since > quiet_s:
                    break
                time.sleep(0.1)
            cpu_used = {k: sum(p.cpu_times()[:2]) - cpu_before[k] for k, p in watched.items()}
            stop.set()
            info = result_q.get(timeout=60)
            controller.join(30)
        finally:
            for p in procs:
                _stop(p)
    rows = _count_rows(db_url)
    return RunResult(
        db=db,
        qos=qos,
        seconds=seconds,
        published=sent.value,
        raw=raw.value,
        raw_s=raw_t.value - t0,
        stored=stored.value,
        stored_s=stored_t.value - t0,
        rows=rows,
        controller_cpu_s=info["cpu_s"],
        controller_rss_mb=info["maxrss_kb"] / 1024,
        peak_backlog=info["peak_backlog"],
        raw_cpu_s=cpu_used["raw"],
        broker_cpu_s=cpu_used["broker"],
        publishers_cpu_s=pub_cpu.value,
        rate=rate,
        workers=workers,
        drain_s=max(0.0, stored_t.value - pub_end),
        workers_cpu_s=info["workers_cpu_s"],
    )


# --------------------------------------------------------------------------- report
def result_rows(results: list[RunResult]) -> list[list[str]]:
    return [
        [
            r.db,
            str(r.qos),
            str(r.workers),
            f"{r.published:,}",
            f"{r.raw:,}",
            f"{r.raw_rate:,.0f}",
            f"{r.rows:,}",
            f"{r.stored_rate:,.0f}",
            f"{r.ratio:.0%}",
            f"{r.peak_backlog:,}",
            f"{r.controller_cpu_s + r.workers_cpu_s:.1f}",
            f"{r.controller_rss_mb:.0f}",
            f"{r.raw_cpu_s:.1f}",
            f"{r.broker_cpu_s:.1f}",
            f"{r.publishers_cpu_s:.1f}",
        ]
        for r in results
    ]


HEADERS = [
    "database",
    "QoS",
    "ingest workers",
    "published",
    "raw received",
    "raw msg/s",
    "stored",
    "stored points/s",
    "stored/raw",
    "peak backlog",
    "controller (+workers) CPU s",
    "controller peak RSS MB",
    "raw sub CPU s",
    "broker CPU s",
    "publishers CPU s",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=("sqlite", "postgresql"), action="append")
    ap.add_argument("--pg-url", default=os.environ.get("EDGEFLEET_BENCH_PG_URL", DEFAULT_PG_URL))
    ap.add_argument("--qos", type=int, choices=(0, 1), action="append")
    ap.add_argument("--seconds", type=float, default=15.0, help="publishing time per run")
    ap.add_argument("--publishers", type=int, default=3, help="publisher processes")
    ap.add_argument("--devices", type=int, default=1000, help="enrolled devices")
    ap.add_argument("--batch", type=int, default=None, help="ServiceSettings.ingest_batch_max")
    ap.add_argument(
        "--profile",
        choices=("cprofile", "py-spy"),
        default="",
        help="cProfile the ingest worker's _store, or py-spy the whole controller process",
    )
    ap.add_argument("--keep", type=Path, help="copy profiles here (temp dirs are removed)")
    ap.add_argument(
        "--sustained",
        action="store_true",
        help="find the highest paced publish rate stored 100%% with a bounded backlog",
    )
    ap.add_argument(
        "--rates",
        default="2000,4000,6000,8000,10000,12000,15000,20000,25000,30000",
        help="--sustained: rates to offer (msg/s), tried in order until one fails",
    )
    ap.add_argument(
        "--ingest-workers",
        type=int,
        action="append",
        help="ingest worker processes (serve --ingest-workers); 0 = in-process (default)",
    )
    ap.add_argument(
        "--max-drain", type=float, default=2.0, help="--sustained: bounded = drained within this"
    )
    ap.add_argument("--quick", action="store_true", help="5 s runs, print only")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    dbs = args.db or ["sqlite", "postgresql"]
    qoss = args.qos or [0]
    seconds = 5.0 if args.quick else args.seconds
    settings_kw: dict[str, Any] = {}
    if args.batch:
        settings_kw["ingest_batch_max"] = args.batch

    if args.sustained:
        return sustained(args, dbs, qoss[0], seconds, settings_kw)

    results: list[RunResult] = []
    broker_version = ""
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-ingest-") as tmp:
        for db, qos, workers in [
            (d, q, w) for d in dbs for q in qoss for w in (args.ingest_workers or [0])
        ]:
            workdir = Path(tmp) / f"{db}-q{qos}-w{workers}"
            workdir.mkdir()
            common = {
                "qos": qos,
                "seconds": seconds,
                "publishers": args.publishers,
                "devices": args.devices,
                "workdir": workdir,
                "settings_kw": settings_kw,
                "profile": args.profile,
                "workers": workers,
            }
            print(f"# {db}, QoS {qos}, {workers} ingest workers: {seconds:g} s ...", flush=True)
            if db == "sqlite":
                r = run_once(db, f"sqlite:///{workdir / 'registry.db'}", **common)
            else:
                with postgres_schema(args.pg_url) as url:
                    r = run_once(db, url, **common)
            results.append(r)
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                for f in [*workdir.glob("*.pstats"), *workdir.glob("*.pyspy.txt")]:
                    shutil.copy(f, args.keep / f"{db}-q{qos}-{f.name}")
            if not broker_version:
                broker_version = mosquitto_release()
            one = table(HEADERS, result_rows([r]), set(range(2, len(HEADERS))))
            print("\n".join(one), flush=True)

    lines = table(HEADERS, result_rows(results), set(range(2, len(HEADERS))))
    print()
    print("\n".join(lines))
    if args.quick or args.no_write:
        return 0

    command = "python bench/ingest.py" + (
        " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    body = [
        f"Command: `{command}` (from the repository root, venv active).",
        f"Machine: {machine_line()}. Broker: {broker_version}, started by the script on a free"
        " loopback port (`set_tcp_nodelay true`, persistence off).",
        f"{args.publishers} publisher processes (one paho client each) publish valid `Telemetry`"
        f" for {args.devices} enrolled devices for {seconds:g} s per run, as fast as the broker"
        " takes them; a raw paho subscriber process on `edgefleet/v1/devices/+/telemetry` and"
        " one `ControllerService` process (default `ServiceSettings`) receive the same"
        " messages from the same broker at the same time. Rates are messages / time from the"
        " first publish to the last message received (raw) or stored (controller, including"
        " draining its backlog); stored = rows in the `telemetry` table afterwards."
        " PostgreSQL: a fresh schema on a local server, dropped afterwards.",
        "",
        *lines,
        "",
        "### Targets",
        "",
    ]
    for r in results:
        ok_ratio = r.ratio >= 0.70
        body.append(
            f"- {r.db}, QoS {r.qos}: stored {r.stored_rate:,.0f} points/s = {r.ratio:.0%} of the"
            f" raw receive rate (target >= 70%: {'met' if ok_ratio else 'NOT met'})."
        )
        if r.db == "sqlite":
            ok = r.stored_rate >= 20_000
            body.append(
                f"- {r.db}, QoS {r.qos}: {r.stored_rate:,.0f} points/s stored on SQLite"
                f" (target >= 20,000: {'met' if ok else 'NOT met'})."
            )
    write_section(args.output, SECTION, body)
    print(f"\nwrote {SECTION!r} in {args.output}")
    return 0


SUSTAINED_SECTION = "## Telemetry ingestion: sustained capacity and ingest workers"
SUSTAINED_HEADERS = [
    "database",
    "ingest workers",
    "offered msg/s",
    "published",
    "raw received",
    "stored",
    "stored %",
    "drain s",
    "verdict",
    "controller CPU s",
    "workers CPU s",
]


def sustained(
    args: argparse.Namespace, dbs: list[str], qos: int, seconds: float, settings_kw: dict[str, Any]
) -> int:
    """Offer rising paced rates; a rate is sustained if every message is stored, drained quickly."""
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    rows: list[list[str]] = []
    best: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-ingest-") as tmp:
        for db in dbs:
            for workers in args.ingest_workers or [0]:
                for rate in rates:
                    workdir = Path(tmp) / f"{db}-w{workers}-r{rate:.0f}"
                    workdir.mkdir()
                    common: dict[str, Any] = {
                        "qos": qos,
                        "seconds": seconds,
                        "publishers": args.publishers,
                        "devices": args.devices,
                        "workdir": workdir,
                        "settings_kw": settings_kw,
                        "rate": rate,
                        "workers": workers,
                    }
                    print(f"# {db}, {workers} workers, {rate:,.0f} msg/s ...", flush=True)
                    if db == "sqlite":
                        r = run_once(db, f"sqlite:///{workdir / 'registry.db'}", **common)
                    else:
                        with postgres_schema(args.pg_url) as url:
                            r = run_once(db, url, **common)
                    ok = r.rows >= r.published and r.drain_s <= args.max_drain
                    rows.append(
                        [
                            db,
                            str(workers),
                            f"{rate:,.0f}",
                            f"{r.published:,}",
                            f"{r.raw:,}",
                            f"{r.rows:,}",
                            f"{r.rows / r.published:.1%}" if r.published else "-",
                            f"{r.drain_s:.1f}",
                            "sustained" if ok else "NOT sustained",
                            f"{r.controller_cpu_s:.1f}",
                            f"{r.workers_cpu_s:.1f}",
                        ]
                    )
                    print("\n".join(table(SUSTAINED_HEADERS, rows[-1:], set(range(1, 11)))))
                    if not ok:
                        break
                    best[(db, workers)] = rate
    lines = table(SUSTAINED_HEADERS, rows, set(range(1, 11)))
    print()
    print("\n".join(lines))
    for (db, workers), rate in best.items():
        print(f"{db}, {workers} workers: sustained {rate:,.0f} msg/s")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
