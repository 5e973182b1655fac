"""The hostile-device soak: one device runs every attack of issue 9 at once during a rollout.

Everything is the production path: Mosquitto with the generated TLS config
and ACL (``edgefleet.controller.mosquitto_config``, as in
``tests/security``), every client with its own certificate from the
controller's CA, the real ``ControllerService`` in its own process (so its
RSS is its own), real agents (``edgefleet.agent.daemon.Agent``) with their
HTTP endpoints.

One enrolled device (``gw-evil``), with its own valid certificate, does all of
this at once for ``duration_s`` (and longer if the rollout has not ended by
then: the whole rollout runs under attack):

- file-request floods on its own topic: ``rate`` requests/s for blocks
  [0, 64) of a ``bundle_mb`` bundle, once with 1 MiB blocks (the attack as
  reported) and once with 64 KiB blocks (within every per-request limit);
- poisoned telemetry: requests 2^63-1, errors > requests, negative
  latencies, window and CPU, ``at`` in the year 9999, and ``rejected`` maps
  with new keys every time (the counter-name explosion);
- events with a 250 KB unknown field, a flood of small events (numbered and
  unnumbered), replays of the same numbered events, and retained events;
- client-id reuse: it connects as ``edgefleet-controller`` and as a healthy
  device (the broker replaces every client id by the certificate's name);
- and, locally on the canary of the rollout, a process sends big batches
  (``batch_rows`` rows) to the canary's inference API.

Once during the attack the controller's own network link drops for
``cut_s`` (a TCP forwarder cut, ``tests/support/tcpcut.py``): the broker then
hands the attacker's retained events back when the controller resubscribes,
and events healthy agents send meanwhile reach nobody until their journals
replay them.

Meanwhile a staged rollout (``RolloutStore``; canary, then waves) runs on
``healthy`` other devices. The same rollout, one version earlier, runs
first without any attack: the baseline of the same run.

Recorded: whether the rollout completed, the controller's RSS before, at
peak and after, healthy install times (``download_started`` to
``installed``, from the agents' own events) loaded vs unloaded, whether any
healthy device lost an event (the agents' journals vs the stored events),
whether the controller was ever knocked off the broker, and the per-device
counters an operator sees.

    python bench/hostile_soak.py                   # 60 s, writes BENCHMARKS.md
    python bench/hostile_soak.py --duration 20 --no-write

``tests/e2e/test_hostile_soak.py`` runs :func:`run` and asserts on its result.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing as mp
import secrets
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    RssWatch,
    machine_line,
    mosquitto_release,
    run_controller,
    table,
    write_section,
)

SECTION = "## Hostile-device soak"
MODEL = "soak-model"
BIG = "soak-big"
TAG = "soak"
ATTACKER = "gw-evil"
MiB = 1024 * 1024

_ctx = mp.get_context("spawn")


@dataclass
class SoakOptions:
    """What the soak does. Units are in the names."""

    duration_s: float = 60.0
    healthy: int = 5
    rate: float = 50.0  # file requests/s per flood stream
    block_sizes: tuple[int, ...] = (MiB, 64 * 1024)
    bundle_mb: float = 32.0
    model_mb: float = 1.0
    batch_rows: int = 6000
    rollout_delay_s: float = 5.0  # attacks run this long before the rollout starts
    timeout_s: float = 240.0  # per phase
    p95_slack_ms: float = 25.0  # the rollout's latency slack (see run)
    # The controller's own network link drops once, this far into the attack
    # (at most half-way),
    # for ``cut_s``: the broker then hands the attacker's retained events back
    # on resubscription, and healthy agents' events of that moment reach
    # nobody until their journals replay them. None: no cut.
    cut_at_s: float | None = 20.0
    cut_s: float = 2.0


@dataclass
class SoakResult:
    """What one soak measured (see the module docstring)."""

    options: SoakOptions
    baseline_rollout_s: float = 0.0
    baseline_install_s: list[float] = field(default_factory=list)
    rollout_status: str = ""
    rollout_counts: dict[str, int] = field(default_factory=dict)
    rollout_s: float = 0.0
    rollout_done_in_attack: bool = False
    install_s: list[float] = field(default_factory=list)
    waves: list[int] = field(default_factory=list)
    canary: str = ""
    # The canary's per-request p95 with the previous model (before the big
    # batches) and with the new one (during them): what judging per request saw.
    canary_p95_ms: tuple[float | None, float | None] = (None, None)
    attack_s: float = 0.0
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    rss_timeline: list[tuple[float, int]] = field(default_factory=list)
    attack: dict[str, int] = field(default_factory=dict)
    big_batches_ok: int = 0
    healthy_events: dict[str, dict[str, int]] = field(default_factory=dict)
    attacker_counters: dict[str, int] = field(default_factory=dict)
    operator_view: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    healthy_counters: dict[str, int] = field(default_factory=dict)
    fleet_rejected: dict[str, int] = field(default_factory=dict)
    attacker_events_stored: int = 0
    max_events_per_device: int = 0
    controller_connects: int = 0
    controller_cuts: int = 0
    decisions: list[str] = field(default_factory=list)

    @property
    def rollout_completed(self) -> bool:
        return self.rollout_status == "completed" and self.rollout_counts == {
            "updated": self.options.healthy
        }

    @property
    def events_lost(self) -> int:
        return sum(
            e["emitted"] - e["stored"] + e["journal_dropped"] + e["pending"]
            for e in self.healthy_events.values()
        )

    @property
    def install_ratio(self) -> float:
        base = statistics.median(self.baseline_install_s) if self.baseline_install_s else 0.0
        loaded = statistics.median(self.install_s) if self.install_s else float("inf")
        return loaded / base if base else float("inf")


# --------------------------------------------------------------------------- controller
def _controller(db_url: str, repo: str, broker: Any, commands: Any, replies: Any) -> None:
    """The controller in its own process: ("deploy", version, ids), ("flush",), ("stop",)."""
    from edgefleet.controller.config import ServiceSettings

    def handle(service: Any, cmd: tuple[Any, ...]) -> tuple[Any, ...]:
        if cmd[0] == "deploy":
            service.deploy(MODEL, cmd[1], cmd[2])
            return ("deployed",)
        service.flush_rejections()
        return ("flushed", service.settings.max_events_per_device)

    settings = ServiceSettings(rollout_interval_s=0.5, maintenance_interval_s=1.0)
    run_controller(db_url, repo, broker, commands, replies, handle, settings)


# --------------------------------------------------------------------------- the attacker
def _poisoned_telemetry(device_id: str, n: int) -> bytes:
    """The n-th of the poisoned telemetry windows of issue 9, item 5 and 6."""
    body: dict[str, Any] = {
        "v": 1,
        "device_id": device_id,
        "window_s": 1.0,
        "requests": 10,
        "errors": 0,
        "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
        "model": None,
        "rss_bytes": 1000,
        "cpu_percent": 1.0,
        "rejected": {},
        "at": time.time(),
    }
    kind = n % 6
    if kind == 0:
        body["requests"] = 2**63 - 1
        body["samples"] = 2**63 - 1
    elif kind == 1:
        body["requests"], body["errors"] = 1, 50
    elif kind == 2:
        body["latency_ms"] = {"p50": -5.0, "p95": -1.0, "p99": -0.5}
        body["window_s"], body["cpu_percent"] = -1.0, -50.0
    elif kind == 3:
        body["at"] = 253402300799.0  # 9999-12-31
    elif kind == 4:
        body["rejected"] = {f"junk_{secrets.token_hex(6)}": 1 for _ in range(50)}
    else:
        body["latency_ms"] = {"p50": 50.0, "p95": 1.0, "p99": float("inf")}
    return json.dumps(body).encode()


def _attacker(
    settings: Any,
    victims: list[str],
    big_path: str,
    block_sizes: list[int],
    rate: float,
    stop: Any,
    out: Any,
) -> None:
    """All attacks of one device, over its one MQTT session (its identity allows no other)."""
    import logging

    from edgefleet.protocols.errors import BrokerError
    from edgefleet.protocols.framing import BlockFrame, FrameKind
    from edgefleet.protocols.messages import Event, EventKind, FileRequest
    from edgefleet.protocols.topics import Channel, DeviceTopic
    from edgefleet.shared.link import MqttLink

    logging.basicConfig(level=logging.CRITICAL)
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def bump(name: str, by: int = 1) -> None:
        with lock:
            counts[name] = counts.get(name, 0) + by

    def on_frame(_topic: str, payload: bytes, _retained: bool) -> None:
        bump("frames_received")
        bump("bytes_received", len(payload))
        with contextlib.suppress(Exception):
            frame = BlockFrame.decode(payload)
            if frame.kind is FrameKind.ERROR:
                bump(f"refusals_{frame.status}")

    me = ATTACKER
    link = MqttLink(settings, me)
    link.subscribe(str(DeviceTopic(me, Channel.FILE_BLOCKS)), on_frame, qos=0)
    link.start(wait=True)

    def topic(channel: Channel) -> str:
        return str(DeviceTopic(me, channel))

    def send(channel: Channel, payload: bytes, name: str, *, retain: bool = False) -> None:
        if link.connected:
            link.publish(topic(channel), payload, qos=1, retain=retain)
            bump(name)

    def every(period_s: float, work: Any) -> None:
        n = 0
        next_at = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a publish while reconnecting
                work(n)
            n += 1
            next_at += period_s
            stop.wait(max(0.0, next_at - time.monotonic()))

    def flood(block_size: int) -> Any:
        def work(_n: int) -> None:
            request = FileRequest(me, secrets.token_hex(16), big_path, block_size, ((0, 64),))
            send(Channel.FILE_REQUEST, request.encode(), f"file_requests_{block_size // 1024}k")

        return work

    def telemetry(n: int) -> None:
        send(Channel.TELEMETRY, _poisoned_telemetry(me, n), "poisoned_telemetry")

    def huge_events(_n: int) -> None:
        event = Event(me, EventKind.INSTALL_FAILED, at=time.time(), extra={"blob": "x" * 250_000})
        send(Channel.EVENTS, event.encode(), "huge_events")

    flood_journal = secrets.token_hex(8)

    def event_flood(n: int) -> None:
        numbered = n % 2 == 0
        event = Event(
            me,
            EventKind.DOWNLOAD_STARTED,
            at=time.time(),
            journal=flood_journal if numbered else None,
            seq=n // 2 + 1 if numbered else None,
            extra={"junk": secrets.token_hex(32)},
        )
        send(Channel.EVENTS, event.encode(), "flood_events")

    replay_journal = secrets.token_hex(8)

    def replays(n: int) -> None:
        for seq in range(1, 21):  # the same 20 numbered events, again and again
            event = Event(me, EventKind.INSTALLED, journal=replay_journal, seq=seq)
            send(Channel.EVENTS, event.encode(), "replayed_events")
        retained = Event(me, EventKind.ROLLED_BACK, journal=replay_journal, seq=1000 + n % 5)
        send(Channel.EVENTS, retained.encode(), "retained_events", retain=True)
        plain = Event(me, EventKind.ROLLED_BACK)
        send(Channel.EVENTS, plain.encode(), "retained_events", retain=True)

    takeover_ids = [
        "edgefleet-controller",
        *victims[:1],
        *(f"edgefleet-agent-{v}" for v in victims[:1]),
    ]

    def takeover(n: int) -> None:
        # Each attempt, whatever id it asks for, is renamed to our own by the
        # broker: it can only replace *our* session (the floods pause ~1 s).
        client_id = takeover_ids[n % len(takeover_ids)]
        other = MqttLink(settings, client_id)
        try:
            other.start(wait=True)
            bump("takeover_connects")
            time.sleep(0.3)
        except BrokerError:
            bump("takeover_refused")
        finally:
            with contextlib.suppress(Exception):
                other.stop()

    workers = [
        *((1.0 / rate, flood(bs)) for bs in block_sizes),
        (0.1, telemetry),
        (0.2, huge_events),
        (0.01, event_flood),
        (1.0, replays),
        (6.0, takeover),
    ]
    threads = [
        threading.Thread(target=every, args=(period, work), daemon=True) for period, work in workers
    ]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(30)
    link.stop()
    out.put(counts)


# --------------------------------------------------------------------------- run
def _wait(done: Any, timeout_s: float, poll_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(poll_s)
    return bool(done())


def _install_times(registry: Any, ids: list[str], version: str) -> list[float]:
    """Per device: ``download_started`` to ``installed`` of ``version``, by the agent's clock."""
    out = []
    for device_id in ids:
        started = installed = None
        for e in registry.events_for(device_id, limit=10_000):
            model = (e.detail or {}).get("model") or {}
            if model.get("name") != MODEL or model.get("version") != version:
                continue
            if e.kind == "download_started":
                started = e.at if started is None else min(started, e.at)
            elif e.kind == "installed":
                installed = e.at if installed is None else max(installed, e.at)
        if started is not None and installed is not None:
            out.append((installed - started).total_seconds())
    return out


