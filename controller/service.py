"""The controller's MQTT side: desired state out; reports, telemetry and file requests in.

Threads, and why:

- paho's network thread only classifies each message by topic and queues it.
- The *transfer* worker answers ``files/request`` with block frames. It is
  separate from ingestion so a burst of telemetry never delays an install.
- The *ingest* worker decodes reports, status, events and telemetry and writes
  them to the registry in batches (one transaction per batch, not per message).
- The *rollouts* loop steps every active staged rollout (one transaction
  per rollout under its row lock, so controllers sharing a database never
  take a step twice) and wakes the outbox when desired states changed. It
  runs only with ``run_rollouts``.
- The *telemetry* loop folds raw telemetry windows into per-minute rows and
  applies both retentions, every ``telemetry_rollup_interval_s``. It runs
  whether or not this controller steps rollouts: a controller that does not
  must still keep the telemetry tables bounded.
- The *maintenance* loop publishes desired states the registry marks as
  unpublished (an outbox: a deploy made while the broker was down is sent
  later, and a restart re-sends nothing twice that changes anything), and
  re-signs TUF timestamp metadata before it expires. After a (re)connect it
  re-publishes every desired state only if the broker lost them: the
  retained outbox marker (``OUTBOX_MARKER_TOPIC``) it gets back must carry
  the digest of what the registry says was published.

Events are numbered by the agents' journals: the ingest worker stores each
(device, journal, seq) once and acknowledges, per device, the highest number
stored without a gap on ``events/ack`` (:class:`EventAck`). An agent replays
what is not acknowledged, so losing this connection loses no event.

Every malformed, impersonating or unknown-device message is logged and
counted under a reason in ``Registry.counters`` (``rejected.<reason>``), and
for an enrolled device also under ``device_rejected.<device>.<reason>``;
nothing a device sends can crash a worker. What a device can make us store
is bounded: values are range-checked by the parsers, ``at`` must be within
``max_clock_skew_s`` of our clock (``clock_skew``), each device keeps at most
``max_events_per_device`` events (``event_cap``), events expire after
``event_retention_s``, and agent-reported rejection reasons come from a
fixed set (:mod:`edgefleet.protocols.bounds`), so counter rows per device
are bounded too.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Generic, TypeVar

from edgefleet.controller.compiler.errors import ProfileError
from edgefleet.controller.compiler.profiles import BUILTIN_PROFILES, Profile, match_profile
from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.presence import DUPLICATE_EVENT_KIND, Duplicate, PresenceTracker
from edgefleet.controller.registry import DeploymentInfo, Registry
from edgefleet.controller.registry.counters import device_rejected_name
from edgefleet.controller.registry.telemetry import rollup_telemetry
from edgefleet.controller.rollout.runner import RolloutRunner
from edgefleet.controller.transfer import RefusalReason, TransferLimits, TransferServer
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.bounds import fold_reasons
from edgefleet.protocols.errors import ProtocolError, TopicError
from edgefleet.protocols.messages import (
    Event,
    EventAck,
    FileRequest,
    Message,
    ReportedState,
    Telemetry,
)
from edgefleet.protocols.topics import (
    OUTBOX_MARKER_TOPIC,
    Channel,
    DeviceTopic,
    controller_subscriptions,
)
from edgefleet.shared.link import BrokerSettings, Link, LinkFactory, mqtt_links

__all__ = ["ControllerService", "IngestHandoff", "publish_desired_states"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_STATUS_VALUES = {b"online": True, b"offline": False}
# File requests admitted per transfer-loop turn before frames are sent again.
_REQUESTS_PER_TURN = 256
# A FileRequest is a few hundred bytes (256 ranges at most: a few KiB); the
# request queue holds at most _MAX_QUEUED_REQUESTS of them, so at most 32 MiB.
_MAX_FILE_REQUEST_BYTES = 16 * 1024
_MAX_QUEUED_REQUESTS = 2_000


def transfer_limits(settings: ServiceSettings) -> TransferLimits:
    """The transfer server's bounds from the ``[service]`` table."""
    return TransferLimits(
        max_block_size_bytes=settings.transfer_max_block_size_bytes,
        max_blocks_per_request=settings.max_blocks_per_request,
        max_request_bytes=settings.transfer_max_request_bytes,
        device_inflight_bytes=settings.transfer_device_inflight_bytes,
        total_inflight_bytes=settings.transfer_total_inflight_bytes,
        busy_requests_per_s=settings.transfer_busy_requests_per_s,
        busy_request_burst=settings.transfer_busy_request_burst,
        retry_after_s=settings.transfer_retry_after_s,
    )


