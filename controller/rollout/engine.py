"""The rollout engine's pure decision core: state in, actions and reasons out.

No I/O here (like :mod:`edgefleet.agent.reconcile`): :func:`plan` takes the
rollout's configuration and state, one :class:`DeviceView` per member device
and the time, and returns a :class:`Plan` - device transitions, the rollout's
new status and wave, and a :class:`Decision` with a human reason for every
one of them. The I/O layer (:mod:`edgefleet.controller.rollout.runner`)
applies a plan in one database transaction under the rollout's row lock, so
a step is either fully taken or not at all, and never twice.

The strategy follows AWS IoT Jobs' exponential rollout:

* **Canary** (wave 0): ``canary_count`` devices, or ``canary_pct`` percent of
  the members. At its end the failure and timeout thresholds are checked on
  the canary alone, whatever ``min_executed`` says: judging the new model on
  a few devices is what a canary is for.
* **Waves** 1, 2, ...: ``base_rate`` devices, multiplied by
  ``increment_factor`` per wave and capped at ``max_rate``; ``soak_s``
  seconds pass between the end of one wave and the start of the next.
* At most ``max_in_flight`` devices install or are observed at once.

A device is **updated** only when it reports the new model active *and*
stayed healthy for ``observe_s`` seconds of telemetry with that model: error
rate at most ``max_error_rate``, and p95 latency at most its own previous
version's p95 times ``max_p95_ratio`` plus ``p95_slack_ms`` (sub-millisecond
models jitter by more than any ratio). Latency is judged **per sample under
comparable load** when the agent reports per-sample figures (see
:func:`judge_latency`): a local client sending big batches or a burst of
requests to the canary cannot fake a regression and halt the fleet. A refused install (smoke test,
signature, hardware) is a failure; an install not finished within
``device_timeout_s`` (or a device silent for that long after the install) is
a timeout. Offline devices are not started; they stay pending until they come
back or the deadline passes (then they *expire*, which counts neither as a
failure nor as a timeout).

When, after ``min_executed`` devices finished, more than
``failure_threshold_pct`` percent failed (or ``timeout_threshold_pct`` timed
out), the rollout **halts**: nothing more starts and every started device that
has a previous model is rolled back to it. An operator's abort does the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from edgefleet.controller.rollout.errors import RolloutConfigError
from edgefleet.shared.settings import settings_from_table

__all__ = [
    "ACTIVE_STATUSES",
    "FORWARD_STATES",
    "Decision",
    "DeviceState",
    "DeviceView",
    "Health",
    "LoadBaseline",
    "Plan",
    "RolloutConfig",
    "RolloutStatus",
    "RolloutView",
    "Transition",
    "WindowHealth",
    "comparable",
    "judge_health",
    "judge_latency",
    "plan",
    "wave_size",
]


class RolloutStatus(str, Enum):
    """Lifecycle of a rollout. ``halted`` and ``aborted`` still drive rollbacks."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    HALTED = "halted"
    ABORTED = "aborted"
    SUPERSEDED = "superseded"


# Statuses the runner steps: anything that may still change a device.
ACTIVE_STATUSES = frozenset(
    {
        RolloutStatus.RUNNING,
        RolloutStatus.PAUSED,
        RolloutStatus.COMPLETED,
        RolloutStatus.HALTED,
        RolloutStatus.ABORTED,
    }
)


