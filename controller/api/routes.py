"""The ``/api/v1`` routes. Each one checks its role, calls one operation, shapes the answer.

Reads go through the registry facade, :mod:`~edgefleet.controller.registry.census`
and the rollout store; actions that must reach devices go through the running
:class:`~edgefleet.controller.service.ControllerService`
(:mod:`~edgefleet.controller.fleet_actions`). Roles: ``viewer`` reads,
``operator`` deploys and steers rollouts, ``admin`` revokes devices and
manages API tokens.
Handlers are plain functions: FastAPI runs them in its thread pool, where
the registry's blocking calls belong.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from edgefleet.controller.api.auth import require
from edgefleet.controller.api.errors import ApiError
from edgefleet.controller.api.resources import (
    DEVICE_STATUSES,
    decision_json,
    deploy_outcome_json,
    deployment_json,
    device_json,
    event_json,
    fleet_json,
    minute_json,
    model_version_json,
    rollout_device_json,
    rollout_json,
    token_json,
    wave_json,
)
from edgefleet.controller.errors import NotFoundError
from edgefleet.controller.fleet_actions import deploy_and_confirm, select_devices
from edgefleet.controller.registry import Registry
from edgefleet.controller.registry.census import rollout_counts, tag_counts, telemetry_series
from edgefleet.controller.registry.models import utcnow
from edgefleet.controller.registry.tokens import ApiTokenInfo, Role, TokenStore
from edgefleet.controller.rollout.engine import RolloutConfig
from edgefleet.controller.rollout.selector import Selector
from edgefleet.controller.rollout.store import RolloutStore
from edgefleet.controller.service import ControllerService

__all__ = ["router"]

router = APIRouter(prefix="/api/v1")

Viewer = Annotated[ApiTokenInfo, Depends(require(Role.VIEWER))]
Operator = Annotated[ApiTokenInfo, Depends(require(Role.OPERATOR))]
Admin = Annotated[ApiTokenInfo, Depends(require(Role.ADMIN))]

_NAME = Field(min_length=1, max_length=128)
_STRATEGY = {f.name for f in dataclasses.fields(RolloutConfig)} - {"canary_count", "canary_pct"}


def _service(request: Request) -> ControllerService:
    service: ControllerService = request.app.state.service
    return service


def _registry(request: Request) -> Registry:
    return _service(request).registry


def _rollouts(request: Request, token: ApiTokenInfo) -> RolloutStore:
    return RolloutStore(_registry(request), actor=f"api:{token.name}"[:128])


# --------------------------------------------------------------------------- bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeployRequest(_Body):
    """Deploy ``model@version`` to devices by id, by tag, or to all."""

    model: str = _NAME
    version: str = Field(min_length=1, max_length=64)
    devices: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=10_000
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=100
    )
    all: bool = False
    wait_published_s: float = Field(default=5.0, ge=0, le=60)


class SelectorBody(_Body):
    devices: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=10_000
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=100
    )
    profiles: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=100
    )
    all: bool = False


class RolloutRequest(_Body):
    """Create (and by default start) a staged rollout."""

    model: str = _NAME
    version: str = Field(min_length=1, max_length=64)
    selector: SelectorBody
    canary: str = Field(default="1", max_length=16, description="N devices or P%")
    strategy: dict[str, float | int | None] = Field(
        default_factory=dict, description="RolloutConfig settings (base_rate, soak_s, ...)"
    )
    start: bool = True


class TokenRequest(_Body):
    """A new API token: who uses it, and what it may do."""

    name: str = _NAME
    role: Role


class TagsRequest(_Body):
    """Tags to add to and remove from one device (both at once is refused)."""

    add: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=64
    )
    remove: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=64
    )


class ReasonRequest(_Body):
    reason: str = Field(default="", max_length=500)


def _canary(value: str) -> dict[str, Any]:
    text = value.strip()
    try:
        if text.endswith("%"):
            return {"canary_count": None, "canary_pct": float(text[:-1])}
        return {"canary_count": int(text), "canary_pct": None}
    except ValueError:
        raise ApiError(
            422, "bad_request", f"canary: expected N devices or P%, got {value!r}"
        ) from None


# --------------------------------------------------------------------------- fleet, devices
@router.get("/fleet", summary="Fleet status: devices online/offline/failed, versions, rollouts")
def fleet(request: Request, _t: Viewer) -> dict[str, Any]:
    registry = _registry(request)
    return fleet_json(registry.fleet_status(), rollout_counts(registry))


@router.get(
    "/devices",
    summary="Devices by id, filtered by tag, profile, status and version; paged by `after`",
)
def devices(
    request: Request,
    _t: Viewer,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    profile: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[str | None, Query(description=", ".join(DEVICE_STATUSES))] = None,
    version: Annotated[
        str | None, Query(max_length=200, description="name@version or version")
    ] = None,
    after: Annotated[
        str | None, Query(max_length=64, description="the `next` of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    if status is not None and status not in DEVICE_STATUSES:
        raise ApiError(422, "bad_request", f"status must be one of {', '.join(DEVICE_STATUSES)}")
    registry = _registry(request)
    # The filters and the page run in SQL; the summaries (telemetry totals)
    # are still computed for the whole fleet (registry.fleet has no per-id query).
    page, after_next = registry.page_devices(
        tag=tag, profile=profile, status=status, version=version, after=after, limit=limit
    )
    summaries = {s.device_id: s for s in registry.device_summaries()} if page else {}
    warn_s, now = _service(request).settings.ack_warning_s, utcnow()
    return {
        "devices": [
            device_json(d, summaries.get(d.id), ack_warning_s=warn_s, now=now) for d in page
        ],
        "next": after_next,
    }


def _device_or_404(registry: Registry, device_id: str) -> Any:
    device = registry.get_device(device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled")
    return device


@router.get("/devices/{device_id}", summary="One device with its events and telemetry series")
def device(
    request: Request,
    device_id: str,
    _t: Viewer,
    events: Annotated[int, Query(ge=0, le=1000)] = 50,
    minutes: Annotated[int, Query(ge=0, le=43_200)] = 60,
) -> dict[str, Any]:
    registry = _registry(request)
    info = _device_or_404(registry, device_id)
    out = device_json(info, None)
    desired = registry.desired_for(device_id)
    out["desired"] = (
        None
        if desired is None or desired.model is None
        else {
            "model": desired.model.name,
            "version": desired.model.version,
            "generation": desired.generation,
            "deployment_id": desired.deployment_id,
        }
    )
    out["events"] = [event_json(e) for e in registry.events_for(device_id, events)]
    series = telemetry_series(registry, device_id, limit=minutes)
    out["telemetry"] = [minute_json(p) for p in series]
    return out


@router.get("/devices/{device_id}/telemetry", summary="A device's per-minute telemetry series")
def device_telemetry(
    request: Request,
    device_id: str,
    _t: Viewer,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=43_200)] = 1440,
) -> dict[str, Any]:
    registry = _registry(request)
    _device_or_404(registry, device_id)
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise ApiError(422, "bad_request", f"{name} needs a time zone (e.g. ...Z)")
    points = telemetry_series(registry, device_id, since=since, until=until, limit=limit)
    return {"device_id": device_id, "minutes": [minute_json(p) for p in points]}


@router.post("/devices/{device_id}/revoke", summary="Revoke every certificate of a device (admin)")
def revoke_device(request: Request, device_id: str, _t: Admin) -> dict[str, Any]:
    from edgefleet.controller.ca import CertificateAuthority

    registry = _registry(request)
    _device_or_404(registry, device_id)
    ca_dir = request.app.state.ca_dir
    if ca_dir is None or not (ca_dir / "ca.pem").exists():
        raise ApiError(409, "no_ca", "this controller has no certificate authority (`ca init`)")
    authority = CertificateAuthority.open(ca_dir)
    revoked = authority.revoke(device_id)
    return {
        "device_id": device_id,
        "revoked_serials": [str(r.serial) for r in revoked],
        "crl": str(authority.crl_file),
    }


@router.post("/devices/{device_id}/tags", summary="Add and remove a device's tags (operator)")
def update_device_tags(
    request: Request, device_id: str, body: TagsRequest, _t: Operator
) -> dict[str, Any]:
    """Tags are edited after enrollment; rollouts select by tag when they choose devices."""
    info = _registry(request).update_tags(device_id, add=body.add, remove=body.remove)
    return {"device_id": info.id, "tags": list(info.tags)}


@router.get("/tags", summary="Tags in use, with their device counts")
def tags(request: Request, _t: Viewer) -> dict[str, Any]:
    counts = tag_counts(_registry(request))
    return {"tags": [{"tag": t, "devices": n} for t, n in counts.items()]}


# --------------------------------------------------------------------------- models
@router.get("/models", summary="Model versions with their variants and compile reports")
def models(
    request: Request, _t: Viewer, name: Annotated[str | None, Query(max_length=128)] = None
) -> dict[str, Any]:
    registry = _registry(request)
    return {
        "models": [
            model_version_json(v, registry.bundles_for(v.id))
            for v in registry.list_model_versions(name)
        ]
    }


@router.get("/models/{name}/{version}", summary="One model version with its variants")
def model_version(request: Request, name: str, version: str, _t: Viewer) -> dict[str, Any]:
    registry = _registry(request)
    v = registry.get_model_version(name, version)
    return model_version_json(v, registry.bundles_for(v.id))


# --------------------------------------------------------------------------- deployments
@router.get("/deployments", summary="Deployments, newest first")
def deployments(
    request: Request, _t: Viewer, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    found = _registry(request).list_deployments()[:limit]
    return {"deployments": [deployment_json(d) for d in found]}


@router.get("/deployments/{deployment_id}", summary="One deployment with its targets")
def deployment(request: Request, deployment_id: str, _t: Viewer) -> dict[str, Any]:
    return deployment_json(_registry(request).get_deployment(deployment_id))


@router.post(
    "/deployments",
    status_code=201,
    summary="Deploy through the running controller; says per device whether it was published",
)
def deploy(request: Request, body: DeployRequest, _t: Operator) -> dict[str, Any]:
    service = _service(request)
    ids = select_devices(
        service.registry, devices=body.devices, tags=body.tags, all_devices=body.all
    )
    outcome = deploy_and_confirm(
        service, body.model, body.version, ids, wait_s=body.wait_published_s
    )
    return deploy_outcome_json(outcome)


# --------------------------------------------------------------------------- rollouts
@router.get("/rollouts", summary="Rollouts, newest first")
def rollouts(request: Request, token: Viewer) -> dict[str, Any]:
    return {"rollouts": [rollout_json(r) for r in _rollouts(request, token).list_rollouts()]}


@router.get("/rollouts/{rollout_id}", summary="One rollout with its waves and devices")
def rollout(request: Request, rollout_id: str, token: Viewer) -> dict[str, Any]:
    store = _rollouts(request, token)
    out = rollout_json(store.get(rollout_id))
    out["waves"] = [wave_json(w) for w in store.waves(rollout_id)]
    out["device_states"] = [rollout_device_json(d) for d in store.devices(rollout_id)]
    return out


@router.get("/rollouts/{rollout_id}/story", summary="A rollout's decisions with their reasons")
def rollout_story(
    request: Request,
    rollout_id: str,
    token: Viewer,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    store = _rollouts(request, token)
    store.get(rollout_id)  # 404 for an unknown rollout, not an empty story
    return {
        "rollout_id": rollout_id,
        "decisions": [
            decision_json(d) for d in store.decisions(rollout_id, after_id=after, limit=limit)
        ],
    }


@router.post("/rollouts", status_code=201, summary="Create (and start) a staged rollout")
def create_rollout(request: Request, body: RolloutRequest, token: Operator) -> dict[str, Any]:
    unknown = sorted(set(body.strategy) - _STRATEGY)
    if unknown:
        raise ApiError(
            422,
            "bad_request",
            f"unknown strategy setting(s): {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_STRATEGY))}",
        )
    selector = Selector(
        devices=tuple(body.selector.devices),
        tags=tuple(body.selector.tags),
        profiles=tuple(body.selector.profiles),
        all=body.selector.all,
    )
    config = RolloutConfig(**_canary(body.canary), **body.strategy)  # type: ignore[arg-type]
    info = _rollouts(request, token).create(
        body.model, body.version, selector, config, start=body.start
    )
    return rollout_json(info)


def _steer(request: Request, token: ApiTokenInfo, rollout_id: str, verb: str, reason: str) -> Any:
    store = _rollouts(request, token)
    info = store.start(rollout_id) if verb == "start" else getattr(store, verb)(rollout_id, reason)
    return rollout_json(info)


@router.post("/rollouts/{rollout_id}/start", summary="Start a rollout created with start=false")
def start_rollout(request: Request, rollout_id: str, token: Operator) -> dict[str, Any]:
    out: dict[str, Any] = _steer(request, token, rollout_id, "start", "")
    return out


@router.post("/rollouts/{rollout_id}/pause", summary="Start no more devices")
def pause_rollout(
    request: Request, rollout_id: str, token: Operator, body: ReasonRequest | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = _steer(request, token, rollout_id, "pause", body.reason if body else "")
    return out


@router.post("/rollouts/{rollout_id}/resume", summary="Continue a paused rollout")
def resume_rollout(
    request: Request, rollout_id: str, token: Operator, body: ReasonRequest | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = _steer(request, token, rollout_id, "resume", body.reason if body else "")
    return out


@router.post("/rollouts/{rollout_id}/abort", summary="Stop and roll started devices back")
def abort_rollout(
    request: Request, rollout_id: str, token: Operator, body: ReasonRequest | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = _steer(request, token, rollout_id, "abort", body.reason if body else "")
    return out


# --------------------------------------------------------------------------- tokens
def _tokens(request: Request) -> TokenStore:
    store: TokenStore = request.app.state.tokens
    return store


@router.get("/tokens", summary="API tokens, without secrets (admin)")
def tokens(request: Request, _t: Admin) -> dict[str, Any]:
    return {"tokens": [token_json(t) for t in _tokens(request).list_tokens()]}


@router.post("/tokens", status_code=201, summary="Create an API token; shown once (admin)")
def create_token(request: Request, body: TokenRequest, _t: Admin) -> dict[str, Any]:
    created = _tokens(request).create(body.name, body.role)
    return {**token_json(created.info), "token": created.token}


@router.post("/tokens/{token_id}/revoke", summary="Revoke an API token (admin)")
def revoke_token(request: Request, token_id: str, _t: Admin) -> dict[str, Any]:
    return token_json(_tokens(request).revoke(token_id))