def publish_desired_states(
    registry: Registry, link: Link, *, everything: bool = False, wait_s: float = 5.0
) -> int:
    """Publish desired states not yet acknowledged by the broker; returns how many.

    Desired states are retained, QoS 1: the broker hands the latest one to a
    device whenever it (re)subscribes, so an offline device catches up. With
    ``everything``, re-publish all of them (after a reconnect to a broker
    that lost its retained messages; agents ignore repeats).

    Then the outbox marker is published, retained: the digest of every
    published generation. It is sent after the states it covers, so a broker
    that still holds it holds them too (see ``ControllerService``).
    """
    sent = 0
    pending = registry.all_desired() if everything else registry.unpublished_desired()
    for desired in pending:
        topic = str(DeviceTopic(desired.device_id, Channel.DESIRED))
        if link.publish(topic, desired.encode(), qos=1, retain=True, wait_s=wait_s):
            registry.mark_published(desired.device_id, desired.generation)
            sent += 1
        else:
            log.warning(
                "broker did not acknowledge desired state for %s; will retry", desired.device_id
            )
            break
    if sent or everything:
        marker = registry.published_digest().encode()
        if not link.publish(OUTBOX_MARKER_TOPIC, marker, qos=1, retain=True, wait_s=wait_s):
            log.warning("broker did not acknowledge the outbox marker; reconnects re-publish all")
    return sent


class IngestHandoff(Generic[_T]):
    """A lock-free FIFO from paho's thread to the ingest worker.

    A ``collections.deque`` (``append``/``popleft`` are atomic under the
    GIL) plus an event the producer sets only when the consumer may be
    asleep, so the common case costs one append and one attribute read;
    ``queue.Queue`` took a lock and a condition per message on both sides.

    The consumer must call :meth:`wait` only after :meth:`take` found it
    empty: ``wait`` clears the wake-up before looking again, so an item
    appended at any moment either is seen or sets the event.
    """

    def __init__(self) -> None:
        self._items: deque[_T] = deque()
        self._wake = threading.Event()

    def put(self, item: _T) -> None:
        self._items.append(item)
        if not self._wake.is_set():  # a plain read; the lock only when needed
            self._wake.set()

    def take(self, into: list[_T], limit: int) -> None:
        """Move items into ``into`` until it holds ``limit`` or none are left."""
        items = self._items
        while items and len(into) < limit:
            into.append(items.popleft())

    def wait(self, timeout_s: float) -> None:
        """Sleep until an item may be there or ``timeout_s`` passed."""
        self._wake.clear()
        if not self._items:
            self._wake.wait(timeout_s)

    # queue.Queue's names, for callers (tests, benchmarks) that look inside.
    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> _T:
        """The oldest item; ``IndexError`` when empty."""
        return self._items.popleft()


