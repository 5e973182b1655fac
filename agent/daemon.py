"""The agent daemon: MQTT link, reconcile loop, install pipeline, serving, telemetry.

Threads, and why each exists:

- paho's network thread runs the handlers in this module. They only decode,
  check and hand over (a desired state to the reconcile loop, a block frame
  to the fetcher), because a slow handler would stall every message -
  including the blocks an install waits for.
- The *reconcile* thread runs :func:`edgefleet.agent.reconcile.decide` and the
  install pipeline, one install at a time.
- The *telemetry* thread publishes serving aggregates every interval.
- The *events* thread publishes again what the event journal holds without
  an acknowledgement: all of it after a reconnect, and what waited more
  than ``event_resend_s`` (the controller's connection may have dropped
  while ours stayed up). Every event is journaled (fsynced) before it is
  first published, and forgotten when ``events/ack`` covers it.
- The HTTP server's threads serve inference from the live model.
- The *main* thread (:meth:`Agent.run`) supervises: it tells systemd the agent
  is ready, then pings systemd's watchdog while every loop above still turns
  (:meth:`Agent.health_problem`), so a hung agent is restarted
  (:mod:`edgefleet.agent.systemd`).

What the agent publishes (all under ``edgefleet/v1/devices/{id}/``):
``status`` (retained ``online``; the Last Will sets ``offline``),
``reported`` (retained :class:`ReportedState`), ``events`` and ``telemetry``.
It reads ``desired``, ``files/blocks`` and ``events/ack``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from edgefleet import __version__
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.enroll import prepare_identity
from edgefleet.agent.fetcher import MqttFetcher, PartialStore
from edgefleet.agent.install import Installer
from edgefleet.agent.journal import EventJournal
from edgefleet.agent.metrics import (
    ActiveModelInfo,
    InstallCounter,
    ProcessSampler,
    PrometheusExporter,
    RejectionCounter,
    ServingMetrics,
)
from edgefleet.agent.reconcile import (
    Attempt,
    Backoff,
    IntentKey,
    decide,
    intent_key,
    record_failure,
)
from edgefleet.agent.serving import InferenceServer, ModelHolder
from edgefleet.agent.slots import SlotRecord, SlotStore
from edgefleet.agent.systemd import SystemdNotifier, watchdog_interval_s
from edgefleet.protocols.bundle import BundleManifest
from edgefleet.protocols.errors import (
    AgentError,
    ConfigError,
    ProtocolError,
    SlotError,
    VerificationError,
)
from edgefleet.protocols.messages import (
    AgentState,
    DesiredState,
    ErrorInfo,
    Event,
    EventAck,
    EventKind,
    ModelRef,
    ReportedState,
    Telemetry,
)
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.durable import ensure_private_dir
from edgefleet.shared.hardware import detect_hardware
from edgefleet.shared.link import LinkFactory, Will, mqtt_links

__all__ = ["STATUS_OFFLINE", "STATUS_ONLINE", "Agent"]

log = logging.getLogger(__name__)

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"

# READY=1 waits for the broker at most this long. A gateway that cannot reach
# its controller still serves its model, so it must not sit in "activating"
# until systemd's start timeout kills it (the unit's TimeoutStartSec is longer).
READY_WITHOUT_BROKER_S = 60.0
# A loop that has not turned for this long (and at least the watchdog timeout)
# is stuck: the watchdog is no longer pinged.
MIN_STALL_S = 5.0


class Agent:
    """One gateway's agent. ``start()``/``stop()`` for embedding, ``run()`` for a daemon."""

    def __init__(self, config: AgentConfig, *, links: LinkFactory | None = None) -> None:
        # Enroll on first start; refuse a private key others can read (agent/enroll.py).
        broker, trust_root = prepare_identity(
            config.device_id,
            config.state_dir,
            config.broker,
            config.trust_root,
            config.enrollment,
        )
        config = config.with_overrides(broker=broker, trust_root=trust_root)
        self.config = config
        self.device_id = config.device_id
        state_dir = config.state_dir
        try:
            # Owner-only (0700) whatever the umask: slots, releases.json and the
            # partial downloads are nobody else's business (issue 9, item 10).
            ensure_private_dir(state_dir)
        except OSError as exc:
            raise ConfigError(f"cannot make state_dir {state_dir} owner-only: {exc}") from exc
        self.hardware = detect_hardware(config.hardware_class)
        self.rejections = RejectionCounter()
        self.metrics = ServingMetrics()
        self._sampler = ProcessSampler()
        self.holder = ModelHolder()
        self.journal = EventJournal(state_dir, resend_after_s=config.event_resend_s)
        self._replay_all = threading.Event()
        self._ack_ready = threading.Event()
        self._pending_ack: EventAck | None = None
        # ``links`` (unit tests: ``MemoryBroker.link``) replaces MQTT to the
        # broker named by the config or by enrollment.
        self.link = (links or mqtt_links(config.broker))(
            f"edgefleet-agent-{self.device_id}",
            will=Will(self._topic(Channel.STATUS), STATUS_OFFLINE, qos=1, retain=True),
            on_connect=self._on_connect,
        )
        self.fetcher = MqttFetcher(
            self.link,
            self.device_id,
            PartialStore(state_dir / "partial"),
            config.transfer,
            on_progress=self._on_progress,
            on_reject=self.rejections.count,
        )
        self.slots = SlotStore(state_dir)
        self.installer = Installer(
            state_dir,
            self.fetcher,
            self.slots,
            self.holder,
            self.hardware,
            runtime_threads=config.runtime_threads,
            notify=self._on_install_stage,
            on_corrupt_slot=self._on_corrupt_slot,
        )
        self.installer.bootstrap_trust(config.trust_root)
        # GET /metrics (Prometheus): read at scrape time from the recorders above.
        self.install_counts = InstallCounter()
        self._model_info_cache: tuple[ModelRef, ActiveModelInfo] | None = None
        self.exporter = PrometheusExporter(
            self.metrics,
            model=self._model_info,
            rejections=self.rejections,
            installs=self.install_counts,
            labels={"version": __version__, "device_id": self.device_id},
            sampler=self._sampler,
        )
        self.server = InferenceServer(
            self.holder,
            self.metrics,
            host=config.http.host,
            port=config.http.port,
            max_body_bytes=config.http.max_body_bytes,
            allow_remote=config.http.allow_remote,
            token=config.http.token,
            exporter=self.exporter,
        )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._desired: DesiredState | None = None
        self._attempts: dict[IntentKey, Attempt] = {}
        self._backoff = Backoff(config.retry_backoff_s, config.retry_backoff_max_s)
        self._state = AgentState.IDLE
        self._last_error: ErrorInfo | None = None
        self._acked: tuple[str | None, int] = (None, 0)
        self._last_progress_at = 0.0
        self._threads: list[threading.Thread] = []
        self._window_started = time.monotonic()
        self.installs = 0
        # Loop name -> when it last turned (monotonic); see health_problem().
        self._beats: dict[str, float] = {}
        self.notifier = SystemdNotifier()

    def _topic(self, channel: Channel) -> str:
        return str(DeviceTopic(self.device_id, channel))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load the installed model, start serving, connect, and start the loops.

        The broker connection is made in the background and retried forever:
        a gateway on a flaky link must serve its model whether or not the
        controller is reachable.
        """
        restored = self.installer.restore()
        if restored is not None:
            log.info("serving installed model %s", restored.label)
        self.server.start()
        self.link.subscribe(self._topic(Channel.DESIRED), self._on_desired, qos=1)
        self.link.subscribe(self._topic(Channel.FILE_BLOCKS), self.fetcher.on_frame, qos=1)
        self.link.subscribe(self._topic(Channel.EVENTS_ACK), self._on_event_ack, qos=1)
        self.link.start(wait=False)
        for name, target in (
            ("reconcile", self._reconcile_loop),
            ("telemetry", self._telemetry_loop),
            ("events", self._events_loop),
        ):
            t = threading.Thread(target=target, name=f"{name}-{self.device_id}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("agent %s started; inference on %s", self.device_id, self.server.url)

    def stop(self, *, clean: bool = True) -> None:
        """Stop everything. ``clean=False`` simulates a crash (no goodbye, Last Will fires)."""
        self._stop.set()
        self._wake.set()
        self.fetcher.cancel()
        if clean and self.link.connected:
            self.link.publish(
                self._topic(Channel.STATUS), STATUS_OFFLINE, qos=1, retain=True, wait_s=2.0
            )
        for t in self._threads:
            t.join(timeout=30)
        self.link.stop(clean=clean)
        self.server.stop()

    def run(self) -> None:
        """Run until SIGTERM or SIGINT (the systemd unit's stop)."""

        def _terminate(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, _terminate)
        signal.signal(signal.SIGINT, _terminate)
        self.start()
        try:
            self._supervise()
        finally:
            self.notifier.notify("STOPPING=1", "STATUS=stopping")
            self.stop()
            self.notifier.close()

    def _supervise(self) -> None:
        """The main loop: READY=1 once connected and serving, then WATCHDOG=1 while healthy."""
        interval = watchdog_interval_s()
        stall_s = max(MIN_STALL_S, 2 * interval) if interval is not None else MIN_STALL_S
        tick = 1.0 if interval is None else min(1.0, interval / 2)
        started = time.monotonic()
        ready = False
        next_ping = started
        reported: str | None = None
        while not self._stop.wait(tick):
            now = time.monotonic()
            if not ready and (self.link.connected or now - started >= READY_WITHOUT_BROKER_S):
                ready = True
                how = "connected" if self.link.connected else "broker not reachable yet"
                self.notifier.notify("READY=1", f"STATUS=serving on {self.server.url}; {how}")
            if interval is None or now < next_ping:
                continue
            problem = self.health_problem(now, stall_s)
            if problem is None:
                self.notifier.notify("WATCHDOG=1")
                next_ping = now + interval
                if reported is not None:
                    log.warning("agent healthy again; watchdog pings resume")
                    self.notifier.notify(f"STATUS=serving on {self.server.url}")
                reported = None
            elif problem != reported:
                # No ping: systemd restarts the agent when WatchdogSec passes.
                log.error("not pinging the watchdog: %s", problem)
                self.notifier.notify(f"STATUS=unhealthy: {problem}")
                reported = problem

    def health_problem(self, now: float | None = None, stall_s: float = MIN_STALL_S) -> str | None:
        """Why the agent is not healthy, or ``None``.

        Unhealthy: a worker thread died, or the events loop (turns at least
        every second) has not turned for ``stall_s``, or the telemetry loop
        not for its interval plus ``stall_s`` - for example a deadlock on the
        agent's lock, which both take. The reconcile thread only has to be
        alive: an install may legitimately take minutes.
        """
        now = time.monotonic() if now is None else now
        for t in self._threads:
            if not t.is_alive():
                return f"thread {t.name} died"
        limits = {"events": stall_s, "telemetry": self.config.telemetry_interval_s + stall_s}
        for loop, limit in limits.items():
            beat = self._beats.get(loop)
            if beat is not None and now - beat > limit:
                return f"the {loop} loop has not run for {now - beat:.0f}s"
        return None

    # ------------------------------------------------------------------ status
    @property
    def active_model(self) -> ModelRef | None:
        current = self.holder.current()
        return None if current is None else current[1]

    def _model_info(self) -> ActiveModelInfo | None:
        """The served model's metric labels, with variant and runtime from its slot's manifest.

        Read once per model (cached by reference), not once per scrape.
        """
        current = self.holder.current()
        if current is None:
            return None
        ref = current[1]
        cached = self._model_info_cache
        if cached is not None and cached[0] == ref:
            return cached[1]
        info = ActiveModelInfo(ref.name, ref.version, ref.release)
        record = self.slots.active()
        if record is not None and record.model == ref:
            try:
                manifest = BundleManifest.decode((record.path / "manifest.json").read_bytes())
            except (OSError, ProtocolError) as exc:
                log.warning("no variant for the metrics of %s: %s", ref.label, exc)
            else:
                info = ActiveModelInfo(
                    ref.name,
                    ref.version,
                    ref.release,
                    variant=manifest.hardware_class,
                    precision=manifest.precision,
                    runtime=manifest.runtime,
                )
                self._model_info_cache = (ref, info)
        return info

    def reported_state(self) -> ReportedState:
        previous = self.slots.previous()
        with self._lock:
            deployment_id, generation = self._acked
            return ReportedState(
                device_id=self.device_id,
                state=self._state,
                active=self.active_model,
                previous=None if previous is None else previous.model,
                hardware=self.hardware,
                generation=generation,
                deployment_id=deployment_id,
                last_error=self._last_error,
                agent_version=__version__,
                updated_at=time.time(),
            )

    def _publish_reported(self) -> None:
        self.link.publish(
            self._topic(Channel.REPORTED), self.reported_state().encode(), qos=1, retain=True
        )

    def _emit(
        self,
        kind: EventKind,
        model: ModelRef | None,
        error: ErrorInfo | None = None,
        *,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
        **extra: Any,
    ) -> None:
        desired = self._desired
        at = time.time()

        def encode(journal: str, seq: int) -> bytes:
            return Event(
                device_id=self.device_id,
                kind=kind,
                generation=0 if desired is None else desired.generation,
                deployment_id=None if desired is None else desired.deployment_id,
                model=model,
                error=error,
                bytes_done=bytes_done,
                bytes_total=bytes_total,
                at=at,
                journal=journal,
                seq=seq,
                extra=extra,
            ).encode()

        # Journaled (fsynced) first, then published; re-sent until acknowledged.
        self.link.publish(self._topic(Channel.EVENTS), self.journal.append(encode), qos=1)

    # ------------------------------------------------------------------ handlers (paho thread)
    def _on_connect(self) -> None:
        self.link.publish(self._topic(Channel.STATUS), STATUS_ONLINE, qos=1, retain=True)
        self._publish_reported()
        self._replay_all.set()  # the events thread re-sends every unacknowledged event

    def _on_event_ack(self, _topic: str, payload: bytes, _retained: bool) -> None:
        try:
            ack = EventAck.decode(payload)
        except ProtocolError as exc:
            log.warning("rejected malformed event ack: %s", exc)
            self.rejections.count("malformed_event_ack")
            return
        if ack.device_id != self.device_id:
            self.rejections.count("wrong_device")
            return
        # Compacting the journal writes and fsyncs a file: not on paho's
        # thread. The events thread applies the latest ack.
        with self._lock:
            self._pending_ack = ack
        self._ack_ready.set()

    def _on_desired(self, topic: str, payload: bytes, _retained: bool) -> None:
        try:
            desired = DesiredState.decode(payload)
        except ProtocolError as exc:
            log.warning("rejected malformed desired state on %s: %s", topic, exc)
            self.rejections.count("malformed_desired")
            return
        if desired.device_id != self.device_id:
            log.warning("rejected desired state addressed to %s", desired.device_id)
            self.rejections.count("wrong_device")
            return
        with self._lock:
            if self._desired == desired:
                return  # a replayed retained message changes nothing
            self._desired = desired
        log.info(
            "desired state: generation %d, model %s",
            desired.generation,
            desired.model.label if desired.model else "none",
        )
        self._wake.set()

    def _on_progress(self, _path: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last_progress_at < 1.0:
            return
        self._last_progress_at = now
        desired = self._desired
        self._emit(
            EventKind.DOWNLOAD_PROGRESS,
            None if desired is None else desired.model,
            bytes_done=done,
            bytes_total=total,
        )

    def _on_install_stage(self, stage: str, model: ModelRef) -> None:
        if stage == "verified":
            self._emit(EventKind.VERIFIED, model)
        elif stage == "downloading":
            self._set_state(AgentState.DOWNLOADING)
            self._emit(EventKind.DOWNLOAD_STARTED, model)

    def _on_corrupt_slot(self, record: SlotRecord, problem: str) -> None:
        # The agent heals by itself (the slot is gone; the bundle is downloaded
        # again when wanted), but a disk that corrupts files is something an
        # operator must see. Published QoS 1: queued until connected at startup.
        error = ErrorInfo(
            SlotError.code, f"kept slot {record.slot} is corrupt ({problem}); discarded"
        )
        self._emit(EventKind.INSTALL_FAILED, record.model, error, slot=record.slot, discarded=True)

    def _set_state(
        self, state: AgentState, error: ErrorInfo | None = None, *, clear_error: bool = False
    ) -> None:
        with self._lock:
            self._state = state
            if error is not None:
                self._last_error = error
            elif clear_error:
                self._last_error = None
        self._publish_reported()

    # ------------------------------------------------------------------ reconcile loop
    def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reconcile_once()
            except Exception:  # the loop must outlive any bug; try again shortly
                log.exception("reconcile step failed")
                self._wake.wait(self.config.retry_backoff_s)

    def _reconcile_once(self) -> None:
        self._wake.clear()
        with self._lock:
            desired = self._desired
        decision = decide(desired, self.active_model, self._attempts, time.monotonic())
        if decision.install is not None and desired is not None:
            self._install(desired)
            return
        if decision.already_active and desired is not None:
            self._acknowledge(desired)
        self._wake.wait(decision.wait_s if decision.wait_s is not None else 30.0)

    def _acknowledge(self, desired: DesiredState) -> None:
        ack = (desired.deployment_id, desired.generation)
        with self._lock:
            changed = self._acked != ack or self._state is not AgentState.IDLE
            self._acked = ack
            if changed:
                self._state = AgentState.IDLE
                self._last_error = None
        if changed:
            self._publish_reported()

    def _install(self, desired: DesiredState) -> None:
        want = desired.model
        assert want is not None
        key = intent_key(desired)
        assert key is not None
        self._set_state(AgentState.INSTALLING)
        started = time.monotonic()
        try:
            outcome = self.installer.install(want)
        except AgentError as exc:
            self._failed(desired, key, exc)
            return
        except Exception as exc:  # never let a bug kill the reconcile thread
            log.exception("install of %s crashed", want.label)
            self._failed(desired, key, AgentError(f"{type(exc).__name__}: {exc}"))
            return
        self.installs += 1
        self.install_counts.installed()
        self._attempts.pop(key, None)
        with self._lock:
            self._acked = (desired.deployment_id, desired.generation)
        log.info(
            "installed %s in %.2fs (%s)",
            want.label,
            time.monotonic() - started,
            "downloaded" if outcome.downloaded else "from a kept slot",
        )
        self._emit(EventKind.INSTALLED, want, downloaded=outcome.downloaded)
        self._set_state(AgentState.IDLE, clear_error=True)

    def _failed(self, desired: DesiredState, key: IntentKey, exc: AgentError) -> None:
        want = desired.model
        error = ErrorInfo(exc.code, str(exc))
        record_failure(self._attempts, key, exc, time.monotonic(), self._backoff)
        self.install_counts.failed(exc.code, refused=isinstance(exc, VerificationError))
        with self._lock:
            self._acked = (desired.deployment_id, desired.generation)
        log.error("install of %s failed (%s): %s", want.label if want else "?", exc.code, exc)
        # A refusal on trust grounds is an attack signal an operator must see
        # as such, not a mere failed install.
        kind = (
            EventKind.REJECTED if isinstance(exc, VerificationError) else EventKind.INSTALL_FAILED
        )
        self._emit(kind, want, error)
        self._set_state(AgentState.FAILED, error)

    # ------------------------------------------------------------------ telemetry loop
    def telemetry(self) -> Telemetry:
        """Close the current window and summarise it."""
        with self._lock:
            now = time.monotonic()
            window_s, self._window_started = now - self._window_started, now
        stats = self.metrics.take_window()
        return Telemetry(
            device_id=self.device_id,
            window_s=window_s,
            requests=stats.requests,
            errors=stats.errors,
            latency_ms=stats.latency,
            samples=stats.samples,
            sample_latency_ms=stats.sample_latency,
            model=self.active_model,
            rss_bytes=self._sampler.rss_bytes(),
            cpu_percent=self._sampler.cpu_percent(),
            rejected=self.rejections.snapshot(),
            at=time.time(),
        )

    def _events_loop(self) -> None:
        """Re-send journaled events the controller has not acknowledged (see the module doc)."""
        while not self._stop.is_set():
            self._beats["events"] = time.monotonic()
            self._ack_ready.wait(1.0)
            self._ack_ready.clear()
            with self._lock:
                ack, self._pending_ack = self._pending_ack, None
            if ack is not None:
                self.journal.acknowledge(ack.journal, ack.seq)
            if not self.link.connected:
                continue
            everything = self._replay_all.is_set()
            self._replay_all.clear()
            for payload in self.journal.due(everything=everything):
                self.link.publish(self._topic(Channel.EVENTS), payload, qos=1)

    def _telemetry_loop(self) -> None:
        self._beats["telemetry"] = time.monotonic()
        while not self._stop.wait(self.config.telemetry_interval_s):
            point = self.telemetry()
            self._beats["telemetry"] = time.monotonic()
            self.link.publish(self._topic(Channel.TELEMETRY), point.encode(), qos=0)

    def flush_telemetry(self) -> None:
        """Publish a telemetry window now (the demo uses it to report promptly)."""
        self.link.publish(
            self._topic(Channel.TELEMETRY), self.telemetry().encode(), qos=1, wait_s=5.0
        )
