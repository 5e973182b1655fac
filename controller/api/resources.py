"""Registry and rollout results as JSON-able dicts, and the device filters.

One function per resource, so the API describes a device, a model or a
rollout the same way on every route. Datetimes stay datetimes here; the
framework writes them as ISO 8601.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from typing import Any

from edgefleet.controller.fleet_actions import DeployOutcome
from edgefleet.controller.registry import (
    BundleInfo,
    DeploymentInfo,
    DeviceInfo,
    DeviceSummary,
    EventInfo,
    FleetStatus,
    ModelVersionInfo,
)
from edgefleet.controller.registry.census import MinutePoint
from edgefleet.controller.registry.fleet import delivery_state
from edgefleet.controller.registry.models import utcnow
from edgefleet.controller.registry.tokens import ApiTokenInfo
from edgefleet.controller.rollout.store import (
    DecisionInfo,
    RolloutDeviceInfo,
    RolloutInfo,
    WaveInfo,
)

__all__ = [
    "PER_DEVICE_COUNTERS",
    "bundle_json",
    "decision_json",
    "deploy_outcome_json",
    "deployment_json",
    "device_json",
    "event_json",
    "filter_devices",
    "fleet_json",
    "minute_json",
    "model_version_json",
    "rollout_device_json",
    "rollout_json",
    "token_json",
    "wave_json",
]

PER_DEVICE_COUNTERS = ("agent_rejected.", "transfer_refused.", "device_rejected.")
"""Counter families named per device: left out of fleet-wide views."""

DEVICE_STATUSES = ("online", "offline", "failed", "idle", "downloading", "installing")


def device_json(
    device: DeviceInfo,
    summary: DeviceSummary | None,
    *,
    ack_warning_s: float = 300.0,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A device with what it runs, how well, and what it should run.

    With a summary, ``delivery`` says what became of the desired state
    (generation, published, what the device last reported, and the state
    ``unpublished``/``waiting``/``unacknowledged``/``acknowledged`` judged
    against ``ack_warning_s``): ``deploy --wait`` follows devices with it.
    """
    out: dict[str, Any] = {
        "id": device.id,
        "hardware_class": device.hardware_class,
        "profile": device.profile,
        "arch": device.arch,
        "cpu_features": list(device.cpu_features),
        "runtimes": list(device.runtimes),
        "tags": list(device.tags),
        "online": device.online,
        "state": device.state,
        "last_seen": device.last_seen,
        "enrolled_at": device.enrolled_at,
        "active": None
        if device.active_model is None
        else {
            "model": device.active_model,
            "version": device.active_version,
            "release": device.active_release,
        },
        "last_error": None if device.last_error is None else device.last_error.to_dict(),
    }
    if summary is not None:
        out["desired"] = (
            None
            if summary.desired_model is None
            else {"model": summary.desired_model, "version": summary.desired_version}
        )
        out["inferences"] = summary.inferences
        out["errors"] = summary.errors
        out["p50_ms"] = summary.p50_ms
        out["variant"] = summary.variant
        out["delivery"] = {
            "state": delivery_state(summary, now or utcnow(), ack_warning_s),
            "generation": summary.desired_generation,
            "published": summary.desired_published,
            "since": summary.desired_since,
            "reported_generation": summary.reported_generation,
        }
    return out


def filter_devices(
    devices: Iterable[DeviceInfo],
    *,
    tag: str | None = None,
    profile: str | None = None,
    status: str | None = None,
    version: str | None = None,
) -> list[DeviceInfo]:
    """Devices matching every filter given.

    ``status`` is ``online``, ``offline`` or an agent state (``failed``,
    ``idle``, ...); ``version`` matches ``name@version`` or the bare version.
    """
    out = []
    for d in devices:
        if tag is not None and tag not in d.tags:
            continue
        if profile is not None and d.profile != profile:
            continue
        if status is not None and not (
            (status == "online" and d.online)
            or (status == "offline" and not d.online)
            or (status not in ("online", "offline") and d.state == status)
        ):
            continue
        if version is not None and version not in (
            d.active_version,
            f"{d.active_model}@{d.active_version}",
        ):
            continue
        out.append(d)
    return out


