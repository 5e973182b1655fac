"""Presence and duplicate device ids, as the ingest worker sees them.

A device's ``online`` column follows its retained status and last will. Two
agents started with the same device id share one MQTT client id, so the
broker disconnects one whenever the other connects: the status flaps, and
when one of them stops, its ``offline`` stays retained while the other keeps
sending telemetry - the real device showed offline indefinitely.

:class:`PresenceTracker` is the pure part (no I/O, the clock is passed in):
the service feeds it what arrives and acts on its answers.

- **Liveness:** fresh, non-retained telemetry or events prove an agent is
  connected. :meth:`alive` says when the stored status must be set back to
  online.
- **Duplicates**, three independent signals, each enough:

  * ``journals``: events of one device alternate between two event journals
    (a journal changes only when an agent's state directory is re-created,
    and never changes back);
  * ``telemetry_overlap``: two telemetry windows of one device overlap by
    more than half (one agent's windows follow each other), twice within
    ``window_s``;
  * ``status_flapping``: ``flaps`` (3) or more ``offline`` statuses within
    ``window_s`` while the device kept sending.

  :meth:`status` also tells the service to hold back an ``offline`` of a
  device suspected of a duplicate that sent something within ``window_s``:
  the other agent's will must not hide the one still running. A held-back
  offline is stored after all (:meth:`due_offline`) when nothing more arrives
  from the device within ``alive_grace_s``.

A suspicion is reported once per ``window_s`` per device (the service stores
it as a ``duplicate_device_id`` event), and memory is bounded by
``max_devices``: the least recently seen device is forgotten first. Per
device it is bounded too, however fast a device sends: a few timestamps and
journal ids each.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from edgefleet.controller.registry.fleet import DUPLICATE_EVENT_KIND

__all__ = ["DUPLICATE_EVENT_KIND", "Duplicate", "PresenceTracker"]


@dataclass(frozen=True)
class Duplicate:
    """A suspected duplicate: which signal (``reason``) and what it saw."""

    device_id: str
    reason: str
    detail: dict[str, object]


@dataclass
class _Device:
    online: bool | None = None  # as last written by us; None: not written this run
    last_alive: float | None = None
    # Both deques are bounded by count as well as by time: a hostile device
    # sending thousands of statuses or windows within ``window_s`` must not
    # grow them. ``flaps`` offlines (and two overlaps) are all a verdict needs.
    offlines: deque[float] = field(default_factory=lambda: deque(maxlen=3))
    journals: deque[str] = field(default_factory=lambda: deque(maxlen=3))
    windows: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=4))
    overlaps: deque[float] = field(default_factory=lambda: deque(maxlen=2))
    suspected_at: float | None = None
    reported_at: float | None = None
    held_offline: bool = False


class PresenceTracker:
    """What each device's recent messages say about it being online, or being two.

    Not thread-safe: the ingest worker is its only caller.
    """

    def __init__(
        self,
        *,
        window_s: float = 120.0,
        flaps: int = 3,
        alive_grace_s: float = 30.0,
        max_devices: int = 100_000,
    ) -> None:
        self.window_s = window_s
        self.flaps = flaps
        self.alive_grace_s = alive_grace_s
        self.max_devices = max_devices
        self._devices: OrderedDict[str, _Device] = OrderedDict()
        self._held: set[str] = set()

    def _get(self, device_id: str) -> _Device:
        d = self._devices.get(device_id)
        if d is None:
            d = self._devices[device_id] = _Device(offlines=deque(maxlen=max(1, self.flaps)))
            if len(self._devices) > self.max_devices:
                self._devices.popitem(last=False)
        else:
            self._devices.move_to_end(device_id)
        return d

    def _suspect(
        self, device_id: str, d: _Device, now: float, reason: str, **detail: object
    ) -> Duplicate | None:
        d.suspected_at = now
        if d.reported_at is not None and now - d.reported_at < self.window_s:
            return None
        d.reported_at = now
        return Duplicate(device_id, reason, dict(detail))

    def suspected(self, device_id: str, now: float) -> bool:
        """Whether ``device_id`` was suspected of a duplicate within ``window_s``."""
        d = self._devices.get(device_id)
        return d is not None and d.suspected_at is not None and now - d.suspected_at < self.window_s

    def status(self, device_id: str, online: bool, now: float) -> tuple[bool, Duplicate | None]:
        """A status message arrived. Returns ``(store_it, duplicate)``.

        ``store_it`` is ``False`` for an ``offline`` that must not be stored:
        the device is a suspected duplicate and another agent with its id
        sent something within ``window_s``.
        """
        d = self._get(device_id)
        duplicate = None
        if not online:
            d.offlines.append(now)
            while d.offlines and now - d.offlines[0] > self.window_s:
                d.offlines.popleft()
            sending = d.last_alive is not None and now - d.last_alive <= self.window_s
            if sending and len(d.offlines) >= self.flaps:
                duplicate = self._suspect(
                    device_id,
                    d,
                    now,
                    "status_flapping",
                    offline_statuses=len(d.offlines),
                    window_s=self.window_s,
                )
            if self.suspected(device_id, now) and sending:
                d.held_offline = True
                self._held.add(device_id)
                return False, duplicate
        d.online = online
        d.held_offline = False
        self._held.discard(device_id)
        return True, duplicate

    def due_offline(self, now: float) -> list[str]:
        """Devices whose held-back ``offline`` must be stored now: silent for ``alive_grace_s``."""
        due = []
        for device_id in sorted(self._held):
            d = self._devices.get(device_id)
            if d is None:  # forgotten (max_devices): store its offline rather than lose it
                self._held.discard(device_id)
                due.append(device_id)
                continue
            if not d.held_offline:
                self._held.discard(device_id)
                continue
            if d.last_alive is None or now - d.last_alive > self.alive_grace_s:
                d.held_offline, d.online = False, False
                self._held.discard(device_id)
                due.append(device_id)
        return due

    def alive(self, device_id: str, now: float) -> bool:
        """Fresh telemetry or an event arrived: whether to store the device as online now."""
        d = self._get(device_id)
        d.last_alive = now
        d.held_offline = False
        self._held.discard(device_id)
        if d.online is True:
            return False
        d.online = True
        return True

    def journal(self, device_id: str, journal: str, now: float) -> Duplicate | None:
        """An event of ``journal`` arrived; a journal that comes back means two agents."""
        d = self._get(device_id)
        if d.journals and d.journals[-1] == journal:
            return None
        came_back = journal in d.journals
        d.journals.append(journal)
        if came_back:
            return self._suspect(device_id, d, now, "journals", journals=sorted(set(d.journals)))
        return None

    def telemetry_window(
        self, device_id: str, at: float, window_s: float, now: float
    ) -> Duplicate | None:
        """A telemetry window ``(at - window_s, at]`` arrived (agent clock)."""
        d = self._get(device_id)
        if window_s <= 0 or at <= 0:
            return None
        start = at - window_s
        overlapping = any(
            min(at, end) - max(start, begin) > 0.5 * min(window_s, end - begin)
            for begin, end in d.windows
            if end > begin
        )
        d.windows.append((start, at))
        if not overlapping:
            return None
        d.overlaps.append(now)
        while d.overlaps and now - d.overlaps[0] > self.window_s:
            d.overlaps.popleft()
        if len(d.overlaps) < 2:
            return None
        return self._suspect(
            device_id, d, now, "telemetry_overlap", overlapping_windows=len(d.overlaps)
        )
