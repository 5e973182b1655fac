"""Rollout persistence: create and command rollouts, and take engine steps atomically.

All rollout state lives in the registry (tables ``rollouts``,
``rollout_devices`` and ``rollout_decisions``), so a controller killed at any
point loses nothing: :meth:`RolloutStore.step` reads a rollout, asks the pure
engine (:func:`edgefleet.controller.rollout.engine.plan`) what to do and
applies the answer - device transitions, desired states, re-issued bundles,
decisions - in **one** transaction. Either all of a step commits or none of
it, and the next controller to step the rollout sees exactly what was
committed.

Several controllers may share one database. A step first locks the rollout
row: ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL (a busy rollout is
skipped, not waited for), ``BEGIN IMMEDIATE`` on SQLite (one writer at a
time). All reads of the step happen after the lock, so two controllers never
decide from the same snapshot. Independently of locking, a device can be
started at most once per rollout: the forward deployment's id *is* the
rollout id and ``deployment_targets`` is keyed by (deployment, device).

Devices are selected by id, tag, hardware profile or ``all``
(:class:`~edgefleet.controller.rollout.selector.Selector`); tags double as
groups (ADR 0004). A rollout whose selection is by tag, profile or ``all``
picks up devices that match later (continuous deployment).

This store builds on the registry (its database and its bundle-choice and
desired-state rules); the registry knows nothing of rollouts.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.controller.errors import NotFoundError
from edgefleet.controller.registry import Registry
from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.catalog import reissue_bundle
from edgefleet.controller.registry.deployments import (
    assign_desired,
    no_bundle_reason,
    pick_bundle,
)
from edgefleet.controller.registry.telemetry import (
    clean_count,
    clean_latency,
    summed_count,
    valid_count,
    valid_latency,
)
from edgefleet.controller.rollout.engine import (
    ACTIVE_STATUSES,
    FORWARD_STATES,
    Decision,
    DeviceState,
    DeviceView,
    Health,
    LoadBaseline,
    Plan,
    RolloutConfig,
    RolloutStatus,
    RolloutView,
    WindowHealth,
    plan,
)
from edgefleet.controller.rollout.errors import RolloutError, RolloutStateError
from edgefleet.controller.rollout.selector import Selector

__all__ = [
    "DecisionInfo",
    "Reissue",
    "ReissueSigner",
    "RolloutDeviceInfo",
    "RolloutInfo",
    "RolloutStore",
    "Selector",
    "StepResult",
    "WaveInfo",
]

# How many recent windows of the previous version make a device's p95 baseline.
_BASELINE_WINDOWS = 20
# Statuses whose members are "taken": another rollout must not claim them.
_OWNING = tuple(
    s.value
    for s in (
        RolloutStatus.CREATED,
        RolloutStatus.RUNNING,
        RolloutStatus.PAUSED,
        RolloutStatus.COMPLETED,
    )
)


# --------------------------------------------------------------------------- values
@dataclass(frozen=True)
class RolloutInfo:
    """A rollout as stored, with device counts per state."""

    id: str
    model: str
    version: str
    release: int
    status: RolloutStatus
    selector: Selector
    config: RolloutConfig
    wave: int
    created_at: datetime
    started_at: datetime | None
    deadline_at: datetime | None
    finished_at: datetime | None
    next_wave_at: datetime | None
    reason: str
    steps: int
    counts: dict[str, int] = field(default_factory=dict)
    # Selected devices that are not members because no bundle fits them
    # (device -> why, e.g. "not eligible: no bundle for runtimes [tflite] ...").
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.model}@{self.version}"

    @property
    def devices(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class RolloutDeviceInfo:
    """One device's progress in a rollout."""

    device_id: str
    state: DeviceState
    wave: int | None
    started_at: datetime | None
    state_since: datetime
    reason: str
    baseline_p95_ms: float | None
    observed_p95_ms: float | None
    observed_requests: int | None
    observed_errors: int | None
    has_previous: bool


@dataclass(frozen=True)
class DecisionInfo:
    """One recorded decision."""

    id: int
    at: datetime
    kind: str
    device_id: str | None
    wave: int | None
    actor: str
    reason: str


