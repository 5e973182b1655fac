"""Every API error is JSON: ``{"error": {"code": ..., "message": ...}}`` with a 4xx or 5xx.

``code`` is stable (scripts match on it); for refusals of the controller it
is the :class:`~edgefleet.protocols.errors.EdgefleetError` code, so the API
and the CLI name a failure the same way. The status follows the error's
kind: unknown things 404, a state that forbids the action 409, bad input 400
or 422, a missing or bad token 401, too small a role 403.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefleet.controller.ca import CertificateError
from edgefleet.controller.errors import (
    DuplicateError,
    NoMatchingBundleError,
    NotFoundError,
)
from edgefleet.controller.rollout.errors import RolloutConfigError, RolloutStateError
from edgefleet.protocols.errors import EdgefleetError

__all__ = ["ApiError", "error_body", "install_error_handlers", "status_of"]

log = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of decides.
_STATUS: tuple[tuple[type[EdgefleetError], int], ...] = (
    (NotFoundError, 404),
    (DuplicateError, 409),
    (NoMatchingBundleError, 409),
    (RolloutStateError, 409),
    (RolloutConfigError, 422),
    (CertificateError, 409),
)


class ApiError(Exception):
    """An error the API answers with ``status`` and a JSON body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def status_of(exc: EdgefleetError) -> int:
    """The HTTP status of a controller refusal (400 unless a more specific one fits)."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 400


def _json(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, expected or not, with the JSON error body."""

    async def api_error(_request: Request, exc: Exception) -> Any:
        assert isinstance(exc, ApiError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _json(exc.status, exc.code, exc.message, headers)

    async def refused(_request: Request, exc: Exception) -> Any:
        assert isinstance(exc, EdgefleetError)
        return _json(status_of(exc), exc.code, str(exc))

    async def invalid(_request: Request, exc: Exception) -> Any:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for err in exc.errors()[:10]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg"))
        return _json(422, "bad_request", "; ".join(str(p) for p in problems) or "invalid request")

    async def http_error(_request: Request, exc: Exception) -> Any:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _json(exc.status_code, code, str(exc.detail))

    async def unexpected(_request: Request, exc: Exception) -> Any:
        log.exception("API request failed", exc_info=exc)
        return _json(500, "internal", "internal error; see the controller log")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(EdgefleetError, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