class ControllerService:
    """Runs the controller's MQTT side until :meth:`stop`."""

    def __init__(
        self,
        registry: Registry,
        repository: TrustRepository,
        broker: BrokerSettings,
        settings: ServiceSettings = ServiceSettings(),
        *,
        profiles: Mapping[str, Profile] | None = None,
        links: LinkFactory | None = None,
        ingest_telemetry: bool = True,
        ingest_only: bool = False,
    ) -> None:
        self.registry = registry
        # Telemetry may be ingested by worker processes instead (controller/
        # ingest.py): then this service does not subscribe to it
        # (``ingest_telemetry=False``), and each worker runs a service with
        # ``ingest_only`` that subscribes to telemetry alone and runs only the
        # ingest worker (no outbox, transfers, rollouts or rollups).
        self._ingest_telemetry = ingest_telemetry or ingest_only
        self._ingest_only = ingest_only
        self.profiles = dict(profiles) if profiles is not None else dict(BUILTIN_PROFILES)
        self.repository = repository
        self.settings = settings
        registry.limit_device_counters(settings.max_counter_rows_per_device)
        # ``links`` (unit tests: ``MemoryBroker.link``) replaces MQTT to ``broker``.
        self.link = (links or mqtt_links(broker))(settings.client_id, on_connect=self._on_connect)
        self._transfer_wake = threading.Event()
        self.transfers = TransferServer(
            repository,
            lambda topic, payload, on_sent: self.link.publish(
                topic, payload, qos=1, on_sent=on_sent
            ),
            transfer_limits(settings),
            on_capacity=self._transfer_wake.set,
        )
        self._ingest: IngestHandoff[tuple[DeviceTopic, bytes, bool]] = IngestHandoff()
        self._requests: queue.Queue[tuple[DeviceTopic, bytes]] = queue.Queue(
            maxsize=_MAX_QUEUED_REQUESTS
        )
        self._stop = threading.Event()
        self._wake_outbox = threading.Event()
        # Set on every connect: the outbox marker the broker hands back decides
        # whether desired states must be re-published (see _maintenance_loop).
        self._check_outbox = threading.Event()
        self._marker_seen = threading.Event()
        self._marker: bytes | None = None
        self._threads: list[threading.Thread] = []
        self._rejected: Counter[str] = Counter()
        self._device_rejected: Counter[tuple[str, str]] = Counter()
        self._rejected_lock = threading.Lock()
        self._known: set[str] = set()
        self._profiles_seen: dict[str, str | None] = {}
        self._unknown: dict[str, float] = {}
        self._agent_rejected: dict[str, int] = {}
        # Per device: its journal and the highest seq acknowledged (see _store_events).
        self._event_marks: dict[str, tuple[str, int]] = {}
        # Liveness and duplicate device ids (controller/presence.py); ingest thread only.
        self.presence = PresenceTracker()
        self.ingested = 0
        self.rollouts = RolloutRunner(registry, repository, actor=settings.client_id)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Connect and start the workers.

        Raises:
            BrokerError: the broker cannot be reached.
        """
        # Enrolled ids are cached for good (see _is_known); load them in one
        # query instead of one lookup per device as its first message arrives.
        self._known.update(d.id for d in self.registry.list_devices())
        group = self.settings.share_group
        telemetry = DeviceTopic.wildcard(Channel.TELEMETRY)
        for topic_filter in controller_subscriptions():
            if (topic_filter == telemetry and not self._ingest_telemetry) or (
                topic_filter != telemetry and self._ingest_only
            ):
                continue
            shared = f"$share/{group}/{topic_filter}" if group else topic_filter
            self.link.subscribe(shared, self._on_message, qos=1)
        loops: list[tuple[str, Callable[[], None]]]
        if self._ingest_only:
            loops = [("ingest", self._ingest_loop), ("flush", self._flush_loop)]
        else:
            self.link.subscribe(OUTBOX_MARKER_TOPIC, self._on_marker, qos=1)
            loops = [
                ("transfer", self._transfer_loop),
                ("ingest", self._ingest_loop),
                ("maintenance", self._maintenance_loop),
                ("telemetry", self._telemetry_loop),
                *([("rollouts", self._rollout_loop)] if self.settings.run_rollouts else []),
            ]
        self.link.start(wait=True)
        for name, target in loops:
            t = threading.Thread(target=target, name=f"controller-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._wake_outbox.set()
        for t in self._threads:
            t.join(timeout=10)
        self.link.stop()
        self.flush_rejections()

    def run_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # ------------------------------------------------------------------ operations
    def deploy(self, model: str, version: str, device_ids: Sequence[str]) -> DeploymentInfo:
        """Record a deployment and publish the new desired states now."""
        mv = self.registry.get_model_version(model, version)
        deployment = self.registry.create_deployment(mv.id, device_ids)
        self._wake_outbox.set()
        return deployment

    def _on_connect(self) -> None:
        # A reconnect may follow a broker restart that lost retained messages.
        # The marker delivered after this hook (same paho thread, so not
        # before it) tells; the maintenance loop waits for it and decides.
        self._marker = None
        self._marker_seen.clear()
        self._check_outbox.set()
        self._wake_outbox.set()

    def _on_marker(self, _topic: str, payload: bytes, retained: bool) -> None:
        # Only the retained copy says what the broker holds; a live one is
        # our own (or another publisher's) marker going by.
        if retained:
            self._marker = payload
            self._marker_seen.set()

    # ------------------------------------------------------------------ paho thread
    def reject(self, reason: str, detail: str, *, device_id: str | None = None) -> None:
        """Log and count a refused message; ``device_id`` only for an enrolled device.

        Only enrolled devices get a per-device counter, so a flood of
        invented ids cannot create counter rows.
        """
        log.warning("rejected message (%s): %s", reason, detail)
        with self._rejected_lock:
            self._rejected[reason] += 1
            if device_id is not None:
                self._device_rejected[(device_id, reason)] += 1

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            parsed = DeviceTopic.parse(topic)
        except TopicError as exc:
            self.reject("bad_topic", str(exc))
            return
        if parsed.channel is Channel.FILE_REQUEST:
            if len(payload) > _MAX_FILE_REQUEST_BYTES:
                # Not queued at all: the queue's bound is in requests, so its
                # memory is bounded only if each request is small.
                self.reject("malformed_file_request", f"{len(payload)}-byte file request")
                return
            try:
                self._requests.put_nowait((parsed, payload))
            except queue.Full:
                # Counted per device only for enrolled ids (bounded names);
                # always in rejected.transfer_queue_full.
                device = parsed.device_id if parsed.device_id in self._known else None
                self.transfers.count_refusal(device, RefusalReason.QUEUE_FULL)
                log.warning("dropped file request from %s: request queue full", parsed.device_id)
            self._transfer_wake.set()
        else:
            self._ingest.put((parsed, payload, retained))

    # ------------------------------------------------------------------ workers
    def _is_known(self, device_id: str) -> bool:
        """Whether the device is enrolled.

        Enrolled ids are cached for good (devices are not deleted); a miss
        asks the registry for that one id at once - a device enrolled a moment
        ago must not lose its retained status or report - and is remembered as
        unknown for ``known_devices_ttl_s`` so a flood of strangers costs at
        most one lookup per id and period.
        """
        if device_id in self._known:
            return True
        now = time.monotonic()
        checked = self._unknown.get(device_id)
        if checked is not None and now - checked < self.settings.known_devices_ttl_s:
            return False
        if self.registry.get_device(device_id) is not None:
            self._known.add(device_id)
            self._unknown.pop(device_id, None)
            return True
        if len(self._unknown) > 10_000:
            self._unknown.clear()
        self._unknown[device_id] = now
        return False

    def _decode(self, topic: DeviceTopic, payload: bytes, kind: type[Message]) -> Message | None:
        try:
            message = kind.decode(payload)
        except ProtocolError as exc:
            known = self._is_known(topic.device_id)
            self.reject(
                f"malformed_{topic.channel.name.lower()}",
                f"{topic.device_id}: {exc}",
                device_id=topic.device_id if known else None,
            )
            return None
        device_id = getattr(message, "device_id", None)
        if device_id != topic.device_id:
            self.reject("device_mismatch", f"{topic} carried a message for {device_id!r}")
            return None
        if not self._is_known(topic.device_id):
            self.reject("unknown_device", f"{topic.device_id} is not enrolled")
            return None
        return message

    def _transfer_loop(self) -> None:
        """Admit queued file requests, then send what the transfer budgets allow.

        Woken by a new request (paho thread) or by an acknowledged frame that
        freed budget (``on_capacity``); the wake is cleared before the work, so
        a wake during the work runs the loop once more.
        """
        while not self._stop.is_set():
            self._transfer_wake.wait(0.5)
            self._transfer_wake.clear()
            for _ in range(_REQUESTS_PER_TURN):
                try:
                    topic, payload = self._requests.get_nowait()
                except queue.Empty:
                    break
                try:
                    request = self._decode(topic, payload, FileRequest)
                    if isinstance(request, FileRequest):
                        self.transfers.submit(request)
                except Exception:  # a bug here must not stop all transfers
                    log.exception("file request from %s failed", topic.device_id)
            else:
                self._transfer_wake.set()  # more requests waiting: come back after sending
            try:
                self.transfers.pump()
            except Exception:  # e.g. the link refused a frame; the next turn retries
                log.exception("sending transfer frames failed")

    def _ingest_loop(self) -> None:
        s = self.settings
        handoff = self._ingest
        while not self._stop.is_set():
            # A batch closes when full or ``ingest_flush_s`` after it opened.
            batch: list[tuple[DeviceTopic, bytes, bool]] = []
            deadline = time.monotonic() + s.ingest_flush_s
            while True:
                handoff.take(batch, s.ingest_batch_max)
                left = deadline - time.monotonic()
                if len(batch) >= s.ingest_batch_max or left <= 0:
                    break
                handoff.wait(left)
            if batch:
                try:
                    self._store(batch)
                except Exception:  # keep ingesting; the database may be back next time
                    log.exception("storing %d messages failed", len(batch))
            try:
                for device_id in self.presence.due_offline(time.monotonic()):
                    self.registry.set_online(device_id, False)
            except Exception:  # the database may be back next time
                log.exception("storing held-back offline statuses failed")

    def _store(self, batch: list[tuple[DeviceTopic, bytes, bool]]) -> None:
        events: list[Event] = []
        points: list[Telemetry] = []
        for topic, payload, retained in batch:
            channel = topic.channel
            if channel is Channel.STATUS:
                online = _STATUS_VALUES.get(bytes(payload).strip())
                if online is None:
                    self.reject("malformed_status", f"{topic.device_id}: {payload[:32]!r}")
                elif self._is_known(topic.device_id):
                    store, duplicate = self.presence.status(
                        topic.device_id, online, time.monotonic()
                    )
                    if store:
                        self.registry.set_online(topic.device_id, online)
                    self._duplicate(duplicate)
                else:
                    self.reject("unknown_device", f"{topic.device_id} is not enrolled")
            elif channel is Channel.REPORTED:
                message = self._decode(topic, payload, ReportedState)
                if isinstance(message, ReportedState):
                    profile = self._profile_of(message)
                    self.registry.record_reported(message, profile=profile)
                    if self._profiles_seen.get(topic.device_id) != profile:
                        # A new profile may re-target the desired bundle; send it now.
                        self._profiles_seen[topic.device_id] = profile
                        self._wake_outbox.set()
            elif channel is Channel.EVENTS:
                message = self._decode(topic, payload, Event)
                if isinstance(message, Event) and self._clock_ok(message.device_id, message.at):
                    if retained and message.seq is None:
                        # Events are never retained; an unnumbered retained
                        # one would come back (and be stored) on every
                        # resubscription. A numbered one is stored once.
                        self.reject("retained_event", f"{topic.device_id}: unnumbered")
                    else:
                        events.append(message)
                        if not retained:
                            self._alive(message.device_id)
                            if message.journal is not None:
                                self._duplicate(
                                    self.presence.journal(
                                        message.device_id, message.journal, time.monotonic()
                                    )
                                )
            elif channel is Channel.TELEMETRY:
                message = self._decode(topic, payload, Telemetry)
                if isinstance(message, Telemetry) and self._clock_ok(message.device_id, message.at):
                    points.append(message)
                    if not retained and self._fresh(message):
                        self._alive(message.device_id)
                        self._duplicate(
                            self.presence.telemetry_window(
                                message.device_id, message.at, message.window_s, time.monotonic()
                            )
                        )
            else:
                self.reject("unexpected_channel", str(topic))
        if events:
            self._store_events(events)
        if points:
            self.registry.add_telemetry(points)
            self._record_agent_rejections(points)
        self.ingested += len(batch)

    def _store_events(self, events: list[Event]) -> None:
        """Store a batch of events under the per-device cap, then acknowledge them.

        The cap and the journals' acknowledgements must agree, or a device
        over its cap would never be acknowledged and replay for ever:

        - Events are stored in chunks of at most ``max_events_per_device``,
          and each chunk's journal marks advance before the next is stored.
          A chunk's trim then drops only rows an earlier advance has passed;
          were the whole batch stored at once, its own oldest rows would be
          gone before the advance, which stops at the first missing number.
        - A numbered event at or below its journal's acknowledged mark is a
          replay (the agent missed our ack) of an event stored already, and
          maybe since dropped by the cap or retention: it is not stored
          again, only acknowledged again. Copies within the batch (a replay
          crossing a resend) are dropped first, so no chunk stores an event
          an earlier chunk stored and trimmed.
        """
        cap = self.settings.max_events_per_device
        journals = {
            (e.device_id, e.journal) for e in events if e.journal is not None and e.seq is not None
        }
        unknown = {(d, j) for d, j in journals if self._event_marks.get(d, ("", 0))[0] != j}
        if unknown:  # first numbered event of a journal since we started: read its mark
            self._remember_marks(self.registry.advance_event_acks(unknown))
        fresh: list[Event] = []
        numbers: set[tuple[str, str, int]] = set()
        for e in events:
            if e.journal is not None and e.seq is not None:
                key = (e.device_id, e.journal, e.seq)
                if key in numbers or self._acknowledged(e):
                    continue  # a copy in this batch, or a replay of an acknowledged event
                numbers.add(key)
            fresh.append(e)
        chunks = [fresh[i : i + cap] for i in range(0, len(fresh), cap)]
        for i, chunk in enumerate(chunks):
            self.registry.add_events(chunk, max_per_device=cap)
            if i < len(chunks) - 1:
                self.registry.advance_event_acks(
                    {(e.device_id, e.journal) for e in chunk if e.journal is not None}
                )
        self._acknowledge_events(journals)

    def _acknowledged(self, event: Event) -> bool:
        """Whether a numbered event is at or below its journal's acknowledged mark."""
        if event.journal is None or event.seq is None:
            return False
        journal, seq = self._event_marks.get(event.device_id, ("", 0))
        return journal == event.journal and event.seq <= seq

    def _remember_marks(self, marks: list[tuple[str, str, int]]) -> None:
        # Enrolled devices only (the registry answers for no other), one
        # journal each: bounded by the fleet.
        for device_id, journal, seq in marks:
            self._event_marks[device_id] = (journal, seq)

    def _alive(self, device_id: str) -> None:
        """Fresh telemetry or an event: the device is connected, whatever its retained status."""
        if self.presence.alive(device_id, time.monotonic()):
            self.registry.set_online(device_id, True)

    @staticmethod
    def _fresh(point: Telemetry) -> bool:
        """Whether a telemetry window ended recently enough to prove the agent is connected."""
        return not point.at or abs(time.time() - point.at) <= max(2 * point.window_s, 30.0)

    def _duplicate(self, duplicate: Duplicate | None) -> None:
        """Record a suspected duplicate device id as a device event, and say so in the log."""
        if duplicate is None:
            return
        log.warning(
            "device %s: two agents seem to use this device id (%s: %s)",
            duplicate.device_id,
            duplicate.reason,
            duplicate.detail,
        )
        self.registry.add_controller_event(
            duplicate.device_id,
            DUPLICATE_EVENT_KIND,
            {"reason": duplicate.reason, **duplicate.detail},
        )

    def _acknowledge_events(self, journals: set[tuple[str, str]]) -> None:
        """Tell each agent how far its journal is stored, so it can forget those events.

        Sent after every batch with numbered events, even when all of them
        were duplicates: an agent replays because it missed an ack.
        """
        marks = self.registry.advance_event_acks(journals)
        self._remember_marks(marks)
        for device_id, journal, seq in marks:
            if seq > 0:
                ack = EventAck(device_id=device_id, journal=journal, seq=seq)
                topic = str(DeviceTopic(device_id, Channel.EVENTS_ACK))
                self.link.publish(topic, ack.encode(), qos=1)

    def _clock_ok(self, device_id: str, at: float) -> bool:
        """Whether a message's ``at`` is unset or within ``max_clock_skew_s`` of our clock.

        Counted as ``clock_skew`` otherwise: a timestamp far in the future
        makes a row that retention never deletes.
        """
        if not at:
            return True  # unset: stored with the time of storing
        skew = at - time.time()
        if abs(skew) <= self.settings.max_clock_skew_s:
            return True
        self.reject("clock_skew", f"{device_id}: at is {skew:+.0f}s off", device_id=device_id)
        return False

    def _record_agent_rejections(self, points: list[Telemetry]) -> None:
        """Keep each device's cumulative count of messages it refused, by reason.

        Agents report these totals in every telemetry window; storing the
        latest value per device and reason (not adding windows) keeps the
        numbers right across lost telemetry and controller restarts.
        """
        latest: dict[str, int] = {}
        for point in points:
            # The parser folds unknown reasons already; folding again here
            # keeps the per-device counter rows bounded for any caller.
            for reason, count in fold_reasons(point.rejected).items():
                latest[f"agent_rejected.{point.device_id}.{reason}"[:128]] = count
        changed = {n: c for n, c in latest.items() if self._agent_rejected.get(n) != c}
        self.registry.set_counters(changed)
        self._agent_rejected.update(changed)

    def _profile_of(self, reported: ReportedState) -> str | None:
        """The compiler profile this device's reported hardware matches, if any."""
        try:
            return match_profile(reported.hardware, self.profiles).name
        except ProfileError as exc:
            log.info("%s matches no profile: %s", reported.device_id, exc)
            return None

    def _maintenance_loop(self) -> None:
        while not self._stop.is_set():
            s = self.settings
            self._wake_outbox.wait(s.maintenance_interval_s)
            self._wake_outbox.clear()
            if self._stop.is_set():
                break
            try:
                if self.link.connected:
                    publish_desired_states(
                        self.registry, self.link, everything=self._broker_lost_desired()
                    )
                if self.settings.refresh_metadata and self.repository.refresh_timestamp(
                    within=timedelta(seconds=s.timestamp_refresh_within_s)
                ):
                    log.info("re-signed TUF timestamp metadata before it expired")
                self.flush_rejections()
            except Exception:
                log.exception("maintenance step failed; retrying in %ss", s.maintenance_interval_s)

    def _flush_loop(self) -> None:
        """An ingest-only service's one chore besides ingesting: persist its rejection counts."""
        s = self.settings
        while not self._stop.wait(s.maintenance_interval_s):
            try:
                self.flush_rejections()
            except Exception:  # the database may be back next time
                log.exception(
                    "flushing rejections failed; retrying in %ss", s.maintenance_interval_s
                )

    def _broker_lost_desired(self) -> bool:
        """After a (re)connect: whether the broker lost the retained desired states.

        It did unless it hands back the outbox marker with the digest of
        what the registry records as published: the marker is published
        after the states it covers, so the broker cannot hold it without them
        (Mosquitto persists retained messages together). A reconnect to a
        broker that kept them re-publishes nothing unchanged.
        """
        if not self._check_outbox.is_set():
            return False
        self._check_outbox.clear()
        self._marker_seen.wait(self.settings.outbox_marker_wait_s)
        lost = self._marker != self.registry.published_digest().encode()
        if lost:
            log.info("the broker holds no current outbox marker; re-publishing every desired state")
        return lost

    def _rollout_loop(self) -> None:
        """Step every active rollout each ``rollout_interval_s``."""
        s = self.settings
        while not self._stop.wait(s.rollout_interval_s):
            try:
                results = self.rollouts.step_all()
                if any(r.desired_changed for r in results):
                    self._wake_outbox.set()
            except Exception:  # the database may be back next time
                log.exception("rollout step failed; retrying in %ss", s.rollout_interval_s)

    def _telemetry_loop(self) -> None:
        """Roll telemetry up and apply retentions each ``telemetry_rollup_interval_s``.

        Event retention runs here too: like telemetry, events must stay
        bounded whether or not this controller steps rollouts.
        """
        s = self.settings
        while not self._stop.wait(s.telemetry_rollup_interval_s):
            try:
                rollup_telemetry(
                    self.registry,
                    raw_retention_s=s.telemetry_raw_retention_s,
                    minute_retention_s=s.telemetry_minute_retention_s,
                )
            except Exception:  # the database may be back next time
                log.exception(
                    "telemetry rollup failed; retrying in %ss", s.telemetry_rollup_interval_s
                )
            try:
                self.expire_events()
            except Exception:  # the database may be back next time
                log.exception(
                    "event retention failed; retrying in %ss", s.telemetry_rollup_interval_s
                )

    def expire_events(self) -> int:
        """Delete events older than ``event_retention_s``; returns how many."""
        cut = datetime.now(timezone.utc) - timedelta(seconds=self.settings.event_retention_s)
        return self.registry.expire_events(cut)

    def flush_rejections(self) -> None:
        """Add the rejections counted in memory to the registry's counters.

        Transfer refusals are counted twice: ``rejected.transfer_<reason>``
        for the fleet, and ``transfer_refused.<device>.<reason>`` per device.
        Only enrolled devices reach the transfer server and the reasons are a
        fixed set, so the per-device names are bounded by the fleet.
        """
        for (device_id, refusal), n in self.transfers.take_refusals().items():
            if device_id:
                self.registry.bump_counter(f"transfer_refused.{device_id}.{refusal.value}"[:128], n)
            with self._rejected_lock:
                self._rejected[f"transfer_{refusal.value}"] += n
        with self._rejected_lock:
            pending, self._rejected = self._rejected, Counter()
            per_device, self._device_rejected = self._device_rejected, Counter()
        for reason, n in pending.items():
            self.registry.bump_counter(f"rejected.{reason}", n)
        for (device_id, reason), n in per_device.items():
            self.registry.bump_counter(device_rejected_name(device_id, reason), n)

    def rejected(self) -> dict[str, int]:
        """Rejections counted so far (persisted and not yet flushed)."""
        with self._rejected_lock:
            pending = dict(self._rejected)
        out = {
            k.removeprefix("rejected."): v
            for k, v in self.registry.counters().items()
            if k.startswith("rejected.")
        }
        for k, v in pending.items():
            out[k] = out.get(k, 0) + v
        return out
