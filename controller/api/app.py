"""Builds the management API: ``/api/v1``, ``/metrics``, the OpenAPI document, the dashboard.

Every route needs a token, the OpenAPI document and ``/metrics`` included
(a viewer token; Prometheus sends one with ``authorization`` in its scrape
config). FastAPI's own ``/docs`` pages are off: they load scripts from a
CDN, and this server ships everything it serves. The web dashboard
(:mod:`~edgefleet.controller.api.dashboard`) is at ``/``: its page and
assets are public (they hold no data), its data comes from ``/api/v1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgefleet import __version__
from edgefleet.controller.api.dashboard import router as dashboard_router
from edgefleet.controller.api.errors import install_error_handlers
from edgefleet.controller.api.limits import BodyLimit
from edgefleet.controller.api.metrics import metrics_registry
from edgefleet.controller.api.routes import Viewer, router
from edgefleet.controller.registry.tokens import TokenStore
from edgefleet.controller.service import ControllerService

__all__ = ["OPENAPI_PATH", "create_app"]

OPENAPI_PATH = "/api/v1/openapi.json"


def create_app(service: ControllerService, *, ca_dir: Path | None = None) -> FastAPI:
    """The API of the running ``service``.

    Args:
        service: the started controller service; its registry is read and
            its outbox publishes deployments.
        ca_dir: the certificate authority's directory, for device revocation.
    """
    app = FastAPI(
        title="edgefleet management API",
        version=__version__,
        description=(
            "Every route needs `Authorization: Bearer <token>` (`edgefleet token create`). "
            "Roles: viewer reads; operator also deploys and steers rollouts; admin also "
            'revokes devices. Errors are `{"error": {"code": ..., "message": ...}}`.'
        ),
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.tokens = TokenStore(service.registry.database)
    app.state.ca_dir = ca_dir
    prometheus, timer = metrics_registry(service)
    app.state.query_timer = timer
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.include_router(router)
    app.include_router(dashboard_router)

    @app.get(OPENAPI_PATH, include_in_schema=False)
    def openapi(_t: Viewer) -> dict[str, Any]:
        return app.openapi()

    @app.get(
        "/metrics",
        summary="Prometheus metrics (viewer token)",
        response_class=Response,
    )
    def metrics(_t: Viewer) -> Response:
        return Response(generate_latest(prometheus), media_type=CONTENT_TYPE_LATEST)

    return app