def run(opts: SoakOptions, tmp: Path) -> SoakResult:
    """One soak in ``tmp`` (see the module docstring)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from edgefleet.agent.config import AgentConfig, HttpSettings
    from edgefleet.agent.daemon import Agent
    from edgefleet.agent.fetcher import TransferSettings
    from edgefleet.controller.ca import CertificateAuthority
    from edgefleet.controller.catalog import register_model
    from edgefleet.controller.cli.output import device_counts
    from edgefleet.controller.registry import Registry
    from edgefleet.controller.rollout.engine import RolloutConfig, RolloutStatus
    from edgefleet.controller.rollout.store import RolloutStore, Selector
    from edgefleet.controller.trust import TrustRepository
    from tests.e2e.harness import wide_model
    from tests.e2e.test_rollout_health import Load  # requests of N rows to agents' APIs
    from tests.security.conftest import TlsBroker
    from tests.support.tcpcut import CuttableLink

    result = SoakResult(options=opts)
    db_url = f"sqlite:///{tmp / 'registry.db'}"
    registry = Registry(db_url)
    repository = TrustRepository.init(tmp / "repository")
    big = register_model(
        registry,
        repository,
        wide_model(int(opts.bundle_mb * MiB) // 80, seed=0),
        name=BIG,
        version="1",
    )
    for i, version in enumerate(("1.0", "2.0", "3.0")):
        model = wide_model(max(64, int(opts.model_mb * MiB) // 80), seed=i + 1)
        register_model(registry, repository, model, name=MODEL, version=version)
    target = repository.get_target(big.bundles[0].target_path)
    assert target is not None
    big_path = "targets/" + str(target.get_prefixed_paths()[0])
    ids = [f"gw-ok-{i:02d}" for i in range(opts.healthy)]
    for device_id in ids:
        registry.enroll_device(device_id, tags=[TAG])
    registry.enroll_device(ATTACKER)
    root = tmp / "root.json"
    root.write_bytes(repository.root_bytes())
    del repository  # the controller process owns it from here on

    ca = CertificateAuthority.init(tmp / "ca")
    broker = TlsBroker(ca, tmp / "clients")
    broker.start()
    cut = CuttableLink(broker.port)
    via_cut = dataclasses.replace(broker.controller, port=cut.port)
    cuts: list[threading.Timer] = []

    def blip() -> None:
        cut.cut()
        result.controller_cuts += 1
        time.sleep(opts.cut_s)
        cut.restore()

    commands, replies = _ctx.Queue(), _ctx.Queue()
    controller = _ctx.Process(
        target=_controller,
        args=(db_url, str(tmp / "repository"), via_cut, commands, replies),
        name="controller",
    )
    agents: list[Any] = []
    attacker: Any = None
    stop_attack = _ctx.Event()
    try:
        controller.start()
        if replies.get(timeout=120)[0] != "started":
            raise RuntimeError("controller did not start")
        for device_id in ids:
            agent = Agent(
                AgentConfig(
                    device_id=device_id,
                    state_dir=tmp / "agents" / device_id,
                    trust_root=root,
                    telemetry_interval_s=0.5,
                    retry_backoff_s=0.5,
                    event_resend_s=5.0,
                    broker=broker.device(device_id),
                    http=HttpSettings(port=0),
                    transfer=TransferSettings(request_timeout_s=5.0),
                )
            )
            agent.start()
            agents.append(agent)
        by_id = {a.device_id: a for a in agents}
        if not _wait(
            lambda: sum(d.online for d in registry.list_devices() if d.id in by_id) == len(ids),
            60,
        ):
            raise RuntimeError("not every healthy agent came online")

        def on(version: str) -> bool:
            return all(
                a.active_model is not None and a.active_model.version == version for a in agents
            )

        commands.put(("deploy", "1.0", ids))
        replies.get(timeout=60)
        if not _wait(lambda: on("1.0"), opts.timeout_s):
            raise RuntimeError("the first deploy did not finish")

        config = RolloutConfig(
            canary_count=1,
            base_rate=2,
            increment_factor=2.0,
            max_rate=4,
            max_in_flight=4,
            soak_s=1.0,
            observe_s=4.0,
            device_timeout_s=opts.timeout_s,
            min_executed=1,
            # Every "device" here shares two cores with the attacker, the broker,
            # the controller and the canary's big batches, and a per-sample p95
            # over the ~10 single-row requests of an observation is mostly
            # scheduling noise (measured: 0.3 to 7.5 ms for the same model).
            # On a fleet, one device's load never lands on another's CPU; the
            # slack absorbs that, while a per-request judgment of the big
            # batches (hundreds of ms) would still halt the rollout.
            p95_slack_ms=opts.p95_slack_ms,
        )
        store = RolloutStore(registry, actor="soak")

        def finished(rollout_id: str) -> bool:
            return store.get(rollout_id).status not in (
                RolloutStatus.CREATED,
                RolloutStatus.RUNNING,
            )

        # Ordinary single-row traffic on every healthy device throughout: the
        # health check's baseline and observations.
        with Load(agents, rows=1, pause_s=0.2):
            time.sleep(3.0)
            # The baseline: the same kind of rollout, nothing attacking.
            t0 = time.monotonic()
            baseline = store.create(MODEL, "2.0", Selector(tags=(TAG,)), config)
            if not _wait(lambda: finished(baseline.id), opts.timeout_s):
                raise RuntimeError("the unloaded rollout did not finish")
            result.baseline_rollout_s = time.monotonic() - t0
            if store.get(baseline.id).status is not RolloutStatus.COMPLETED:
                raise RuntimeError(f"the unloaded rollout ended {store.get(baseline.id).status}")
            result.baseline_install_s = _install_times(registry, ids, "2.0")
            time.sleep(2.0)

            # The attack, and the rollout during it.
            assert controller.pid is not None
            out = _ctx.Queue()
            attacker = _ctx.Process(
                target=_attacker,
                args=(
                    broker.device(ATTACKER),
                    ids,
                    big_path,
                    list(opts.block_sizes),
                    opts.rate,
                    stop_attack,
                    out,
                ),
                name="attacker",
            )
            with RssWatch(controller.pid) as watch:
                result.rss_before = watch.rss()
                t_attack = time.monotonic()
                attacker.start()
                if opts.cut_at_s is not None:
                    at = min(opts.cut_at_s, opts.duration_s / 2)
                    cuts.append(threading.Timer(at, blip))
                    cuts[-1].start()
                time.sleep(opts.rollout_delay_s)
                t0 = time.monotonic()
                rollout = store.create(MODEL, "3.0", Selector(tags=(TAG,)), config)
                _wait(lambda: any(d.wave == 0 for d in store.devices(rollout.id)), 30)
                result.canary = next(
                    (d.device_id for d in store.devices(rollout.id) if d.wave == 0), ""
                )
                canary = [by_id[result.canary]] if result.canary in by_id else agents[:1]
                with Load(canary, rows=opts.batch_rows, pause_s=0.2) as big_load:
                    # The attack goes on until the rollout has ended, so every
                    # step of it ran under attack.
                    done = _wait(lambda: finished(rollout.id), opts.timeout_s)
                    result.rollout_s = time.monotonic() - t0
                    result.rollout_done_in_attack = done
                    left = opts.duration_s - (time.monotonic() - t_attack)
                    if left > 0:
                        time.sleep(left)
                    stop_attack.set()
                result.big_batches_ok = big_load.ok
                result.attack_s = time.monotonic() - t_attack
                result.attack = out.get(timeout=90)
                for timer in cuts:
                    timer.join()
                attacker.join(30)
                time.sleep(3.0)
                result.rss_after = watch.rss()
            result.rss_peak = watch.peak
            result.rss_timeline = watch.timeline
            info = store.get(rollout.id)
            result.rollout_status = info.status.value
            result.rollout_counts = dict(info.counts)
            result.waves = [w.devices for w in store.waves(rollout.id)]
            for d in store.devices(rollout.id):
                if d.device_id == result.canary:
                    result.canary_p95_ms = (d.baseline_p95_ms, d.observed_p95_ms)
            result.decisions = [
                f"{d.kind} {d.device_id or ''}: {d.reason}" for d in store.decisions(rollout.id)
            ]
            result.install_s = _install_times(registry, ids, "3.0")

        # No healthy event lost: each journal fully acknowledged, and every
        # acknowledged event stored.
        _wait(lambda: all(a.journal.pending() == 0 for a in agents), 60)
        for agent in agents:
            result.healthy_events[agent.device_id] = {
                "emitted": agent.journal.acked + agent.journal.pending(),
                "stored": len(registry.events_for(agent.device_id, limit=100_000)),
                "pending": agent.journal.pending(),
                "journal_dropped": agent.journal.dropped,
            }
        commands.put(("flush",))
        _tag, result.max_events_per_device = replies.get(timeout=60)
        counters = registry.fleet_status().counters
        result.attacker_counters = {k: v for k, v in counters.items() if f".{ATTACKER}." in k}
        # What `status` and `device events` print per device (their --json shape).
        result.operator_view = device_counts(counters)
        result.healthy_counters = {
            k: v for k, v in counters.items() if any(f".{d}." in k for d in ids)
        }
        result.fleet_rejected = {
            k.removeprefix("rejected."): v for k, v in counters.items() if k.startswith("rejected.")
        }
        result.attacker_events_stored = len(registry.events_for(ATTACKER, limit=100_000))
        # Devices and status views must survive the poison.
        registry.device_summaries()
        result.controller_connects = broker.log().count("as edgefleet-controller (")
    finally:
        stop_attack.set()
        for agent in agents:
            with contextlib.suppress(Exception):
                agent.stop()
        commands.put(("stop",))
        for proc in (attacker, controller):
            if proc is None or proc.pid is None:
                continue
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        for timer in cuts:
            timer.cancel()
        cut.close()
        broker.cleanup()
        registry.close()
    return result


# --------------------------------------------------------------------------- report
def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _fmt_s(values: list[float]) -> str:
    if not values:
        return "none"
    return f"median {statistics.median(values):.2f} s (max {max(values):.2f})"


def report(argv: list[str], r: SoakResult) -> list[str]:
    o = r.options
    cmd = "python bench/hostile_soak.py" + "".join(" " + shlex.quote(a) for a in argv)
    growth = (r.rss_peak - r.rss_before) / MiB
    sent = ", ".join(
        f"{k} {v}"
        for k, v in sorted(r.attack.items())
        if not k.startswith(("frames", "bytes", "refusals"))
    )
    got = ", ".join(
        f"{k} {v}" for k, v in sorted(r.attack.items()) if k.startswith(("frames", "refusals"))
    )
    every = max(1, len(r.rss_timeline) // 8)
    timeline = ", ".join(f"{t:.0f} s {rss / MiB:.0f}" for t, rss in r.rss_timeline[::every])
    lost = r.events_lost
    emitted = sum(e["emitted"] for e in r.healthy_events.values())
    rows = [
        [
            "rollout (staged, during the attack)",
            f"{r.rollout_status} {r.rollout_counts}, waves {r.waves}, {r.rollout_s:.1f} s "
            f"(unloaded: {r.baseline_rollout_s:.1f} s); "
            f"{'ended' if r.rollout_done_in_attack else 'NOT ended'} under attack",
        ],
        [
            "healthy install (download_started → installed)",
            f"{_fmt_s(r.install_s)} vs unloaded {_fmt_s(r.baseline_install_s)}: "
            f"{r.install_ratio:.2f}x",
        ],
        [
            "controller RSS before → peak → after",
            f"{r.rss_before / MiB:.0f} → {r.rss_peak / MiB:.0f} → {r.rss_after / MiB:.0f} MiB "
            f"(+{growth:.0f} MiB at peak); MiB over the attack: {timeline}",
        ],
        [
            "healthy events lost",
            f"{lost} of {emitted} (journals all acknowledged, every acknowledged event stored)"
            if lost == 0
            else f"{lost} of {emitted}",
        ],
        [
            "controller sessions",
            f"{r.controller_connects} for {r.controller_cuts} network cut(s) of "
            f"{o.cut_s:g} s: {'never' if r.controller_connects == 1 + r.controller_cuts else 'WAS'}"
            " knocked off by the attacker",
        ],
        [
            "retained events handed back on reconnect (refused, counted)",
            str(r.fleet_rejected.get("retained_event", 0)),
        ],
        ["attacker's events stored", f"{r.attacker_events_stored} (cap {r.max_events_per_device})"],
        [
            "big local batches served on the canary",
            f"{r.big_batches_ok} batches of {o.batch_rows} rows, 200 OK (canary {r.canary}); "
            f"its per-request p95 {_ms(r.canary_p95_ms[0])} before, {_ms(r.canary_p95_ms[1])} "
            "during them",
        ],
    ]
    counters = ", ".join(f"`{k}` {v}" for k, v in sorted(r.attacker_counters.items()))
    return [
        f"`{cmd}` on {machine_line()}; {mosquitto_release()} with the generated TLS config and "
        "ACL (`tests/security` TlsBroker), every client on its own certificate.",
        "",
        f"One enrolled device (`{ATTACKER}`) runs every attack of issue 9 at once for "
        f"{r.attack_s:.0f} s: file-request floods of {o.rate:g}/s each with "
        + " and ".join(f"{b // 1024} KiB" for b in o.block_sizes)
        + f" blocks for [0, 64) of a {o.bundle_mb:g} MiB bundle; poisoned telemetry "
        "(2^63-1 requests, errors > requests, negative and non-finite latencies, `at` in 9999, "
        "new `rejected` keys each time); events with a 250 KB unknown field, an event flood "
        "(numbered and not), replays of the same numbered events and retained events; "
        "client-id reuse as `edgefleet-controller` and as a healthy device; and big local "
        f"batches ({o.batch_rows} rows) on the rollout's canary. Sent: {sent}; the attacker "
        f"received {got} and {r.attack.get('bytes_received', 0) / MiB:.0f} MiB of frames. "
        f"Once, {min(o.cut_at_s or 0, o.duration_s / 2):g} s in, the controller's own network "
        f"link is cut for {o.cut_s:g} s (a TCP forwarder), so the broker hands the retained "
        "events back on its resubscription and healthy agents' journals must replay. "
        f"Meanwhile a staged rollout of a {o.model_mb:g} MiB model runs on {o.healthy} other "
        "devices with real agents (canary 1, then waves; soak 1 s, observe 4 s; p95 slack "
        f"{o.p95_slack_ms:g} ms for co-location noise; single-row traffic on every device); the "
        "baseline is the same rollout, one version earlier, "
        "unattacked, in the same run. The controller runs in its own process; RSS is "
        "psutil's, sampled every 0.2 s.",
        "",
        *table(["what", "result"], rows),
        "",
        f"What an operator sees for the attacker (per-device counters): {counters or 'none'}. "
        f"Healthy devices' counters: {r.healthy_counters or 'none'}.",
        "",
        "With the default `p95_slack_ms` of 2 ms, 2 of 3 runs halted at the last wave on "
        "latency noise, not on the attack: one device's per-sample p95 over ~10 single-row "
        "requests was 7.5 ms against its own 1.2 ms a few seconds earlier (same model, same "
        "load, CPU shared with everything above), so the soak's rollout uses a 25 ms slack. "
        "The big batches stay a real test: judged per request (the canary's p95 in the table) "
        "they exceed it by far; judged per sample they do not.",
        "",
        "The machine (2 cores) was shared by 8 workers running tests and benchmarks, and the "
        "soak ran under `nice -n 10`, so timings are pessimistic and only ratios within one "
        "run mean much.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="attack seconds")
    parser.add_argument("--healthy", type=int, default=5, help="devices in the rollout")
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s per flood")
    parser.add_argument("--bundle-mb", type=float, default=32.0, help="the flooded bundle")
    parser.add_argument("--model-mb", type=float, default=1.0, help="the rolled-out model")
    parser.add_argument("--batch-rows", type=int, default=6000, help="big local batch rows")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    opts = SoakOptions(
        duration_s=args.duration,
        healthy=args.healthy,
        rate=args.rate,
        bundle_mb=args.bundle_mb,
        model_mb=args.model_mb,
        batch_rows=args.batch_rows,
    )
    with tempfile.TemporaryDirectory(prefix="edgefleet-soak-") as tmp:
        result = run(opts, Path(tmp))
    lines = report(given, result)
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "decisions"}, default=str))
    if not result.rollout_completed:
        print("rollout decisions:", *result.decisions, sep="\n  ")
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", SECTION, lines)
    return 0 if result.rollout_completed and result.events_lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