class DeviceState(str, Enum):
    """Where one device is in one rollout."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    OBSERVING = "observing"
    UPDATED = "updated"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"


BUSY_STATES = frozenset({DeviceState.IN_FLIGHT, DeviceState.OBSERVING})
EXECUTED_STATES = frozenset({DeviceState.UPDATED, DeviceState.FAILED, DeviceState.TIMED_OUT})
# Terminal for the forward rollout (a wave is done when all its devices are).
DONE_STATES = EXECUTED_STATES | {DeviceState.EXPIRED, DeviceState.CANCELLED}
# Started devices whose desired state points at the new model: a halt rolls them back.
FORWARD_STATES = frozenset(
    {
        DeviceState.IN_FLIGHT,
        DeviceState.OBSERVING,
        DeviceState.UPDATED,
        DeviceState.FAILED,
        DeviceState.TIMED_OUT,
    }
)


@dataclass(frozen=True)
class RolloutConfig:
    """How a rollout proceeds. Units are in the field names; see the module docstring."""

    canary_count: int | None = 1
    canary_pct: float | None = None
    base_rate: int = 1
    increment_factor: float = 2.0
    max_rate: int = 50
    max_in_flight: int = 10
    soak_s: float = 60.0
    observe_s: float = 60.0
    device_timeout_s: float = 900.0
    deadline_s: float | None = 7 * 24 * 3600.0
    failure_threshold_pct: float = 10.0
    timeout_threshold_pct: float = 20.0
    min_executed: int = 5
    max_error_rate: float = 0.05
    max_p95_ratio: float = 1.5
    p95_slack_ms: float = 2.0

    def __post_init__(self) -> None:
        """Refuse settings that cannot describe a rollout.

        Raises:
            RolloutConfigError: names the first bad setting and why.
        """
        problems: list[str] = []
        if (self.canary_count is None) == (self.canary_pct is None):
            problems.append("give exactly one of canary_count and canary_pct")
        if self.canary_count is not None and self.canary_count < 1:
            problems.append(f"canary_count must be at least 1, got {self.canary_count}")
        if self.canary_pct is not None and not 0 < self.canary_pct <= 100:
            problems.append(f"canary_pct must be in (0, 100], got {self.canary_pct}")
        if self.base_rate < 1:
            problems.append(f"base_rate must be at least 1, got {self.base_rate}")
        if not self.increment_factor >= 1.0:
            problems.append(f"increment_factor must be >= 1, got {self.increment_factor}")
        if self.max_rate < self.base_rate:
            problems.append(f"max_rate ({self.max_rate}) must be >= base_rate ({self.base_rate})")
        if self.max_in_flight < 1:
            problems.append(f"max_in_flight must be at least 1, got {self.max_in_flight}")
        for name in ("soak_s", "observe_s", "p95_slack_ms"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.device_timeout_s > 0:
            problems.append(f"device_timeout_s must be > 0, got {self.device_timeout_s}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            problems.append(f"deadline_s must be > 0, got {self.deadline_s}")
        for name in ("failure_threshold_pct", "timeout_threshold_pct"):
            if not 0 <= getattr(self, name) <= 100:
                problems.append(f"{name} must be in [0, 100], got {getattr(self, name)}")
        if self.min_executed < 1:
            problems.append(f"min_executed must be at least 1, got {self.min_executed}")
        if not 0 <= self.max_error_rate <= 1:
            problems.append(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if not self.max_p95_ratio >= 1:
            problems.append(f"max_p95_ratio must be >= 1, got {self.max_p95_ratio}")
        if problems:
            raise RolloutConfigError("invalid rollout settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutConfig:
        """Rebuild from :meth:`to_dict`; unknown keys are refused, missing ones default.

        Raises:
            RolloutConfigError: unknown keys or invalid values.
        """
        return settings_from_table(cls, d, section="rollout", error=RolloutConfigError)


# "Comparable load" (see judge_latency): an observed window is held against
# the previous version's baseline only when its mean batch is at least this
# fraction of the baseline's ...
MIN_BATCH_FRACTION = 0.5
# ... and its request rate at most this many times the baseline's, plus
# RATE_ALLOWANCE_RPS so that a device serving a handful of requests is not
# "overloaded" by a few more.
MAX_RATE_FACTOR = 4.0
RATE_ALLOWANCE_RPS = 1.0


@dataclass(frozen=True)
class WindowHealth:
    """One telemetry window of an observed device, as the latency judgement needs it.

    ``samples``/``sample_p95_ms`` are None for agents that do not report
    per-sample latency.
    """

    requests: int
    window_s: float
    samples: int | None = None
    sample_p95_ms: float | None = None

    @property
    def batch(self) -> float | None:
        """Mean samples per request, or None without per-sample data."""
        if self.samples is None or self.requests <= 0:
            return None
        return self.samples / self.requests

    @property
    def rate_rps(self) -> float:
        """Requests per second over the window."""
        return self.requests / self.window_s if self.window_s > 0 else float(self.requests)


@dataclass(frozen=True)
class LoadBaseline:
    """The previous version on this device: per-sample p95 and the load it was measured under.

    Taken from its recent windows when the device starts (``batch`` is mean
    samples per request, ``rate_rps`` requests per second).
    """

    sample_p95_ms: float
    batch: float
    rate_rps: float


@dataclass(frozen=True)
class Health:
    """Telemetry of one device with the new model since observation began.

    ``p95_ms`` is the request-weighted per-request p95; ``window_loads`` holds
    each window for the per-sample, comparable-load judgement.
    """

    windows: int = 0
    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None
    window_loads: tuple[WindowHealth, ...] = ()


@dataclass(frozen=True)
class DeviceView:
    """What the engine needs to know about one member device, read by the runner.

    ``runs_target`` / ``runs_rollback`` say whether the device's last report
    shows the rollout's model (or the rollback target) active.
    ``install_error`` is set when the device reported a refused install for
    the intent this rollout gave it (matching deployment id and generation).
    """

    device_id: str
    state: DeviceState
    wave: int | None = None
    online: bool = True
    state_since: datetime | None = None
    has_previous: bool = True
    runs_target: bool = False
    runs_rollback: bool = False
    install_error: str | None = None
    health: Health = field(default_factory=Health)
    baseline_p95_ms: float | None = None
    baseline_load: LoadBaseline | None = None


@dataclass(frozen=True)
class RolloutView:
    """The rollout's own state as stored."""

    status: RolloutStatus
    wave: int = 0
    wave_started_at: datetime | None = None
    next_wave_at: datetime | None = None
    deadline_at: datetime | None = None
    reason: str = ""