@dataclass(frozen=True)
class WaveInfo:
    """Progress of one wave: devices per state and the mean observed p95."""

    wave: int
    counts: dict[str, int]
    p95_ms: float | None

    @property
    def devices(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Reissue:
    """A bundle to sign again under ``target_path`` with a newer ``release``."""

    original_target_path: str
    target_path: str
    release: int
    original_release: int


ReissueSigner = Callable[[Reissue], None]
"""Publishes the TUF target of a re-issue (the runner passes the repository's)."""


@dataclass(frozen=True)
class StepResult:
    """What one step did; ``desired_changed`` means the outbox has work."""

    rollout_id: str
    plan: Plan
    desired_changed: bool


# --------------------------------------------------------------------------- helpers
def _new_id() -> str:
    # Short enough that "<id>-rb<version id>" fits deployments.id (32).
    return "ro-" + secrets.token_hex(8)


def _rollback_deployment_id(rollout_id: str, version_id: int) -> str:
    return f"{rollout_id}-rb{version_id}"


def _release_of(bundle: m.Bundle, version: m.ModelVersion) -> int:
    return version.release if bundle.release is None else bundle.release


def _load_baseline(r: m.RolloutDevice) -> LoadBaseline | None:
    """The stored per-sample baseline of a member, if the device had one at start."""
    if r.baseline_sample_p95_ms is None or r.baseline_batch is None or r.baseline_rate_rps is None:
        return None
    return LoadBaseline(r.baseline_sample_p95_ms, r.baseline_batch, r.baseline_rate_rps)


def _runs(device: m.Device, version: m.ModelVersion, release: int) -> bool:
    return (
        device.active_model == version.model.name
        and device.active_version == version.version
        and device.active_release == release
    )


def _install_error(
    device: m.Device, deployment_id: str | None, generation: int | None
) -> str | None:
    """The refusal the device reported for exactly this intent, if any."""
    reported = device.reported or {}
    if deployment_id is None or generation is None:
        return None
    if reported.get("deployment_id") != deployment_id or reported.get("generation") != generation:
        return None
    if reported.get("state") != "failed":
        return None
    error = reported.get("last_error") or {}
    code = error.get("code", "unknown") if isinstance(error, dict) else "unknown"
    message = error.get("message", "") if isinstance(error, dict) else ""
    return f"{code}: {message}" if message else str(code)


def _active_target(device: m.Device) -> str | None:
    active = (device.reported or {}).get("active")
    if isinstance(active, dict) and isinstance(active.get("target"), str):
        return str(active["target"])
    return None


def _is_postgres(s: Session) -> bool:
    return s.get_bind().dialect.name == "postgresql"


# --------------------------------------------------------------------------- store
class RolloutStore:
    """Rollout operations on a :class:`Registry`'s database.

    Args:
        registry: the open registry; its sessions (and SQLite write locking)
            are reused.
        actor: who this process is in the decision log (a controller id, or
            ``cli:<user>`` for operator commands).
    """

    def __init__(self, registry: Registry, *, actor: str = "controller") -> None:
        self.registry = registry
        self.actor = actor

    # ------------------------------------------------------------------ operator commands
    def create(
        self,
        model: str,
        version: str,
        selector: Selector,
        config: RolloutConfig,
        *,
        start: bool = True,
    ) -> RolloutInfo:
        """Create a rollout of ``model@version`` (and start it unless ``start`` is false).

        Raises:
            NotFoundError: the model version or a named device does not exist.
            RolloutError: the version has no bundles.
            RolloutStateError: a selected device is in another unfinished rollout.
        """
        with self.registry.database.write() as s:
            mv = s.scalars(
                sa.select(m.ModelVersion)
                .join(m.ModelVersion.model)
                .where(m.Model.name == model, m.ModelVersion.version == version)
            ).one_or_none()
            if mv is None:
                raise NotFoundError(f"model version {model}@{version} does not exist")
            if not s.scalar(sa.select(m.Bundle.id).where(m.Bundle.model_version_id == mv.id)):
                raise RolloutError(f"{model}@{version} has no bundles to roll out")
            if selector.devices:
                known = set(
                    s.scalars(sa.select(m.Device.id).where(m.Device.id.in_(selector.devices)))
                )
                missing = [d for d in selector.devices if d not in known]
                if missing:
                    raise NotFoundError(f"unknown devices: {', '.join(missing)}")
            now = m.utcnow()
            row = m.Rollout(
                id=_new_id(),
                model_version_id=mv.id,
                status=RolloutStatus.CREATED.value,
                selector=selector.to_dict(),
                config=config.to_dict(),
                wave=0,
                created_at=now,
                updated_at=now,
                reason="",
                steps=0,
            )
            s.add(row)
            s.flush()
            self._decide(
                s,
                row.id,
                [
                    Decision(
                        "created",
                        f"{model}@{version} to {selector.describe()}; canary "
                        + (
                            f"{config.canary_count} device(s)"
                            if config.canary_count is not None
                            else f"{config.canary_pct:g}%"
                        )
                        + f", waves from {config.base_rate} x{config.increment_factor:g} up to "
                        f"{config.max_rate}, max {config.max_in_flight} in flight",
                    )
                ],
                now,
            )
            if start:
                self._start(s, row, now)
            rollout_id = row.id
        return self.get(rollout_id)

    def start(self, rollout_id: str) -> RolloutInfo:
        """Start a created rollout: take its members and open the canary.

        Raises:
            NotFoundError, RolloutStateError: see :meth:`create`.
        """
        with self.registry.database.write() as s:
            row = self._locked(s, rollout_id)
            if row.status != RolloutStatus.CREATED.value:
                raise RolloutStateError(
                    f"rollout {rollout_id} is {row.status}; only a created one can start"
                )
            self._start(s, row, m.utcnow())
        return self.get(rollout_id)

    def _start(self, s: Session, row: m.Rollout, now: datetime) -> None:
        selector = Selector.from_dict(row.selector)
        config = RolloutConfig.from_dict(row.config)
        members = self._select(s, selector)
        # Devices no bundle fits (e.g. a TFLite-only gateway and ONNX-only
        # bundles) are not members: they are logged as skipped, with why.
        skipped = self._not_eligible(s, row, members, now)
        members = [d for d in members if d not in skipped]
        busy = self._owned_elsewhere(s, members, row.id, statuses=("running", "paused"))
        if busy:
            listed = ", ".join(f"{d} (rollout {r})" for d, r in sorted(busy.items())[:10])
            raise RolloutStateError(
                f"{len(busy)} selected device(s) are in an unfinished rollout: {listed}; "
                "wait for it, or pause/abort it first"
            )
        # Older finished rollouts stop claiming these devices (and new joiners).
        overlapping = self._owned_elsewhere(s, members, row.id, statuses=("completed", "created"))
        for other_id in sorted(set(overlapping.values())):
            other = s.get(m.Rollout, other_id)
            if other is not None and other.status == RolloutStatus.COMPLETED.value:
                other.status = RolloutStatus.SUPERSEDED.value
                other.reason = f"superseded by rollout {row.id}"
                self._decide(
                    s,
                    other.id,
                    [Decision("superseded", f"rollout {row.id} took over its devices")],
                    now,
                )
        for device_id in members:
            s.add(
                m.RolloutDevice(
                    rollout_id=row.id,
                    device_id=device_id,
                    state=DeviceState.PENDING.value,
                    joined_at=now,
                    state_since=now,
                    reason="",
                )
            )
        # The forward deployment shares the rollout's id (see the module docstring).
        s.add(
            m.Deployment(
                id=row.id, model_version_id=row.model_version_id, created_at=now, status="active"
            )
        )
        row.status = RolloutStatus.RUNNING.value
        row.started_at = now
        row.updated_at = now
        if config.deadline_s is not None:
            row.deadline_at = now + timedelta(seconds=config.deadline_s)
        self._decide(
            s,
            row.id,
            [
                Decision(
                    "started",
                    f"{len(members)} device(s) selected ({selector.describe()})"
                    + (f"; {len(skipped)} not eligible" if skipped else ""),
                )
            ],
            now,
        )

    def pause(self, rollout_id: str, reason: str = "") -> RolloutInfo:
        """Stop starting devices; started ones are still judged (and may halt the rollout).

        Raises:
            RolloutStateError: the rollout is not running.
        """
        return self._command(
            rollout_id, "pause", {RolloutStatus.RUNNING}, RolloutStatus.PAUSED, reason
        )

    def resume(self, rollout_id: str, reason: str = "") -> RolloutInfo:
        """Continue a paused rollout.

        Raises:
            RolloutStateError: the rollout is not paused.
        """
        return self._command(
            rollout_id, "resume", {RolloutStatus.PAUSED}, RolloutStatus.RUNNING, reason
        )

    def abort(self, rollout_id: str, reason: str = "") -> RolloutInfo:
        """Stop the rollout and roll every started device back to its previous model.

        Raises:
            RolloutStateError: the rollout already ended (halted, aborted or superseded).
        """
        return self._command(
            rollout_id,
            "abort",
            {
                RolloutStatus.CREATED,
                RolloutStatus.RUNNING,
                RolloutStatus.PAUSED,
                RolloutStatus.COMPLETED,
            },
            RolloutStatus.ABORTED,
            reason,
        )

    def _command(
        self,
        rollout_id: str,
        verb: str,
        allowed: set[RolloutStatus],
        to: RolloutStatus,
        reason: str,
    ) -> RolloutInfo:
        with self.registry.database.write() as s:
            row = self._locked(s, rollout_id)
            if RolloutStatus(row.status) not in allowed:
                raise RolloutStateError(
                    f"rollout {rollout_id} is {row.status}; cannot {verb} it (possible when "
                    f"{' or '.join(sorted(a.value for a in allowed))})"
                )
            now = m.utcnow()
            row.status = to.value
            row.updated_at = now
            kind = {"pause": "paused", "resume": "resumed", "abort": "aborted"}[verb]
            why = reason or f"{self.actor} {kind} the rollout"
            row.reason = f"{kind}: {why}"
            if to is RolloutStatus.ABORTED:
                row.finished_at = now
            self._decide(s, row.id, [Decision(kind, why, wave=row.wave)], now)
        return self.get(rollout_id)

    # ------------------------------------------------------------------ reading
    def get(self, rollout_id: str) -> RolloutInfo:
        """Return one rollout.

        Raises:
            NotFoundError: no such rollout.
        """
        with self.registry.database.read() as s:
            row = s.get(m.Rollout, rollout_id)
            if row is None:
                raise NotFoundError(f"rollout {rollout_id!r} does not exist")
            return self._infos(s, [row])[0]

    def list_rollouts(self) -> list[RolloutInfo]:
        """All rollouts, newest first."""
        with self.registry.database.read() as s:
            rows = list(
                s.scalars(sa.select(m.Rollout).order_by(m.Rollout.created_at.desc(), m.Rollout.id))
            )
            return self._infos(s, rows)

    def _infos(self, s: Session, rows: Sequence[m.Rollout]) -> list[RolloutInfo]:
        if not rows:
            return []
        ids = [r.id for r in rows]
        counts: dict[str, dict[str, int]] = {i: {} for i in ids}
        for rid, state, n in s.execute(
            sa.select(m.RolloutDevice.rollout_id, m.RolloutDevice.state, sa.func.count())
            .where(m.RolloutDevice.rollout_id.in_(ids))
            .group_by(m.RolloutDevice.rollout_id, m.RolloutDevice.state)
        ):
            counts[rid][state] = int(n)
        skipped: dict[str, dict[str, str]] = {i: {} for i in ids}
        member = (
            sa.select(m.RolloutDevice.device_id)
            .where(
                m.RolloutDevice.rollout_id == m.RolloutDecision.rollout_id,
                m.RolloutDevice.device_id == m.RolloutDecision.device_id,
            )
            .exists()
        )
        for rid, device_id, reason in s.execute(
            sa.select(
                m.RolloutDecision.rollout_id, m.RolloutDecision.device_id, m.RolloutDecision.reason
            )
            .where(
                m.RolloutDecision.rollout_id.in_(ids),
                m.RolloutDecision.kind == "skipped",
                ~member,
            )
            .order_by(m.RolloutDecision.id)
        ):
            if device_id is not None:
                skipped[rid][device_id] = reason  # the latest reason wins
        versions = {
            v.id: v
            for v in s.scalars(
                sa.select(m.ModelVersion).where(
                    m.ModelVersion.id.in_({r.model_version_id for r in rows})
                )
            )
        }
        out = []
        for r in rows:
            v = versions[r.model_version_id]
            out.append(
                RolloutInfo(
                    id=r.id,
                    model=v.model.name,
                    version=v.version,
                    release=v.release,
                    status=RolloutStatus(r.status),
                    selector=Selector.from_dict(r.selector),
                    config=RolloutConfig.from_dict(r.config),
                    wave=r.wave,
                    created_at=r.created_at,
                    started_at=r.started_at,
                    deadline_at=r.deadline_at,
                    finished_at=r.finished_at,
                    next_wave_at=r.next_wave_at,
                    reason=r.reason,
                    steps=r.steps,
                    counts=counts[r.id],
                    skipped=skipped[r.id],
                )
            )
        return out

    def devices(self, rollout_id: str) -> list[RolloutDeviceInfo]:
        """The rollout's devices by wave, then id."""
        with self.registry.database.read() as s:
            rows = s.scalars(
                sa.select(m.RolloutDevice)
                .where(m.RolloutDevice.rollout_id == rollout_id)
                .order_by(m.RolloutDevice.device_id)
            )
            out = [
                RolloutDeviceInfo(
                    device_id=r.device_id,
                    state=DeviceState(r.state),
                    wave=r.wave,
                    started_at=r.started_at,
                    state_since=r.state_since,
                    reason=r.reason,
                    baseline_p95_ms=r.baseline_p95_ms,
                    observed_p95_ms=r.observed_p95_ms,
                    observed_requests=r.observed_requests,
                    observed_errors=r.observed_errors,
                    has_previous=r.previous_bundle_id is not None,
                )
                for r in rows
            ]
        return sorted(out, key=lambda d: (d.wave is None, d.wave or 0, d.device_id))

    def waves(self, rollout_id: str) -> list[WaveInfo]:
        """Per-wave device counts and mean observed p95; unstarted devices are wave -1."""
        by_wave: dict[int, dict[str, int]] = {}
        p95s: dict[int, list[float]] = {}
        for d in self.devices(rollout_id):
            w = -1 if d.wave is None else d.wave
            by_wave.setdefault(w, {})
            by_wave[w][d.state.value] = by_wave[w].get(d.state.value, 0) + 1
            if d.observed_p95_ms is not None:
                p95s.setdefault(w, []).append(d.observed_p95_ms)
        return [
            WaveInfo(w, counts, (sum(p95s[w]) / len(p95s[w])) if p95s.get(w) else None)
            for w, counts in sorted(by_wave.items())
        ]

    def decisions(
        self, rollout_id: str, *, after_id: int = 0, limit: int = 10_000
    ) -> list[DecisionInfo]:
        """The decision log, oldest first."""
        with self.registry.database.read() as s:
            rows = s.scalars(
                sa.select(m.RolloutDecision)
                .where(m.RolloutDecision.rollout_id == rollout_id, m.RolloutDecision.id > after_id)
                .order_by(m.RolloutDecision.id)
                .limit(limit)
            )
            return [
                DecisionInfo(r.id, r.at, r.kind, r.device_id, r.wave, r.actor, r.reason)
                for r in rows
            ]

    def active_ids(self) -> list[str]:
        """Rollouts a controller must keep stepping (running, paused, completed, rolling back)."""
        unsettled = (
            sa.select(m.RolloutDevice.rollout_id)
            .where(
                m.RolloutDevice.rollout_id == m.Rollout.id,
                m.RolloutDevice.state.in_(
                    [
                        st.value
                        for st in FORWARD_STATES | {DeviceState.ROLLING_BACK, DeviceState.PENDING}
                    ]
                ),
            )
            .exists()
        )
        ended = [RolloutStatus.HALTED.value, RolloutStatus.ABORTED.value]
        with self.registry.database.read() as s:
            return list(
                s.scalars(
                    sa.select(m.Rollout.id)
                    .where(
                        m.Rollout.status.in_([st.value for st in ACTIVE_STATUSES]),
                        # A halted or aborted rollout needs steps only while it rolls back.
                        sa.or_(m.Rollout.status.not_in(ended), unsettled),
                    )
                    .order_by(m.Rollout.created_at, m.Rollout.id)
                )
            )

    # ------------------------------------------------------------------ the step
    def step(
        self, rollout_id: str, sign: ReissueSigner, *, now: datetime | None = None
    ) -> StepResult | None:
        """Take one engine step of a rollout in one transaction.

        Args:
            rollout_id: the rollout.
            sign: publishes the TUF target of a re-issued bundle; it is called
                inside the transaction, before commit, so a desired state never
                names a target that is not signed yet. (A crash after signing
                and before commit leaves an unused signed target: harmless.)
            now: the time to decide with (tests); default: now.

        Returns:
            ``None`` if another controller holds the rollout or it is no
            longer active; otherwise what the step did.
        """
        with self.registry.database.write() as s:
            q = sa.select(m.Rollout).where(m.Rollout.id == rollout_id)
            if _is_postgres(s):
                q = q.with_for_update(skip_locked=True)
            row = s.scalars(q).one_or_none()
            if row is None or RolloutStatus(row.status) not in ACTIVE_STATUSES:
                return None
            now = now or m.utcnow()
            version = s.get(m.ModelVersion, row.model_version_id)
            assert version is not None
            config = RolloutConfig.from_dict(row.config)
            status = RolloutStatus(row.status)
            joined = self._join_new(s, row, status, now)

            members = list(
                s.scalars(
                    sa.select(m.RolloutDevice)
                    .where(m.RolloutDevice.rollout_id == row.id)
                    .order_by(m.RolloutDevice.device_id)
                )
            )
            devices = {
                d.id: d
                for d in s.scalars(
                    sa.select(m.Device).where(m.Device.id.in_([r.device_id for r in members]))
                )
            }
            bundle_ids = {
                b for r in members for b in (r.bundle_id, r.rollback_bundle_id) if b is not None
            }
            bundles = {
                b.id: b for b in s.scalars(sa.select(m.Bundle).where(m.Bundle.id.in_(bundle_ids)))
            }
            versions = {
                v.id: v
                for v in s.scalars(
                    sa.select(m.ModelVersion).where(
                        m.ModelVersion.id.in_({b.model_version_id for b in bundles.values()})
                    )
                )
            }
            health = self._health(s, row.id, version.version)
            views = []
            for r in members:
                d = devices[r.device_id]
                target = bundles.get(r.bundle_id) if r.bundle_id is not None else None
                back = (
                    bundles.get(r.rollback_bundle_id) if r.rollback_bundle_id is not None else None
                )
                state = DeviceState(r.state)
                if state is DeviceState.ROLLING_BACK:
                    error = _install_error(d, r.rollback_deployment_id, r.rollback_generation)
                else:
                    error = _install_error(d, row.id, r.generation)
                views.append(
                    DeviceView(
                        device_id=r.device_id,
                        state=state,
                        wave=r.wave,
                        online=d.online,
                        state_since=r.state_since,
                        has_previous=r.previous_bundle_id is not None
                        or state is DeviceState.PENDING,
                        runs_target=target is not None
                        and _runs(d, version, _release_of(target, version)),
                        runs_rollback=back is not None
                        and _runs(
                            d,
                            versions[back.model_version_id],
                            _release_of(back, versions[back.model_version_id]),
                        ),
                        install_error=error,
                        health=health.get(r.device_id, Health()),
                        baseline_p95_ms=r.baseline_p95_ms,
                        baseline_load=_load_baseline(r),
                    )
                )
            view = RolloutView(
                status=status,
                wave=row.wave,
                wave_started_at=row.wave_started_at,
                next_wave_at=row.next_wave_at,
                deadline_at=row.deadline_at,
                reason=row.reason,
            )
            decided = plan(config, view, views, now)
            if decided.empty and not joined:
                return StepResult(row.id, decided, desired_changed=False)
            changed = self._apply(
                s, row, version, {r.device_id: r for r in members}, devices, decided, sign, now
            )
            row.steps += 1
            row.updated_at = now
            return StepResult(row.id, decided, desired_changed=changed)

    # ------------------------------------------------------------------ step internals
    def _apply(
        self,
        s: Session,
        row: m.Rollout,
        version: m.ModelVersion,
        members: Mapping[str, m.RolloutDevice],
        devices: Mapping[str, m.Device],
        decided: Plan,
        sign: ReissueSigner,
        now: datetime,
    ) -> bool:
        decisions = list(decided.decisions)
        starts = [t for t in decided.transitions if t.state is DeviceState.IN_FLIGHT]
        backs = [t for t in decided.transitions if t.state is DeviceState.ROLLING_BACK]
        changed = False
        failed_starts: dict[str, str] = {}
        if starts:
            failed_starts = self._start_devices(s, row, version, members, devices, starts, now)
            changed = True
        no_previous: set[str] = set()
        if backs:
            no_previous = self._roll_back(s, row, version, members, devices, backs, sign, now)
            changed = True
        for t in decided.transitions:
            r = members[t.device_id]
            state, reason = t.state, t.reason
            if t.device_id in failed_starts:
                # No bundle fits the device (it reported other runtimes since
                # it joined): not a failure of the model, so not counted as one.
                state, reason = DeviceState.CANCELLED, failed_starts[t.device_id]
                decisions.append(Decision("skipped", reason, t.device_id, t.wave))
            elif t.device_id in no_previous:
                state, reason = DeviceState.ROLLBACK_FAILED, "previous model's bundle is unknown"
                decisions.append(Decision("device_rollback_failed", reason, t.device_id, r.wave))
            r.state = state.value
            r.reason = reason
            r.state_since = now
            if t.wave is not None:
                r.wave = t.wave
            if t.state is DeviceState.OBSERVING:
                r.telemetry_mark = (
                    s.scalar(
                        sa.select(sa.func.max(m.TelemetryRecord.id)).where(
                            m.TelemetryRecord.device_id == t.device_id
                        )
                    )
                    or 0
                )
            if t.health is not None:
                r.observed_p95_ms = t.health.p95_ms
                r.observed_requests = t.health.requests
                r.observed_errors = t.health.errors
        if decided.status is not None:
            row.status = decided.status.value
            if decided.status in (RolloutStatus.COMPLETED, RolloutStatus.HALTED):
                row.finished_at = now
        if decided.reason is not None:
            row.reason = decided.reason
        if decided.wave is not None:
            row.wave = decided.wave
        if decided.wave_started_at is not None:
            row.wave_started_at = decided.wave_started_at
        if decided.clear_next_wave_at:
            row.next_wave_at = None
        if decided.next_wave_at is not None:
            row.next_wave_at = decided.next_wave_at
        self._decide(s, row.id, decisions, now)
        return changed

    def _start_devices(
        self,
        s: Session,
        row: m.Rollout,
        version: m.ModelVersion,
        members: Mapping[str, m.RolloutDevice],
        devices: Mapping[str, m.Device],
        starts: Sequence[Any],
        now: datetime,
    ) -> dict[str, str]:
        """Point started devices at the new model; returns devices that cannot start, with why."""
        ids = sorted(t.device_id for t in starts)
        # Same lock as Registry.create_deployment, so concurrent deploys serialize.
        list(
            s.scalars(
                sa.select(m.Device.id)
                .where(m.Device.id.in_(ids))
                .order_by(m.Device.id)
                .with_for_update(key_share=True)
            )
        )
        bundles = list(
            s.scalars(
                sa.select(m.Bundle)
                .where(m.Bundle.model_version_id == version.id, m.Bundle.reissue_of.is_(None))
                .order_by(m.Bundle.id)
            )
        )
        chosen: dict[str, m.Bundle] = {}
        refused: dict[str, str] = {}
        for device_id in ids:
            bundle = pick_bundle(devices[device_id], bundles)
            if bundle is None:
                refused[device_id] = (
                    f"not eligible: {no_bundle_reason(devices[device_id], bundles)}"
                )
            else:
                chosen[device_id] = bundle
        targets = (
            {t.device_id: t for t in assign_desired(s, row.id, version, chosen, now)}
            if chosen
            else {}
        )
        previous = {
            b.target_path: b
            for b in s.scalars(
                sa.select(m.Bundle).where(
                    m.Bundle.target_path.in_(
                        {p for p in (_active_target(devices[i]) for i in ids) if p is not None}
                    )
                )
            )
        }
        for device_id in ids:
            r = members[device_id]
            r.started_at = now
            if device_id not in chosen:
                continue
            r.bundle_id = chosen[device_id].id
            r.generation = targets[device_id].generation
            active = _active_target(devices[device_id])
            prev = previous.get(active) if active is not None else None
            r.previous_bundle_id = None if prev is None else prev.id
            r.baseline_p95_ms = self._baseline(s, devices[device_id])
            load = self._baseline_load(s, devices[device_id])
            if load is not None:
                r.baseline_sample_p95_ms = load.sample_p95_ms
                r.baseline_batch = load.batch
                r.baseline_rate_rps = load.rate_rps
        return refused

    @staticmethod
    def _baseline(s: Session, device: m.Device) -> float | None:
        """Request-weighted p95 of the device's recent windows with the model it runs now."""
        if device.active_version is None:
            return None
        t = m.TelemetryRecord
        rows = s.execute(
            sa.select(t.requests, t.p95_ms)
            .where(
                t.device_id == device.id,
                t.model_version == device.active_version,
                t.requests > 0,
                valid_count(t.requests),
                valid_latency(t.p95_ms),
            )
            .order_by(t.id.desc())
            .limit(_BASELINE_WINDOWS)
        ).all()
        weight = sum(int(n) for n, _ in rows)
        if not weight:
            return None
        return sum(int(n) * float(p or 0.0) for n, p in rows) / weight

    @staticmethod
    def _baseline_load(s: Session, device: m.Device) -> LoadBaseline | None:
        """Per-sample p95 and load of the device's recent windows with the model it runs now.

        The p95 is weighted by samples (a window that served more rows says
        more), the mean batch is samples per request and the rate requests per
        second, over the same windows. None when no recent window has
        per-sample figures (an older agent).
        """
        if device.active_version is None:
            return None
        t = m.TelemetryRecord
        rows = s.execute(
            sa.select(t.requests, t.window_s, t.samples, t.sample_p95_ms)
            .where(
                t.device_id == device.id,
                t.model_version == device.active_version,
                t.requests > 0,
                t.samples > 0,
                valid_count(t.requests),
                valid_count(t.samples),
                valid_latency(t.sample_p95_ms),
            )
            .order_by(t.id.desc())
            .limit(_BASELINE_WINDOWS)
        ).all()
        windows = [
            (int(r), max(0.0, float(w)), int(n or 0), float(p or 0.0)) for r, w, n, p in rows
        ]
        samples = sum(n for _, _, n, _ in windows)
        requests = sum(r for r, _, _, _ in windows)
        if not samples or not requests:
            return None
        seconds = sum(w for _, w, _, _ in windows)
        return LoadBaseline(
            sample_p95_ms=sum(n * p for _, _, n, p in windows) / samples,
            batch=samples / requests,
            rate_rps=requests / seconds if seconds > 0 else float(requests),
        )

    def _roll_back(
        self,
        s: Session,
        row: m.Rollout,
        version: m.ModelVersion,
        members: Mapping[str, m.RolloutDevice],
        devices: Mapping[str, m.Device],
        backs: Sequence[Any],
        sign: ReissueSigner,
        now: datetime,
    ) -> set[str]:
        """Re-issue each previous bundle with a newer release and point devices at it.

        Returns the devices whose previous bundle no longer exists.
        """
        ids = sorted(t.device_id for t in backs)
        list(
            s.scalars(
                sa.select(m.Device.id)
                .where(m.Device.id.in_(ids))
                .order_by(m.Device.id)
                .with_for_update(key_share=True)
            )
        )
        previous = {
            b.id: b
            for b in s.scalars(
                sa.select(m.Bundle).where(
                    m.Bundle.id.in_({members[i].previous_bundle_id for i in ids})
                )
            )
        }
        target_release = max(
            (
                _release_of(b, version)
                for b in s.scalars(
                    sa.select(m.Bundle).where(m.Bundle.model_version_id == version.id)
                )
            ),
            default=version.release,
        )
        reissues: dict[int, m.Bundle] = {}
        by_version: dict[int, dict[str, m.Bundle]] = {}
        missing: set[str] = set()
        for device_id in ids:
            prev = previous.get(members[device_id].previous_bundle_id or -1)
            if prev is None:
                missing.add(device_id)
                continue
            if prev.id not in reissues:
                reissues[prev.id] = self._reissue(s, prev, target_release, sign, now)
            by_version.setdefault(prev.model_version_id, {})[device_id] = reissues[prev.id]
        for version_id, chosen in sorted(by_version.items()):
            dep_id = _rollback_deployment_id(row.id, version_id)
            if s.get(m.Deployment, dep_id) is None:
                s.add(
                    m.Deployment(
                        id=dep_id, model_version_id=version_id, created_at=now, status="active"
                    )
                )
                s.flush()
            prev_version = s.get(m.ModelVersion, version_id)
            assert prev_version is not None
            for t in assign_desired(s, dep_id, prev_version, chosen, now):
                r = members[t.device_id]
                r.rollback_deployment_id = dep_id
                r.rollback_generation = t.generation
                r.rollback_bundle_id = t.bundle_id
        return missing

    @staticmethod
    def _reissue(
        s: Session, original: m.Bundle, above: int, sign: ReissueSigner, now: datetime
    ) -> m.Bundle:
        """A re-issue of ``original`` with a release above ``above``: reused, or made and signed.

        The catalog makes the bundle row (:func:`reissue_bundle`); a new one is
        signed here, inside the step's transaction, so a desired state never
        names a target that is not signed yet.
        """
        reissued = reissue_bundle(s, original, above=above, now=now)
        if reissued.created:
            bundle = reissued.bundle
            assert bundle.release is not None
            sign(
                Reissue(
                    reissued.source.target_path,
                    bundle.target_path,
                    bundle.release,
                    reissued.version.release,
                )
            )
        return reissued.bundle

    def _health(self, s: Session, rollout_id: str, version: str) -> dict[str, Health]:
        """Telemetry of observing devices since their mark, with the new version, in one query."""
        t = m.TelemetryRecord
        rd = m.RolloutDevice
        # Poisoned rows (counts out of range, errors above requests) are left
        # out and the sums run as floats, so no stored row can make this query
        # fail and keep a rollout "running" forever.
        measured = valid_latency(t.p95_ms)
        as_float = sa.cast(t.requests, sa.Float)
        weighted = sa.func.sum(sa.case((measured, t.p95_ms * as_float), else_=0.0))
        weight = sa.func.sum(sa.case((measured, as_float), else_=0.0))
        rows = s.execute(
            sa.select(
                t.device_id,
                sa.func.count(),
                summed_count(t.requests),
                summed_count(t.errors, at_most=t.requests),
                weighted,
                weight,
            )
            .join(rd, sa.and_(rd.device_id == t.device_id, rd.rollout_id == rollout_id))
            .where(
                rd.state == DeviceState.OBSERVING.value,
                t.id > sa.func.coalesce(rd.telemetry_mark, 0),
                t.model_version == version,
                valid_count(t.requests),
                valid_count(t.errors),
                t.errors <= t.requests,
            )
            .group_by(t.device_id)
        ).all()
        loads: dict[str, list[WindowHealth]] = {}
        for device_id, n, window_s, samples, sample_p95 in s.execute(
            sa.select(t.device_id, t.requests, t.window_s, t.samples, t.sample_p95_ms)
            .join(rd, sa.and_(rd.device_id == t.device_id, rd.rollout_id == rollout_id))
            .where(
                rd.state == DeviceState.OBSERVING.value,
                t.id > sa.func.coalesce(rd.telemetry_mark, 0),
                t.model_version == version,
                valid_count(t.requests),
                valid_count(t.errors),
                t.errors <= t.requests,
            )
            .order_by(t.id)
        ):
            # The same windows as the sums above; out-of-range per-sample
            # figures (a poisoned row) read as "not measured".
            loads.setdefault(device_id, []).append(
                WindowHealth(
                    requests=int(n),
                    window_s=float(window_s),
                    samples=None if samples is None or clean_count(samples) != samples else samples,
                    sample_p95_ms=clean_latency(sample_p95),
                )
            )
        out = {}
        for device_id, windows, requests, errors, w_sum, w in rows:
            out[device_id] = Health(
                windows=int(windows),
                requests=int(requests or 0),
                errors=int(errors or 0),
                p95_ms=(float(w_sum) / float(w)) if w else None,
                window_loads=tuple(loads.get(device_id, ())),
            )
        return out

    def _join_new(self, s: Session, row: m.Rollout, status: RolloutStatus, now: datetime) -> bool:
        """Continuous deployment: add devices that match a dynamic selector now."""
        if status not in (RolloutStatus.RUNNING, RolloutStatus.PAUSED, RolloutStatus.COMPLETED):
            return False
        selector = Selector.from_dict(row.selector)
        if not selector.dynamic:
            return False
        matching: set[str] = set(self._select(s, selector))
        have = set(
            s.scalars(
                sa.select(m.RolloutDevice.device_id).where(m.RolloutDevice.rollout_id == row.id)
            )
        )
        new = matching - have
        if not new:
            return False
        taken = self._owned_elsewhere(s, sorted(new), row.id, statuses=_OWNING)
        skipped = self._not_eligible(s, row, sorted(new - set(taken)), now)
        joined = sorted(new - set(taken) - set(skipped))
        for device_id in joined:
            s.add(
                m.RolloutDevice(
                    rollout_id=row.id,
                    device_id=device_id,
                    state=DeviceState.PENDING.value,
                    joined_at=now,
                    state_since=now,
                    reason="",
                )
            )
        if joined:
            s.flush()
            self._decide(
                s,
                row.id,
                [Decision("joined", "now matches the selection", device_id=d) for d in joined],
                now,
            )
        return bool(joined)

    def _not_eligible(
        self, s: Session, row: m.Rollout, device_ids: Sequence[str], now: datetime
    ) -> dict[str, str]:
        """Which of ``device_ids`` no bundle of the rollout's version fits (device -> why).

        Each is logged once as a ``skipped`` decision with the reason (again
        only when the reason changes), so a dynamic rollout re-checks such a
        device every step - it joins once it reports a runtime that fits -
        without repeating itself in the log.
        """
        if not device_ids:
            return {}
        bundles = list(
            s.scalars(
                sa.select(m.Bundle)
                .where(
                    m.Bundle.model_version_id == row.model_version_id,
                    m.Bundle.reissue_of.is_(None),
                )
                .order_by(m.Bundle.id)
            )
        )
        out: dict[str, str] = {}
        for start in range(0, len(device_ids), 500):
            chunk = list(device_ids[start : start + 500])
            for d in s.scalars(sa.select(m.Device).where(m.Device.id.in_(chunk))):
                if pick_bundle(d, bundles) is None:
                    out[d.id] = f"not eligible: {no_bundle_reason(d, bundles)}"
        if out:
            logged: dict[str | None, str] = {}
            for device_id, reason in s.execute(
                sa.select(m.RolloutDecision.device_id, m.RolloutDecision.reason)
                .where(
                    m.RolloutDecision.rollout_id == row.id,
                    m.RolloutDecision.kind == "skipped",
                )
                .order_by(m.RolloutDecision.id)
            ):
                logged[device_id] = reason
            self._decide(
                s,
                row.id,
                [
                    Decision("skipped", why, device_id=d)
                    for d, why in sorted(out.items())
                    if logged.get(d) != why
                ],
                now,
            )
        return out

    @staticmethod
    def _select(s: Session, selector: Selector) -> list[str]:
        rows = s.execute(
            sa.select(m.Device.id, m.Device.tags, m.Device.profile).order_by(m.Device.id)
        )
        return [i for i, tags, profile in rows if selector.matches(i, tags or (), profile)]

    @staticmethod
    def _owned_elsewhere(
        s: Session, device_ids: Sequence[str], rollout_id: str, *, statuses: Sequence[str]
    ) -> dict[str, str]:
        """Which of ``device_ids`` belong to another rollout in ``statuses`` (device -> rollout)."""
        if not device_ids:
            return {}
        out: dict[str, str] = {}
        for chunk_start in range(0, len(device_ids), 500):
            chunk = list(device_ids[chunk_start : chunk_start + 500])
            for device_id, other in s.execute(
                sa.select(m.RolloutDevice.device_id, m.RolloutDevice.rollout_id)
                .join(m.Rollout, m.Rollout.id == m.RolloutDevice.rollout_id)
                .where(
                    m.RolloutDevice.device_id.in_(chunk),
                    m.RolloutDevice.rollout_id != rollout_id,
                    m.Rollout.status.in_(list(statuses)),
                )
            ):
                out[device_id] = other
        return out

    def _locked(self, s: Session, rollout_id: str) -> m.Rollout:
        row = s.scalars(
            sa.select(m.Rollout).where(m.Rollout.id == rollout_id).with_for_update()
        ).one_or_none()
        if row is None:
            raise NotFoundError(f"rollout {rollout_id!r} does not exist")
        return row

    def _decide(
        self, s: Session, rollout_id: str, decisions: Iterable[Decision], now: datetime
    ) -> None:
        s.add_all(
            m.RolloutDecision(
                rollout_id=rollout_id,
                at=now,
                kind=d.kind,
                device_id=d.device_id,
                wave=d.wave,
                actor=self.actor[:128],
                reason=d.reason,
            )
            for d in decisions
        )