def event_json(e: EventInfo) -> dict[str, Any]:
    return {
        "id": e.id,
        "kind": e.kind,
        "at": e.at,
        "deployment_id": e.deployment_id,
        "generation": e.generation,
        "error": None if e.error is None else e.error.to_dict(),
        "detail": e.detail,
    }


def minute_json(p: MinutePoint) -> dict[str, Any]:
    return asdict(p)


def fleet_json(status: FleetStatus, rollouts: dict[str, int]) -> dict[str, Any]:
    return {
        "devices": status.devices,
        "online": status.online,
        "offline": status.offline,
        "failed": status.failed,
        "versions": status.versions,
        "inferences": status.inferences,
        "errors": status.errors,
        "rollouts": rollouts,
        "counters": {
            k: v for k, v in status.counters.items() if not k.startswith(PER_DEVICE_COUNTERS)
        },
    }


def bundle_json(b: BundleInfo) -> dict[str, Any]:
    return {
        "id": b.id,
        "hardware_class": b.hardware_class,
        "runtime": b.runtime,
        "precision": b.precision,
        "target": b.target_path,
        "sha256": b.sha256,
        "length": b.length,
        "release": b.release,
        "reissue_of": b.reissue_of,
        "created_at": b.created_at,
        "report": b.report,
    }


def model_version_json(v: ModelVersionInfo, bundles: Iterable[BundleInfo]) -> dict[str, Any]:
    return {
        "id": v.id,
        "name": v.name,
        "version": v.version,
        "release": v.release,
        "description": v.description,
        "source_sha256": v.source_sha256,
        "created_at": v.created_at,
        "inputs": [asdict(t) for t in v.inputs],
        "outputs": [asdict(t) for t in v.outputs],
        "variants": [bundle_json(b) for b in bundles],
    }


def deployment_json(d: DeploymentInfo) -> dict[str, Any]:
    return {
        "id": d.id,
        "model": d.model,
        "version": d.version,
        "release": d.release,
        "status": d.status,
        "created_at": d.created_at,
        "targets": [
            {
                "device_id": t.device_id,
                "generation": t.generation,
                "bundle_id": t.bundle_id,
                "target": t.model.target,
            }
            for t in d.targets
        ],
    }


def deploy_outcome_json(o: DeployOutcome) -> dict[str, Any]:
    return {
        "deployment": deployment_json(o.deployment),
        "all_published": o.all_published,
        "devices": [asdict(d) for d in o.devices],
    }


def rollout_json(r: RolloutInfo) -> dict[str, Any]:
    return {
        "id": r.id,
        "model": r.model,
        "version": r.version,
        "release": r.release,
        "status": r.status.value,
        "reason": r.reason,
        "selector": r.selector.to_dict(),
        "config": r.config.to_dict(),
        "wave": r.wave,
        "created_at": r.created_at,
        "started_at": r.started_at,
        "deadline_at": r.deadline_at,
        "finished_at": r.finished_at,
        "next_wave_at": r.next_wave_at,
        "steps": r.steps,
        "devices": r.devices,
        "counts": r.counts,
        "skipped": r.skipped,
    }


def wave_json(w: WaveInfo) -> dict[str, Any]:
    return {"wave": w.wave, "devices": w.devices, "counts": w.counts, "p95_ms": w.p95_ms}


def decision_json(d: DecisionInfo) -> dict[str, Any]:
    return {
        "id": d.id,
        "at": d.at,
        "kind": d.kind,
        "device_id": d.device_id,
        "wave": d.wave,
        "actor": d.actor,
        "reason": d.reason,
    }


def rollout_device_json(d: RolloutDeviceInfo) -> dict[str, Any]:
    return {
        "device_id": d.device_id,
        "state": d.state.value,
        "wave": d.wave,
        "started_at": d.started_at,
        "state_since": d.state_since,
        "reason": d.reason,
        "baseline_p95_ms": d.baseline_p95_ms,
        "observed_p95_ms": d.observed_p95_ms,
        "observed_requests": d.observed_requests,
        "observed_errors": d.observed_errors,
    }


def token_json(t: ApiTokenInfo) -> dict[str, Any]:
    """A token without its secret (which is stored nowhere)."""
    return {
        "id": t.id,
        "name": t.name,
        "role": t.role.value,
        "created_at": t.created_at,
        "last_used_at": t.last_used_at,
        "revoked_at": t.revoked_at,
    }