@dataclass(frozen=True)
class Transition:
    """Move ``device_id`` to ``state``; ``wave`` is set when the device starts."""

    device_id: str
    state: DeviceState
    reason: str
    wave: int | None = None
    health: Health | None = None


@dataclass(frozen=True)
class Decision:
    """One recorded decision: ``kind`` is machine-readable, ``reason`` is for people."""

    kind: str
    reason: str
    device_id: str | None = None
    wave: int | None = None


@dataclass
class Plan:
    """What one step decided. Empty transitions and no status change: nothing to do."""

    transitions: list[Transition] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    status: RolloutStatus | None = None
    reason: str | None = None
    wave: int | None = None
    wave_started_at: datetime | None = None
    next_wave_at: datetime | None = None
    clear_next_wave_at: bool = False

    @property
    def empty(self) -> bool:
        return not self.transitions and not self.decisions and self.status is None

    def move(self, view: DeviceView, state: DeviceState, reason: str, **kw: Any) -> None:
        """Record a device transition together with its decision."""
        self.transitions.append(Transition(view.device_id, state, reason, **kw))
        self.decisions.append(
            Decision(f"device_{state.value}", reason, view.device_id, kw.get("wave", view.wave))
        )


def wave_size(config: RolloutConfig, wave: int, members: int) -> int:
    """How many devices wave ``wave`` starts (wave 0 is the canary)."""
    if wave == 0:
        if config.canary_count is not None:
            return config.canary_count
        assert config.canary_pct is not None
        return max(1, math.ceil(members * config.canary_pct / 100.0))
    size = config.base_rate * config.increment_factor ** (wave - 1)
    return int(min(config.max_rate, math.ceil(size - 1e-9)))


def comparable(window: WindowHealth, baseline: LoadBaseline) -> bool:
    """Whether ``window`` ran under load comparable to the previous version's baseline.

    Two rules, both about what the *device's local load* - not the model -
    does to per-sample latency:

    * **Batch**: its mean batch is at least :data:`MIN_BATCH_FRACTION` of the
      baseline's. Per-sample latency only falls as batches grow (a batch
      shares the run's fixed cost), so a window of bigger batches that is
      still too slow is a real regression, while a window of much smaller
      batches would look slower for no fault of the model.
    * **Rate**: its request rate is at most :data:`MAX_RATE_FACTOR` times the
      baseline's plus :data:`RATE_ALLOWANCE_RPS`. Beyond that, requests queue
      for the CPU behind each other (a local client flooding the endpoint)
      and latency measures the flood, not the model.
    """
    batch = window.batch
    if batch is None or window.sample_p95_ms is None:
        return False
    if batch < baseline.batch * MIN_BATCH_FRACTION:
        return False
    return window.rate_rps <= baseline.rate_rps * MAX_RATE_FACTOR + RATE_ALLOWANCE_RPS


