"""Rollout to a fleet of real agents on one machine: wall time, controller CPU and RSS.

Everything is the real code path over real MQTT connections: a Mosquitto this
script starts on a free loopback port; one ``ControllerService`` (default
``ServiceSettings``) in its own process, so its CPU and RSS are its own; and
``--agents`` ``edgefleet.agent.daemon.Agent`` objects spread over
``--workers`` processes, each agent with its own MQTT connection, TUF client,
state directory, slots and HTTP endpoint (port 0), telemetry every
``--telemetry-s`` seconds.

Two phases, measured separately:

1. **deploy**: ``ControllerService.deploy`` of the demo model ``1.0`` to every
   device at once (a plain deployment: every agent downloads and installs
   concurrently). Done when every device reports ``1.0`` active.
2. **rollout**: a staged rollout of ``2.0`` (``RolloutStore.create`` with a
   tag selector; canary, then exponential waves). Done when the rollout is
   ``completed`` with every device ``updated`` and reporting ``2.0`` active.

    python bench/rollout_fleet.py                    # 200 agents, writes BENCHMARKS.md
    python bench/rollout_fleet.py --agents 50 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
    raise_nofile,
    run_controller,
    table,
    write_section,
)

SECTION = "## Rollout to a fleet"
MODEL = "bench-fleet"
TAG = "bench-fleet"

_ctx = mp.get_context("spawn")


def device_ids(n: int) -> list[str]:
    return [f"fleet-{i:04d}" for i in range(n)]


# --------------------------------------------------------------------------- processes
def _controller(
    db_url: str, port: int, repo: str, ids: list[str], commands: Any, done: Any
) -> None:
    """The controller in its own process. Commands: ("deploy", version), ("stop",)."""
    from edgefleet.shared.link import BrokerSettings

    def handle(service: Any, cmd: tuple[Any, ...]) -> tuple[Any, ...]:
        service.deploy(MODEL, cmd[1], ids)
        return ("deployed",)

    run_controller(
        db_url, repo, BrokerSettings(host="127.0.0.1", port=port), commands, done, handle
    )


def _agents(
    ids: list[str],
    port: int,
    state_root: str,
    trust_root: str,
    telemetry_s: float,
    ready: Any,
    stop: Any,
) -> None:
    """Run many real agents in this process until ``stop`` is set."""
    import logging

    from edgefleet.agent.config import AgentConfig, HttpSettings
    from edgefleet.agent.daemon import Agent
    from edgefleet.shared.link import BrokerSettings

    raise_nofile()
    logging.basicConfig(level=logging.ERROR)
    broker = BrokerSettings(host="127.0.0.1", port=port, connect_timeout_s=30)
    agents = []
    for device_id in ids:
        agent = Agent(
            AgentConfig(
                device_id=device_id,
                state_dir=Path(state_root) / device_id,
                trust_root=Path(trust_root),
                telemetry_interval_s=telemetry_s,
                retry_backoff_s=1.0,
                broker=broker,
                http=HttpSettings(port=0),
            )
        )
        agent.start()
        agents.append(agent)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(a.link.connected for a in agents):
        time.sleep(0.1)
    ready.set()
    stop.wait()
    for agent in agents:
        with contextlib.suppress(Exception):
            agent.stop()


# --------------------------------------------------------------------------- measuring
@dataclass
class Watch:
    """CPU and RSS of the controller, broker and agent processes over one phase."""

    procs: dict[str, list[psutil.Process]]
    cpu0: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    peak_fds: dict[str, int] = field(default_factory=dict)

    def _cpu(self, name: str) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.procs[name])

    def start(self) -> None:
        self.cpu0 = {k: self._cpu(k) for k in self.procs}
        self.peak_rss = dict.fromkeys(self.procs, 0)
        self.peak_fds = dict.fromkeys(self.procs, 0)

    def sample(self) -> None:
        for k, ps in self.procs.items():
            self.peak_rss[k] = max(self.peak_rss[k], sum(p.memory_info().rss for p in ps))
            self.peak_fds[k] = max(self.peak_fds[k], sum(p.num_fds() for p in ps))

    def cpu(self) -> dict[str, float]:
        return {k: self._cpu(k) - self.cpu0[k] for k in self.procs}


@dataclass
class Phase:
    name: str
    what: str
    wall_s: float
    cpu: dict[str, float]
    peak_rss: dict[str, int]
    peak_fds: dict[str, int]
    outcome: str
    timeline: list[tuple[float, int]]


def _active_counts(registry: Any, version: str) -> int:
    return sum(1 for d in registry.list_devices() if d.active_version == version)


def _wait(watch: Watch, done: Any, timeout_s: float, poll_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        watch.sample()
        if done():
            return True
        time.sleep(poll_s)
    return False


# --------------------------------------------------------------------------- main run
def run(args: argparse.Namespace, tmp: Path, db_url: str) -> tuple[list[Phase], dict[str, Any]]:
    from edgefleet.controller.catalog import register_model
    from edgefleet.controller.demo_model import build_demo_model
    from edgefleet.controller.registry import Registry
    from edgefleet.controller.rollout.engine import RolloutConfig, RolloutStatus
    from edgefleet.controller.rollout.store import RolloutStore, Selector
    from edgefleet.controller.trust import TrustRepository

    ids = device_ids(args.agents)
    registry = Registry(db_url)
    repository = TrustRepository.init(tmp / "repository")
    register_model(registry, repository, build_demo_model(), name=MODEL, version="1.0")
    register_model(registry, repository, build_demo_model(seed=1), name=MODEL, version="2.0")
    for device_id in ids:
        registry.enroll_device(device_id, tags=[TAG])
    root = tmp / "root.json"
    root.write_bytes(repository.root_bytes())
    del repository  # the controller process owns the repository from here on

    extra: dict[str, Any] = {}
    phases: list[Phase] = []
    with mosquitto(tmp) as broker:
        commands, replies = _ctx.Queue(), _ctx.Queue()
        controller = _ctx.Process(
            target=_controller,
            args=(db_url, broker.port, str(tmp / "repository"), ids, commands, replies),
            name="controller",
        )
        stop_agents = _ctx.Event()
        workers = []
        readies = []
        for w in range(args.workers):
            ready = _ctx.Event()
            workers.append(
                _ctx.Process(
                    target=_agents,
                    args=(
                        ids[w :: args.workers],
                        broker.port,
                        str(tmp / "agents"),
                        str(root),
                        args.telemetry_s,
                        ready,
                        stop_agents,
                    ),
                    name=f"agents-{w}",
                )
            )
            readies.append(ready)
        try:
            controller.start()
            if replies.get(timeout=60)[0] != "started":
                raise RuntimeError("controller did not start")
            t_start = time.monotonic()
            for p in workers:
                p.start()
            for ev in readies:
                if not ev.wait(300):
                    raise RuntimeError("agents did not connect")
            watch = Watch(
                {
                    "controller": [psutil.Process(controller.pid)],
                    "broker": [psutil.Process(broker.pid)],
                    "agents": [psutil.Process(p.pid) for p in workers],
                }
            )
            watch.start()
            if not _wait(
                watch,
                lambda: sum(d.online for d in registry.list_devices()) == len(ids),
                120,
            ):
                raise RuntimeError("not every agent came online")
            extra["startup_s"] = time.monotonic() - t_start

            # Phase 1: plain deploy of 1.0 to everyone at once.
            watch.start()
            timeline: list[tuple[float, int]] = []
            t0 = time.monotonic()
            commands.put(("deploy", "1.0"))

            def deployed() -> bool:
                n = _active_counts(registry, "1.0")
                timeline.append((time.monotonic() - t0, n))
                return n == len(ids)

            ok = _wait(watch, deployed, args.timeout_s)
            phases.append(
                Phase(
                    "deploy",
                    f"`ControllerService.deploy` of {MODEL}@1.0 to all {len(ids)} devices",
                    time.monotonic() - t0,
                    watch.cpu(),
                    dict(watch.peak_rss),
                    dict(watch.peak_fds),
                    "all report 1.0 active"
                    if ok
                    else f"TIMED OUT: {_active_counts(registry, '1.0')}/{len(ids)} on 1.0",
                    timeline,
                )
            )

            # Phase 2: staged rollout of 2.0 over the tag.
            config = RolloutConfig(
                canary_count=args.canary,
                base_rate=args.base_rate,
                increment_factor=2.0,
                max_rate=args.max_rate,
                max_in_flight=args.max_in_flight,
                soak_s=args.soak_s,
                observe_s=args.observe_s,
                device_timeout_s=args.timeout_s,
                min_executed=5,
            )
            store = RolloutStore(registry, actor="bench")
            watch.start()
            timeline = []
            t0 = time.monotonic()
            rollout = store.create(MODEL, "2.0", Selector(tags=(TAG,)), config)
            status = {"s": ""}

            def rolled_out() -> bool:
                info = store.get(rollout.id)
                status["s"] = f"{info.status.value} {info.counts}"
                n = _active_counts(registry, "2.0")
                timeline.append((time.monotonic() - t0, n))
                return info.status not in (RolloutStatus.CREATED, RolloutStatus.RUNNING)

            ok = _wait(watch, rolled_out, args.timeout_s * 3)
            info = store.get(rollout.id)
            active = _active_counts(registry, "2.0")
            good = (
                info.status is RolloutStatus.COMPLETED
                and info.counts == {"updated": len(ids)}
                and active == len(ids)
            )
            waves = [w.devices for w in store.waves(rollout.id)]
            phases.append(
                Phase(
                    "rollout",
                    f"staged rollout of {MODEL}@2.0 (tag selector; waves {waves})",
                    time.monotonic() - t0,
                    watch.cpu(),
                    dict(watch.peak_rss),
                    dict(watch.peak_fds),
                    (
                        f"completed, {active}/{len(ids)} updated and on 2.0"
                        if good
                        else f"NOT completed ({'timed out' if not ok else 'ended'}): "
                        f"{status['s']}, {active}/{len(ids)} on 2.0"
                    ),
                    timeline,
                )
            )
            extra["rollout_config"] = config
        finally:
            stop_agents.set()
            for p in workers:
                p.join(120)
            commands.put(("stop",))
            with contextlib.suppress(Exception):
                while True:
                    msg = replies.get(timeout=60)
                    if msg[0] == "stopped":
                        extra["controller_total_cpu_s"] = msg[1]
                        extra["controller_maxrss"] = msg[2]
                        extra["rejected"] = msg[3]
                        break
            for p in [*workers, controller]:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join(10)
            registry.close()
    return phases, extra


# --------------------------------------------------------------------------- report
HEADERS = [
    "phase",
    "wall s (to all healthy)",
    "controller CPU s",
    "controller peak RSS MB",
    "controller peak fds",
    "broker CPU s",
    "broker peak fds",
    "agents CPU s",
    "agents RSS MB",
    "outcome",
]


def rows(phases: list[Phase]) -> list[list[str]]:
    return [
        [
            p.name,
            f"{p.wall_s:.1f}",
            f"{p.cpu['controller']:.1f}",
            f"{p.peak_rss['controller'] / 2**20:.0f}",
            str(p.peak_fds["controller"]),
            f"{p.cpu['broker']:.1f}",
            str(p.peak_fds["broker"]),
            f"{p.cpu['agents']:.1f}",
            f"{p.peak_rss['agents'] / 2**20:.0f}",
            p.outcome,
        ]
        for p in phases
    ]


def _milestones(timeline: list[tuple[float, int]], total: int) -> str:
    out = []
    for frac in (0.5, 0.9, 1.0):
        need = int(total * frac + 0.999)
        t = next((t for t, n in timeline if n >= need), None)
        if t is not None:
            out.append(f"{frac:.0%} at {t:.1f} s")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--workers", type=int, default=4, help="agent processes")
    ap.add_argument("--telemetry-s", type=float, default=1.0, help="agent telemetry interval")
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--pg-url", default=os.environ.get("EDGEFLEET_BENCH_PG_URL", DEFAULT_PG_URL))
    ap.add_argument("--canary", type=int, default=5)
    ap.add_argument("--base-rate", type=int, default=10)
    ap.add_argument("--max-rate", type=int, default=100)
    ap.add_argument("--max-in-flight", type=int, default=100)
    ap.add_argument("--soak-s", type=float, default=1.0)
    ap.add_argument("--observe-s", type=float, default=2.0)
    ap.add_argument("--timeout-s", type=float, default=180.0, help="per phase / device")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    nofile = raise_nofile()

    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-fleet-") as tmp_s:
        tmp = Path(tmp_s)
        broker_version = mosquitto_release()
        if args.db == "sqlite":
            phases, extra = run(args, tmp, f"sqlite:///{tmp / 'registry.db'}")
        else:
            with postgres_schema(args.pg_url) as url:
                phases, extra = run(args, tmp, url)

    lines = table(HEADERS, rows(phases), set(range(1, 9)))
    notes = [
        f"- {p.name}: {p.what}; devices on the new version: {_milestones(p.timeline, args.agents)}."
        for p in phases
    ]
    startup = extra.get("startup_s", 0.0)
    cfg = extra.get("rollout_config")
    summary = [
        f"- Fleet start (agent processes spawned until all {args.agents} online in the registry):"
        f" {startup:.1f} s. Controller over the whole run: "
        f"{extra.get('controller_total_cpu_s', float('nan')):.1f} CPU s, peak RSS (ru_maxrss) "
        f"{extra.get('controller_maxrss', 0) / 2**20:.0f} MB; rejected messages: "
        f"{extra.get('rejected') or 'none'}.",
    ]
    if cfg is not None:
        summary.append(
            f"- Rollout settings: canary {cfg.canary_count}, base_rate {cfg.base_rate} x"
            f" {cfg.increment_factor:g} up to max_rate {cfg.max_rate}, max_in_flight"
            f" {cfg.max_in_flight}, soak {cfg.soak_s:g} s, observe {cfg.observe_s:g} s;"
            " the controller steps rollouts every 2 s (`ServiceSettings.rollout_interval_s`)."
        )
    print("\n".join(lines))
    print("\n".join(notes + summary))
    if args.no_write:
        return 0
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/rollout_fleet.py" + (
        " " + " ".join(shlex.quote(a) for a in given) if given else ""
    )
    body = [
        f"Command: `{command}` (from the repository root, venv active).",
        f"Machine: {machine_line()}. Broker: {broker_version}, started by the script on a free"
        f" loopback port (`max_connections -1`); open-file limit raised to {nofile}.",
        f"{args.agents} real agents (`edgefleet.agent.daemon.Agent`, each with its own MQTT"
        f" connection, state dir, TUF client and HTTP endpoint on port 0; telemetry every"
        f" {args.telemetry_s:g} s) in {args.workers} worker processes; one `ControllerService`"
        f" (default `ServiceSettings`) in its own process on {args.db}. CPU s are user+system"
        " of that process during the phase (psutil); RSS and fds are peaks sampled every"
        " 0.25 s. Wall time runs from the deploy call (or `RolloutStore.create`) until every"
        " device reports the version active (and, for the rollout, the rollout is completed"
        " with every device `updated`), as seen in the registry.",
        "",
        *lines,
        "",
        *notes,
        *summary,
    ]
    write_section(args.output, SECTION, body)
    print(f"\nwrote {SECTION!r} in {args.output}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
