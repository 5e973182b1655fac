"""The web dashboard: a static single-page app at ``/`` plus two read-only routes it needs.

The page and its assets (``static/``, shipped as package data; no CDN) hold
no fleet data, so they are served without a token: the sign-in form has to
load before anyone has pasted one. Every number on the page comes from the
``/api/v1`` JSON routes, called by the browser with the Bearer token the
user pasted (kept in ``sessionStorage``, so it goes when the tab closes).

Two routes exist only because the page needs data no other route gives:

* ``GET /api/v1/dashboard/me``: the role of the token in use, so that a
  viewer's page hides the buttons the API would refuse anyway.
* ``GET /api/v1/dashboard/devices/{id}/latency``: p50/p95/p99 per minute.
  The per-minute rollups keep only p95 (a weighted mean and a max), so the
  other two percentiles come from the raw telemetry windows while those are
  retained; the rollups stay the source for the longer history.

Both need a viewer token like every ``/api/v1`` route. They are left out of
the OpenAPI document: they serve this page, not API clients, and carry no
compatibility promise.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from edgefleet.controller.api.errors import ApiError
from edgefleet.controller.api.routes import Viewer
from edgefleet.controller.errors import NotFoundError
from edgefleet.controller.registry import models as m
from edgefleet.controller.service import ControllerService

__all__ = ["STATIC_FILES", "router", "static_names"]

router = APIRouter()

_STATIC = resources.files("edgefleet.controller.api") / "static"
STATIC_FILES: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
"""The assets the page loads, by name: anything else under ``/static/`` is a 404."""

# The page runs only its own scripts and styles and talks only to this server;
# device-supplied strings are inserted as text, and this stops anything that
# slipped through from loading or sending elsewhere.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


_SUMS = ("windows", "requests", "errors", "w", "p50", "p95", "p99", "rss", "cpu")


def _asset(name: str) -> bytes:
    return (_STATIC / name).read_bytes()


@router.get("/", include_in_schema=False)
def index() -> HTMLResponse:
    """The dashboard shell (sign-in form and page frame); data is fetched with the token."""
    return HTMLResponse(_asset("index.html"), headers=_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
def static(name: str) -> Response:
    """One packaged asset, by exact name (no paths, so nothing outside ``static/``)."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no dashboard asset {name!r}")
    return Response(_asset(name), media_type=media_type, headers=_HEADERS)


@router.get(
    "/api/v1/dashboard/me",
    summary="The token in use: its name and role (viewer)",
)
def me(token: Viewer) -> dict[str, Any]:
    return {"id": token.id, "name": token.name, "role": token.role.value}


@router.get(
    "/api/v1/dashboard/devices/{device_id}/latency",
    summary="A device's p50/p95/p99 latency, errors, RSS and CPU per minute, from raw windows",
)
def latency(
    request: Request,
    device_id: str,
    _t: Viewer,
    minutes: Annotated[int, Query(ge=1, le=1440)] = 60,
) -> dict[str, Any]:
    """Request-weighted means of each window's percentiles, per minute, oldest first.

    Windows without requests carry no percentiles and only count towards
    ``requests``/``errors``; a minute with no measured latency has ``null``s.
    ``rss_bytes`` is the minute's maximum and ``cpu_percent`` its mean, as
    in the rollups, so the page can draw recent minutes not rolled up yet.
    """
    service: ControllerService = request.app.state.service
    registry = service.registry
    if registry.get_device(device_id) is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled")
    t = m.TelemetryRecord
    since = datetime.now(timezone.utc) - timedelta(minutes=minutes)
    stmt = (
        sa.select(
            t.at, t.requests, t.errors, t.p50_ms, t.p95_ms, t.p99_ms, t.rss_bytes, t.cpu_percent
        )
        .where(t.device_id == device_id, t.at >= since)
        .order_by(t.at)
    )
    buckets: dict[datetime, dict[str, float]] = {}
    with registry.database.read() as s:
        for at, requests, errors, p50, p95, p99, rss, cpu in s.execute(stmt):
            minute = at.replace(second=0, microsecond=0)
            b = buckets.setdefault(minute, dict.fromkeys(_SUMS, 0.0))
            b["windows"] += 1
            b["requests"] += requests
            b["errors"] += errors
            b["rss"] = max(b["rss"], rss)
            b["cpu"] += cpu
            if requests and p50 is not None and p95 is not None and p99 is not None:
                b["w"] += requests
                b["p50"] += p50 * requests
                b["p95"] += p95 * requests
                b["p99"] += p99 * requests
    out = []
    for minute in sorted(buckets):
        b = buckets[minute]
        w = b["w"]
        out.append(
            {
                "minute": minute,
                "requests": int(b["requests"]),
                "errors": int(b["errors"]),
                "error_rate": (b["errors"] / b["requests"]) if b["requests"] else 0.0,
                "p50_ms": b["p50"] / w if w else None,
                "p95_ms": b["p95"] / w if w else None,
                "p99_ms": b["p99"] / w if w else None,
                "rss_bytes": int(b["rss"]),
                "cpu_percent": b["cpu"] / b["windows"],
            }
        )
    return {"device_id": device_id, "minutes": out}


def static_names() -> list[str]:
    """Every file the package ships under ``static/`` (for the packaging test)."""
    return sorted(p.name for p in _STATIC.iterdir() if p.is_file())