def judge_latency(
    config: RolloutConfig, baseline: LoadBaseline, windows: Sequence[WindowHealth]
) -> tuple[bool, str] | None:
    """Per-sample latency of the comparable windows against the device's previous version.

    Returns None when no window reports per-sample figures (an older agent:
    the caller falls back to per-request p95). Otherwise ``(healthy, why)``:
    the sample-weighted mean of the comparable windows' per-sample p95 must
    be at most ``baseline.sample_p95_ms * max_p95_ratio + p95_slack_ms``. When
    no window is comparable, latency is not held against the device (local
    load is not evidence against a model) and the reason says so; the error
    rate still is.
    """
    reporting = [w for w in windows if w.batch is not None and w.sample_p95_ms is not None]
    if not reporting:
        return None
    judged = [w for w in reporting if comparable(w, baseline)]
    if not judged:
        heaviest = max(reporting, key=lambda w: w.rate_rps)
        return True, (
            f"per-sample latency not judged: none of {len(reporting)} window(s) ran under load "
            f"comparable to the previous version's (mean batch {baseline.batch:.1f}, "
            f"{baseline.rate_rps:.1f} req/s; e.g. batch {heaviest.batch or 0:.1f}, "
            f"{heaviest.rate_rps:.1f} req/s)"
        )
    weight = sum(w.samples or 0 for w in judged)
    observed = (
        sum((w.sample_p95_ms or 0.0) * (w.samples or 0) for w in judged) / weight
        if weight
        else max(w.sample_p95_ms or 0.0 for w in judged)
    )
    limit = baseline.sample_p95_ms * config.max_p95_ratio + config.p95_slack_ms
    scope = f"{len(judged)} of {len(reporting)} window(s) under comparable load"
    if observed > limit:
        return False, (
            f"per-sample p95 latency {observed:.3f} ms exceeds {limit:.3f} ms (previous version "
            f"{baseline.sample_p95_ms:.3f} ms x {config.max_p95_ratio:g} + "
            f"{config.p95_slack_ms:g} ms; {scope})"
        )
    return True, f"per-sample p95 {observed:.3f} ms within {limit:.3f} ms ({scope})"


def judge_health(config: RolloutConfig, view: DeviceView) -> tuple[bool | None, str]:
    """Judge an observed device: ``(True|False, why)``, or ``(None, why)`` without telemetry.

    Errors are judged over every window. Latency is judged per sample under
    comparable load (:func:`judge_latency`) when the device and its baseline
    have per-sample figures, else per request against the per-request
    baseline, as agents before per-sample telemetry are judged.
    """
    h = view.health
    if h.windows == 0:
        return None, "no telemetry with the new model yet"
    if h.requests > 0 and h.errors / h.requests > config.max_error_rate:
        return False, (
            f"error rate {100 * h.errors / h.requests:.1f}% ({h.errors}/{h.requests}) exceeds "
            f"{100 * config.max_error_rate:.1f}%"
        )
    per_sample = (
        judge_latency(config, view.baseline_load, h.window_loads)
        if view.baseline_load is not None
        else None
    )
    if per_sample is not None:
        healthy, why = per_sample
        if not healthy:
            return False, why
        return True, (
            f"healthy over {h.windows} telemetry window(s): {h.requests} requests, "
            f"{h.errors} errors, {why}"
        )
    if h.p95_ms is not None and view.baseline_p95_ms is not None:
        limit = view.baseline_p95_ms * config.max_p95_ratio + config.p95_slack_ms
        if h.p95_ms > limit:
            return False, (
                f"p95 latency {h.p95_ms:.2f} ms exceeds {limit:.2f} ms (previous version "
                f"{view.baseline_p95_ms:.2f} ms x {config.max_p95_ratio:g} + "
                f"{config.p95_slack_ms:g} ms)"
            )
    latency = "no requests" if h.p95_ms is None else f"p95 {h.p95_ms:.2f} ms"
    return True, f"healthy over {h.windows} telemetry window(s): {h.requests} requests, " + (
        f"{h.errors} errors, {latency}"
    )


def _elapsed(since: datetime | None, now: datetime) -> float:
    return 0.0 if since is None else (now - since).total_seconds()


def _judge_devices(
    config: RolloutConfig, devices: Sequence[DeviceView], now: datetime, p: Plan
) -> dict[str, DeviceState]:
    """Advance started devices (install finished? healthy? timed out?); return new states."""
    states = {d.device_id: d.state for d in devices}
    for d in devices:
        age = _elapsed(d.state_since, now)
        if d.state is DeviceState.IN_FLIGHT:
            if d.install_error is not None:
                p.move(d, DeviceState.FAILED, f"install refused: {d.install_error}")
            elif d.runs_target:
                p.move(d, DeviceState.OBSERVING, "reports the new model active; observing health")
            elif age > config.device_timeout_s:
                where = "" if d.online else " (device offline)"
                p.move(
                    d,
                    DeviceState.TIMED_OUT,
                    f"install not finished within {config.device_timeout_s:g}s{where}",
                )
        elif d.state is DeviceState.OBSERVING:
            if not d.runs_target:
                p.move(d, DeviceState.FAILED, "stopped reporting the new model active")
            elif age >= config.observe_s:
                healthy, why = judge_health(config, d)
                if healthy is True:
                    p.move(d, DeviceState.UPDATED, why, health=d.health)
                elif healthy is False:
                    p.move(d, DeviceState.FAILED, f"unhealthy: {why}", health=d.health)
                elif age > config.observe_s + config.device_timeout_s:
                    p.move(
                        d,
                        DeviceState.TIMED_OUT,
                        f"no telemetry with the new model within "
                        f"{config.observe_s + config.device_timeout_s:g}s",
                    )
        elif d.state is DeviceState.ROLLING_BACK:
            if d.runs_rollback:
                p.move(d, DeviceState.ROLLED_BACK, "reports the previous model active again")
            elif d.install_error is not None:
                p.move(d, DeviceState.ROLLBACK_FAILED, f"rollback refused: {d.install_error}")
            elif age > config.device_timeout_s:
                p.move(
                    d,
                    DeviceState.ROLLBACK_FAILED,
                    f"rollback not finished within {config.device_timeout_s:g}s",
                )
    for t in p.transitions:
        states[t.device_id] = t.state
    return states


def _threshold_breach(
    config: RolloutConfig, finished: Sequence[DeviceState], *, canary: bool
) -> str | None:
    """Why the finished devices breach a threshold, or ``None``."""
    executed = [s for s in finished if s in EXECUTED_STATES]
    n = len(executed)
    if n == 0 or (n < config.min_executed and not canary):
        return None
    failed = sum(s is DeviceState.FAILED for s in executed)
    timed_out = sum(s is DeviceState.TIMED_OUT for s in executed)
    scope = "of the canary" if canary else "of executed devices"
    if 100.0 * failed / n > config.failure_threshold_pct:
        return (
            f"{failed}/{n} ({100.0 * failed / n:.0f}%) {scope} failed; the failure threshold "
            f"is {config.failure_threshold_pct:g}%"
        )
    if 100.0 * timed_out / n > config.timeout_threshold_pct:
        return (
            f"{timed_out}/{n} ({100.0 * timed_out / n:.0f}%) {scope} timed out; the timeout "
            f"threshold is {config.timeout_threshold_pct:g}%"
        )
    return None


def _roll_back(devices: Sequence[DeviceView], states: Mapping[str, DeviceState], p: Plan) -> None:
    """Send started devices back to their previous model; cancel the unstarted."""
    for d in devices:
        state = states[d.device_id]
        if state is DeviceState.PENDING:
            p.move(d, DeviceState.CANCELLED, "rollout stopped before this device started")
        elif state in FORWARD_STATES:
            if d.has_previous:
                p.move(d, DeviceState.ROLLING_BACK, "returning to the previous model")
            else:
                p.move(d, DeviceState.ROLLBACK_FAILED, "no previous model to return to")


def plan(
    config: RolloutConfig,
    rollout: RolloutView,
    devices: Sequence[DeviceView],
    now: datetime,
) -> Plan:
    """Decide one step of a rollout. Pure: reads its arguments only.

    Args:
        config: the rollout's strategy.
        rollout: its status, current wave and timers.
        devices: every member device, in a stable order (the runner sorts by id).
        now: the current time (aware UTC).
    """
    p = Plan()
    status = rollout.status
    if status not in ACTIVE_STATUSES:
        return p
    states = _judge_devices(config, devices, now, p)

    if status in (RolloutStatus.HALTED, RolloutStatus.ABORTED):
        # The halt or abort may come from the operator; roll back whatever is
        # still pointed at the new model (idempotent: rolled-back devices stay).
        _roll_back(devices, states, p)
        return p

    # Safety first: a breach halts even a paused rollout.
    finished = [states[d.device_id] for d in devices]
    breach = _threshold_breach(config, finished, canary=False)
    if breach is None and status is not RolloutStatus.COMPLETED and rollout.wave == 0:
        canary = [states[d.device_id] for d in devices if d.wave == 0]
        size = wave_size(config, 0, len(devices))
        if (
            canary
            and (len(canary) >= size or not _eligible(devices, states))
            and all(s in DONE_STATES for s in canary)
        ):
            breach = _threshold_breach(config, canary, canary=True)
    if breach is not None and status is not RolloutStatus.COMPLETED:
        p.status = RolloutStatus.HALTED
        p.reason = f"halted: {breach}"
        p.decisions.append(Decision("halted", breach, wave=rollout.wave))
        _roll_back(devices, states, p)
        return p

    busy = sum(s in BUSY_STATES for s in states.values())
    pending = [d for d in devices if states[d.device_id] is DeviceState.PENDING]

    if status is RolloutStatus.COMPLETED:
        # Continuous deployment: devices that joined the selection later
        # start right away (still within max_in_flight).
        for d in pending:
            if busy >= config.max_in_flight:
                break
            if d.online:
                p.move(
                    d,
                    DeviceState.IN_FLIGHT,
                    "joined the rollout's selection after it completed",
                    wave=rollout.wave,
                )
                busy += 1
        return p

    if rollout.deadline_at is not None and now >= rollout.deadline_at:
        for d in pending:
            p.move(d, DeviceState.EXPIRED, "still offline (or not started) at the rollout deadline")
            states[d.device_id] = DeviceState.EXPIRED
        pending = []

    if status is RolloutStatus.RUNNING:
        _advance_waves(config, rollout, devices, states, pending, busy, now, p)

    if not any(s in (BUSY_STATES | {DeviceState.PENDING}) for s in states.values()) and (
        status is RolloutStatus.RUNNING
    ):
        counts = {s: sum(v is s for v in states.values()) for s in DeviceState}
        summary = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
        p.status = RolloutStatus.COMPLETED
        p.reason = f"completed: {summary or 'no devices'}"
        p.decisions.append(
            Decision("completed", summary or "no devices matched", wave=rollout.wave)
        )
    return p


def _eligible(devices: Sequence[DeviceView], states: Mapping[str, DeviceState]) -> bool:
    return any(d.online and states[d.device_id] is DeviceState.PENDING for d in devices)


def _advance_waves(
    config: RolloutConfig,
    rollout: RolloutView,
    devices: Sequence[DeviceView],
    states: dict[str, DeviceState],
    pending: list[DeviceView],
    busy: int,
    now: datetime,
    p: Plan,
) -> None:
    """Start devices of the current wave, close it, soak, open the next."""
    wave = rollout.wave
    in_wave = [d for d in devices if d.wave == wave]
    size = wave_size(config, wave, len(devices))
    if rollout.next_wave_at is not None:
        if now < rollout.next_wave_at:
            return
        wave += 1
        size = wave_size(config, wave, len(devices))
        in_wave = []
        p.wave = wave
        p.wave_started_at = now
        p.clear_next_wave_at = True
        p.decisions.append(
            Decision(
                "wave_started",
                f"soak over; wave {wave} starts with up to {size} devices",
                wave=wave,
            )
        )
    elif rollout.wave_started_at is None:
        p.wave_started_at = now
        p.decisions.append(
            Decision("wave_started", f"canary starts with up to {size} devices", wave=wave)
        )

    started = len(in_wave)
    for d in pending:
        if started >= size or busy >= config.max_in_flight:
            break
        if not d.online:
            continue
        label = "canary" if wave == 0 else f"wave {wave}"
        p.move(d, DeviceState.IN_FLIGHT, f"started in {label}", wave=wave)
        states[d.device_id] = DeviceState.IN_FLIGHT
        started += 1
        busy += 1

    members = [d.device_id for d in in_wave] + [
        t.device_id for t in p.transitions if t.state is DeviceState.IN_FLIGHT
    ]
    closed = started >= size or not _eligible(devices, states)
    if not members or not closed:
        return
    if not all(states[i] in DONE_STATES for i in members):
        return
    if not any(s is DeviceState.PENDING for s in states.values()):
        return  # the last wave: the caller decides completion
    done = [states[i] for i in members]
    summary = ", ".join(
        f"{sum(s is st for s in done)} {st.value}"
        for st in DONE_STATES
        if any(s is st for s in done)
    )
    label = "canary" if wave == 0 else f"wave {wave}"
    p.next_wave_at = now + timedelta(seconds=config.soak_s)
    p.decisions.append(
        Decision(
            "wave_completed", f"{label} finished ({summary}); soaking {config.soak_s:g}s", wave=wave
        )
    )
